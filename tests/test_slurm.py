"""Cluster runs for real: `snakemake --profile profiles/slurm` against a running SLURM.

tests/slurm_cluster.py brings up a one-node cluster on this machine from Debian's slurm-wlm packages (installed
with apt-get when missing) and takes it down afterwards. Without root, packages or daemons, everything here skips
with the reason.

A small demo (the demo images and the embedded `mini` model, 8 images at 128 px, no crop variants) runs

* locally (`--cores 2`), the reference;
* through the profile, every job submitted with sbatch: the tables equal the local run's byte for byte, and the
  job records (`scontrol show job`) hold each rule's cpus, memory and runtime;
* through the profile in another copy of the repository, after the README's steps for offline compute nodes, with
  the extraction job cancelled by `scancel` mid-way and the command repeated: it resumes from the last complete
  batch (the complete batches' files are not written again) and its tables equal the local run's.

The three run at the same time: a cluster run mostly waits for its status checks.

The profile is used as a user would use it on this cluster, with its site values overridden on the command line
(README, Cluster runs): the cluster's only partition, no GPU (`gpu=0`: the node has no GPU gres), memory scaled
down to this machine, CPUs capped at the node's; the runtimes are the profile's. This cluster has no accounting
(no slurmdbd, hence no `sacct` and no account), so the executor polls with `squeue`
(`--slurm-status-command squeue`), which needs MinJobAge >= 3x `--slurm-init-seconds-before-status-checks`.
"""
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO, copy_repo
from slurm_cluster import ClusterUnavailable, SlurmCluster

pytestmark = pytest.mark.slow

SNAKEMAKE = [sys.executable, "-m", "snakemake"]
PROFILE = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
N_IMAGES, BATCH = 8, 2
# The small demo: config/demo.yaml's images on mini (the VAE does not matter here) without its experiments, fewer and
# smaller images, no crop variants.
DEMO = {"models": ["mini"],
        "dataset": {"source": "demo", "n_images": N_IMAGES, "size": 128},
        "extraction": {"crops": False, "batch_size": BATCH},
        "probe": {"epochs": 2}}
# The plugin checks the jobs' status this many seconds after a job has ended, then each time 10 s later than the
# time before (at init, 2 init + 10, 3 init + 30 ...) until one has. A job here takes 15-45 s (three Python
# start-ups: Snakemake in the job, Snakemake in its srun step, the rule's script), found after 15 s or 40 s.
STATUS_INIT_S = 15
# What the cancelled run makes: the tables computed from the representations.
TABLES = ["position_probe", "token_group_similarity", "channel_outliers", "anomaly_rel_norm"]
RUN_TIMEOUT = 420


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("snakemake_executor_plugin_slurm")
    c = SlurmCluster()
    try:
        c.start()
    except ClusterUnavailable as e:
        pytest.skip(f"no SLURM cluster: {e}")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slurm")


@pytest.fixture(scope="module")
def env(tmp) -> dict:
    """As on an offline compute node (README, Cluster runs): the HF cache on the shared file system, hub offline."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "HF_HOME": str(tmp / "hf-cache"), "HF_HUB_OFFLINE": "1"}


def demo_config(tmp: Path, name: str, **extra) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**DEMO, "results_dir": str(tmp / name), **extra}))
    return path


class Background:
    """A Snakemake run in its own process group, output to ``log``; killed as a group on timeout."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict, log: Path):
        self.log = log
        with open(log, "w") as f:
            self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def wait(self, timeout: float = RUN_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"snakemake ran past {timeout} s:\n{self.output()[-4000:]}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def run(cmd: list[str], cwd: Path, env: dict, log: Path, timeout: float = RUN_TIMEOUT) -> str:
    bg = Background(cmd, cwd, env, log)
    rc = bg.wait(timeout)
    out = bg.output()
    assert rc == 0, f"snakemake failed ({rc}):\n{out[-6000:]}\n{failed_job_logs(cwd)}"
    return out


def failed_job_logs(workdir: Path) -> str:
    """The SLURM logs of the jobs (they are kept), last lines of each, for an assertion message."""
    logs = sorted((workdir / ".snakemake" / "slurm_logs").rglob("*.log"), key=lambda p: p.stat().st_mtime)
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-1500:]}" for p in logs[-3:])


@pytest.fixture(scope="module")
def local_run(tmp, env):
    """The reference: the same demo run locally, in its own copy of the repository. Starts in the background and
    runs while the cluster run waits for its jobs."""
    repo = copy_repo(tmp / "repo_local")
    bg = Background(SNAKEMAKE + ["--cores", "2", "--configfile", str(demo_config(tmp, "local"))], repo, env,
                    tmp / "local.log")
    yield bg, tmp / "local"
    bg.kill()


def local_results(local_run) -> Path:
    bg, results = local_run
    rc = bg.wait()
    assert rc == 0, f"the local run failed:\n{bg.output()[-6000:]}"
    return results


# ---------------------------------------------------------------------------------------------
# What the profile asks SLURM for, fitted to this cluster
# ---------------------------------------------------------------------------------------------

def requests(cluster: SlurmCluster) -> dict[str, dict]:
    """Rule -> the resources its jobs ask for here ("*": every other rule). The profile's runtime; its memory times
    one factor, so that eight of its largest jobs fit the node at once; its CPUs capped at the node's."""
    largest = max(r.get("mem_mb", 0) for r in [PROFILE["default-resources"], *PROFILE["set-resources"].values()])
    scale = min(1.0, cluster.mem_mb / (8 * largest))
    default = PROFILE["default-resources"]
    out = {}
    for rule, res in [("*", {}), *PROFILE["set-resources"].items()]:
        merged = {**default, **res}
        out[rule] = {"runtime": merged["runtime"], "mem_mb": int(merged["mem_mb"] * scale),
                     "cpus_per_task": min(merged["cpus_per_task"], cluster.cpus)}
    return out


def gpu_rules() -> list[str]:
    """The rules the profile sends to a GPU partition."""
    return [rule for rule, res in PROFILE["set-resources"].items() if "slurm_partition" in res]


def site_overrides(cluster: SlurmCluster) -> list[str]:
    """The command-line overrides of the profile's site values for this cluster."""
    req = requests(cluster)
    args = ["--default-resources", *(f"{k}={v}" for k, v in req["*"].items()), "--set-resources"]
    for rule, res in req.items():
        if rule != "*":
            args += [f"{rule}:{k}={v}" for k, v in res.items()]
    for rule in gpu_rules():
        args += [f"{rule}:slurm_partition={cluster.partition}", f"{rule}:gpu=0"]
    return args


def cluster_cmd(cluster: SlurmCluster, config: Path, targets: list[str] = ()) -> list[str]:
    return SNAKEMAKE + [*targets, "--profile", "profiles/slurm", "--configfile", str(config), *site_overrides(cluster),
                        "--slurm-status-command", "squeue",
                        "--slurm-init-seconds-before-status-checks", str(STATUS_INIT_S),
                        "--slurm-keep-successful-logs"]


def submissions(out: str) -> dict[str, str]:
    """Snakemake job id -> SLURM job id, from the run's output."""
    return dict(re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", out))


def rule_of(record: dict) -> str:
    m = re.match(r"rule_(\w+?)(?:_wildcards_.*)?$", record.get("Comment", ""))
    assert m, record
    return m[1]


def minutes(limit: str) -> int:
    """A SLURM time limit ([D-]HH:MM:SS) in minutes."""
    days, _, hms = limit.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return int(days or 0) * 1440 + h * 60 + m + (s > 0)


def megabytes(mem: str) -> int:
    m = re.fullmatch(r"([\d.]+)([MGT]?)", mem)
    assert m, mem
    return round(float(m[1]) * {"": 1, "M": 1, "G": 1024, "T": 1024 ** 2}[m[2]])


def tables(results: Path) -> dict[Path, bytes]:
    return {p.relative_to(results): p.read_bytes() for p in sorted(results.rglob("*.csv"))
            if "representations" not in p.parts}


def assert_same_tables(ours: Path, reference: Path, subset: bool = False) -> int:
    """Every table of ``ours`` equals the reference's (pandas, exactly, and byte for byte); both have the same tables
    unless ``subset``."""
    a, b = tables(ours), tables(reference)
    assert a.keys() <= b.keys() if subset else a.keys() == b.keys(), set(a) ^ set(b)
    assert {Path(f"mini/{t}.csv") for t in TABLES} <= a.keys()
    for rel in a:
        pd.testing.assert_frame_equal(pd.read_csv(ours / rel), pd.read_csv(reference / rel), check_exact=True,
                                      obj=str(rel))
        assert a[rel] == b[rel], rel
    return len(a)


def n_complete(store: Path) -> int:
    import zarr

    try:
        return int(zarr.open_group(str(store), mode="r").attrs.get("n_complete", 0))
    except Exception:  # noqa: BLE001 - not created yet
        return 0


# ---------------------------------------------------------------------------------------------
# The cluster
# ---------------------------------------------------------------------------------------------

def test_cluster_is_up_with_this_machines_cores_and_memory(cluster):
    node = cluster.sinfo().splitlines()[1].split()
    assert node == [cluster.node, f"{cluster.partition}*", "idle", str(cluster.cpus), str(cluster.mem_mb)]
    assert cluster.cpus == os.cpu_count()
    assert re.fullmatch(r"\d+\.\d+\.\d+", cluster.version)


# ---------------------------------------------------------------------------------------------
# The demo through the profile. It runs in the background (as does the local run) while the scancel test runs
# its own cluster run in another copy of the repository: the runs mostly wait for the status checks.
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster_run(cluster, tmp, env, local_run):
    """The demo through `--profile profiles/slurm` (started after the local run, not waited for)."""
    workdir = copy_repo(tmp / "repo")
    bg = Background(cluster_cmd(cluster, demo_config(tmp, "cluster")), workdir, env, tmp / "cluster.log")
    yield bg, workdir, tmp / "cluster"
    bg.kill()


def cluster_results(cluster_run) -> tuple[str, Path]:
    bg, workdir, results = cluster_run
    rc = bg.wait()
    out = bg.output()
    assert rc == 0, f"the cluster run failed ({rc}):\n{out[-6000:]}\n{failed_job_logs(workdir)}"
    return out, results


# ---------------------------------------------------------------------------------------------
# scancel mid-extraction, then the same command again
# ---------------------------------------------------------------------------------------------

def test_scancel_mid_extraction_then_rerun_resumes(cluster, tmp, env, mini_dir, local_run, cluster_run):
    """The README's recipe for compute nodes without internet (HF_HOME, `diffaudit prefetch`, the images built
    on the submitting machine, HF_HUB_OFFLINE=1 for the jobs), then the tables through the profile; `scancel` of
    the extraction job mid-way ends the run; the same command again resumes the extraction at its last complete
    batch and gives the same tables as the uninterrupted local run. The mini model is the prebuilt one (a local
    directory, as a user's own model). Requests cluster_run only to run at the same time."""
    workdir = copy_repo(tmp / "repo_cancelled")
    config = demo_config(tmp, "cancelled", model_sources={"mini": str(mini_dir)})
    results = tmp / "cancelled"
    store = results / "mini" / "representations.partial" / "full.zarr"
    login = {k: v for k, v in env.items() if k != "HF_HUB_OFFLINE"}  # the login node has internet
    prefetch = subprocess.run([str(Path(sys.executable).parent / "diffaudit"), "prefetch", "--configfile",
                               "params.yaml", str(config)], cwd=workdir, env=login, capture_output=True, text=True,
                              timeout=120)
    assert prefetch.returncode == 0 and "mini: local directory" in prefetch.stdout, prefetch.stdout + prefetch.stderr
    run(SNAKEMAKE + ["--cores", "1", "--until", "dataset", "--configfile", str(config)], workdir, login,
        tmp / "cancelled_0.log")

    cmd = cluster_cmd(cluster, config, targets=[str(results / "mini" / f"{t}.csv") for t in TABLES])
    first = Background(cmd, workdir, env, tmp / "cancelled_1.log")
    try:
        deadline, n = time.time() + RUN_TIMEOUT, 0
        while time.time() < deadline and first.proc.poll() is None and n < BATCH:
            n = n_complete(store)
            time.sleep(0.05)
        assert n >= BATCH, f"the extraction never got going:\n{first.output()[-4000:]}"
        jobs = [line.split("|") for line in cluster.squeue("%i|%k|%Z", states="RUNNING")]
        extract = [i for i, comment, wd in jobs
                   if comment.startswith("rule_extract") and Path(wd).resolve() == workdir.resolve()]
        assert len(extract) == 1, jobs
        subprocess.run(["scancel", extract[0]], check=True, timeout=30)
        rc = first.wait()
    finally:
        first.kill()
    out = first.output()
    assert rc != 0 and f"SLURM-job '{extract[0]}' failed, SLURM status is: 'CANCELLED'" in out, out[-4000:]
    assert cluster.job_record(extract[0])["JobState"] == "CANCELLED"
    done = n_complete(store)
    assert BATCH <= done < N_IMAGES, f"the extraction was not cancelled mid-way ({done}/{N_IMAGES} images)"
    assert done % BATCH == 0
    assert not (results / "mini" / "representations").exists()
    # the files of the complete batches, one per layer and batch
    kept = {p.relative_to(store): p.stat().st_mtime_ns for p in store.glob("*/repr/c/*/0/0/0")
            if int(p.parts[-4]) < done // BATCH}
    assert len(kept) >= 10

    again = run(cmd, workdir, env, tmp / "cancelled_2.log")
    assert not re.findall(r"^localrule (\w+):", out + again, re.M)  # every job through sbatch
    assert Counter(rule_of(cluster.job_record(j)) for j in submissions(again).values()) == Counter(
        {"extract": 1, "position_probe": 1, "token_group_similarity": 1, "channel_outliers": 1, "paper_reference": 1,
         "anomalies": 1})
    log = (results / "logs" / "extract" / "mini" / "representations.log").read_text()
    assert "resuming" in log, log
    final = results / "mini" / "representations" / "full.zarr"
    assert {p: (final / p).stat().st_mtime_ns for p in kept} == kept  # not written again
    assert_same_tables(results, local_results(local_run), subset=True)


# ---------------------------------------------------------------------------------------------
# The uninterrupted demo through the profile
# ---------------------------------------------------------------------------------------------

def test_demo_through_sbatch(cluster, cluster_run):
    """Every job of the demo went through sbatch (none ran on the submitting machine but `all`), and SLURM's job
    records hold the cpus, memory and runtime the profile (fitted to this cluster) gives each rule."""
    from diffaudit.dvcgen import snakemake_jobs

    out, results = cluster_results(cluster_run)
    workdir = cluster_run[1]
    expected = Counter(j["rule"] for j in snakemake_jobs([workdir / "params.yaml", results.parent / "cluster.yaml"],
                                                         snakefile=workdir / "Snakefile"))
    assert set(re.findall(r"^localrule (\w+):", out, re.M)) == {"all"}
    jobs = submissions(out)
    assert len(jobs) == sum(expected.values())
    req = requests(cluster)
    records = [cluster.job_record(j) for j in jobs.values()]
    assert Counter(rule_of(r) for r in records) == expected
    assert expected["build_mini"] == expected["extract"] == expected["position_probe"] == 1
    for rec in records:
        rule = rule_of(rec)
        want = req.get(rule, req["*"])
        got = {"runtime": minutes(rec["TimeLimit"]), "mem_mb": megabytes(rec["MinMemoryNode"]),
               "cpus_per_task": int(rec["CPUs/Task"])}
        assert got == want, (rule, rec)
        assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", (rule, rec)
        assert rec["Partition"] == cluster.partition and "gres" not in rec.get("TRES", ""), (rule, rec)
        assert rec["JobName"] == records[0]["JobName"]  # one name per workflow run, what squeue polls by
    # the runtimes are the profile's own, rule by rule
    limits = {rule_of(r): minutes(r["TimeLimit"]) for r in records}
    assert {r: limits[r] for r in PROFILE["set-resources"]} == {
        r: v["runtime"] for r, v in PROFILE["set-resources"].items()}


def test_demo_tables_equal_the_local_run(cluster_run, local_run):
    _, results = cluster_results(cluster_run)
    n = assert_same_tables(results, local_results(local_run))
    assert n >= 8


# ---------------------------------------------------------------------------------------------
# The README's cluster section against what the tests do
# ---------------------------------------------------------------------------------------------

def readme_cluster_section() -> str:
    text = (REPO / "README.md").read_text()
    return text.split("\n## Cluster runs\n", 1)[1].split("\n## ", 1)[0]


# The GPU requests the README lists: (the text of its table row, the rule's resources, what sbatch gets).
GPU_REQUESTS = [
    ("nothing more (the profile's `gpu: 1`)", {}, "--gpus=1"),
    ("`gpu_model: a100`", {"gpu_model": "a100"}, "--gpus=a100:1"),
    ('`gres: "gpu:a100:1"` and `gpu: 0`', {"gres": "gpu:a100:1", "gpu": 0}, "--gres=gpu:a100:1"),
    ("`gpu: 0`", {"gpu": 0}, ""),
]


class _Resources(dict):
    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class _Job:
    threads = 1

    def __init__(self, resources: dict):
        self.resources = _Resources(resources)


def test_readme_gpu_requests_are_what_the_plugin_submits():
    """Each row of the README's GPU table, as the resources of `extract` (which profiles/slurm gives gpu: 1), gives
    exactly the sbatch flags the row says; `--gres`/`--gpus` as slurm_extra lines are refused."""
    from snakemake_executor_plugin_slurm.utils import set_gres_string
    from snakemake_executor_plugin_slurm.validation import validate_slurm_extra
    from snakemake_interface_common.exceptions import WorkflowError

    section = readme_cluster_section()
    for row, resources, flags in GPU_REQUESTS:
        line = next((ln for ln in section.splitlines() if ln.startswith("|") and ln[1:].strip().startswith(row)),
                    None)
        assert line, f"README: no row {row!r} in the GPU table"
        assert (f"`{flags}`" if flags else "no GPU request") in line, line
        assert set_gres_string(_Job({"gpu": 1, **resources})).strip() == flags, row
    for extra in ("--gres=gpu:1", "--gpus=1"):
        with pytest.raises(WorkflowError):
            validate_slurm_extra(_Job({"slurm_extra": extra}))
    assert "slurm_extra" in section and "--set-resources" in section


def test_readme_says_what_was_tested_and_how(cluster, env, tmp):
    """The SLURM and plugin versions, the overrides the tests use, and the offline recipe's claim that the jobs
    get the submitting shell's environment (`--export=ALL`)."""
    import importlib.metadata

    from snakemake_executor_plugin_slurm.submit_string import get_submit_command

    section = " ".join(readme_cluster_section().split())
    assert f"SLURM {cluster.version}" in section, f"README: not tested with SLURM {cluster.version}?"
    plugin = importlib.metadata.version("snakemake-executor-plugin-slurm")
    assert f"snakemake-executor-plugin-slurm {plugin}" in section
    assert "--slurm-status-command squeue" in section and " ".join(cluster_cmd(cluster, tmp / "x.yaml")).count(
        "--slurm-status-command squeue") == 1
    assert "`gpu: 0`" in section and all(f"{r}:gpu=0" in site_overrides(cluster) for r in gpu_rules())
    min_job_age = int(re.search(r"MinJobAge\s*=\s*(\d+)", subprocess.run(
        ["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout)[1])
    assert min_job_age >= 3 * STATUS_INIT_S  # else the plugin falls back to sacct, which has no jobs here
    for step in ("export HF_HOME=", "diffaudit prefetch", "--until dataset", "export HF_HUB_OFFLINE=1",
                 "--export=ALL"):
        assert step in section, step
    # the plugin asks for --export=ALL, and a job sees the submitting shell's variables
    call = get_submit_command(_Job({}), {"run_uuid": "x", "slurm_logfile": "x", "comment_str": "x", "account": "",
                                         "partition": "", "workdir": str(tmp)})
    assert " --export=ALL " in call
    out = tmp / "env.out"
    subprocess.run(["sbatch", "--wait", "--export=ALL", "-t", "1", "--mem", "100", "-o", str(out), "--wrap",
                    "echo HF_HOME=$HF_HOME HF_HUB_OFFLINE=$HF_HUB_OFFLINE"], cwd=tmp, env=env, check=True,
                   capture_output=True, timeout=60)
    assert out.read_text().split() == [f"HF_HOME={env['HF_HOME']}", "HF_HUB_OFFLINE=1"]
