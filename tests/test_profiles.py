"""The Snakemake profiles: profiles/default (read by every `snakemake` call here, since Snakemake loads
profiles/default on its own) and profiles/slurm (cluster runs with snakemake-executor-plugin-slurm).

Everything here is a dry run or argument parsing, so nothing is submitted. A stub `sbatch` comes first on
PATH and fails loudly if it is ever called. The plugin does not need sinfo, squeue or sacct for a dry run.
"""
import os
import re
import stat
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from conftest import REPO, copy_repo
from diffaudit.dvcgen import snakemake_jobs

SNAKEMAKE = [sys.executable, "-m", "snakemake"]
PROFILES = REPO / "profiles"




@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return copy_repo(tmp_path_factory.mktemp("profiles") / "repo")


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """PATH with a `sbatch` that records the call and fails, ahead of any real one."""
    stubs = tmp_path_factory.mktemp("stubs")
    marker = stubs / "sbatch_was_called"
    sbatch = stubs / "sbatch"
    sbatch.write_text(f"#!/bin/sh\necho \"$@\" >> '{marker}'\necho 'stub sbatch: no submission in tests' >&2\nexit 1\n")
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    path = os.pathsep.join([str(stubs), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": path, "SBATCH_MARKER": str(marker)}


def dry_run(workdir: Path, env: dict, *args: str) -> str:
    proc = subprocess.run(SNAKEMAKE + ["-n", *args], cwd=workdir, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert not Path(env["SBATCH_MARKER"]).exists(), "a dry run called sbatch"
    return out


def job_stats(out: str) -> Counter:
    """The 'Job stats' table of a dry run, without the `all` target."""
    table = out.split("Job stats:", 1)[1]
    counts = Counter()
    for line in table.splitlines()[3:]:
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if not m:
            break
        if m[1] not in ("all", "total"):
            counts[m[1]] = int(m[2])
    return counts


def job_resources(out: str, rule: str) -> list[dict]:
    """The evaluated resources of each job of ``rule``, as the dry run prints them."""
    found = []
    for block in re.split(r"\n(?=\[[^\]]+\]\n)|\n(?=rule \w+:)", out):
        if not re.match(rf"\s*(\[[^\]]+\]\n)?rule {rule}:", block):
            continue
        m = re.search(r"^\s*resources: (.*)$", block, re.M)
        assert m, block
        res = {}
        for item in m[1].split(", "):
            key, _, value = item.partition("=")
            res[key] = int(value) if value.isdigit() else value
        found.append(res)
    return found


def expected_jobs(workdir: Path, *configfiles: str) -> Counter:
    """Job counts per rule of the Snakemake DAG, from Snakemake's API (no profile involved)."""
    jobs = snakemake_jobs([workdir / c for c in configfiles], snakefile=workdir / "Snakefile")
    return Counter(j["rule"] for j in jobs)


def gpu_rules() -> set[str]:
    """Rules that declare a `gpu` resource in workflow/rules/*.smk."""
    rules = set()
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        for name, body in re.findall(r"^rule (\w+):\n((?:[ \t]+.*\n|\n)*)", smk.read_text(), re.M):
            if re.search(r"^\s+resources:\s*\n(?:\s{8,}.*\n)*?\s{8,}gpu\s*=", body, re.M):
                rules.add(name)
    return rules


# ---------------------------------------------------------------------------------------------
# profiles/default
# ---------------------------------------------------------------------------------------------

def test_default_profile_limits_the_gpu_to_one_job():
    profile = yaml.safe_load((PROFILES / "default" / "config.yaml").read_text())
    assert profile["resources"] == {"gpu": 1}
    assert profile["rerun-incomplete"] is True and profile["keep-going"] is False
    assert profile["latency-wait"] >= 5
    assert "cores" not in profile  # left to the user
    assert "extract" in gpu_rules()


def test_default_profile_is_read_by_plain_snakemake(workdir, env, monkeypatch):
    from snakemake.cli import parse_args

    monkeypatch.chdir(workdir)
    _, args = parse_args(["-n"])  # no --profile: Snakemake finds profiles/default itself
    assert args.resources["gpu"].value == 1
    assert args.rerun_incomplete and not args.keep_going and args.latency_wait == 60
    _, args = parse_args(["-n", "--resources", "gpu=2"])  # the command line wins
    assert args.resources["gpu"].value == 2
    _, args = parse_args(["-n", "--workflow-profile", "none"])
    assert not args.resources


#: The demo's jobs of each GPU rule: the baseline and three experiments, the harm jobs for the baseline only.
RUNS_OF = {"extract": 4, "position_probe": 4, "extract_harm": 1, "harm": 1}


def test_default_profile_dry_run_on_the_demo(workdir, env):
    out = dry_run(workdir, env, "--configfile", "config/demo.yaml")
    assert "workflow specific profile profiles/default" in out
    assert job_stats(out) == expected_jobs(workdir, "params.yaml", "config/demo.yaml")
    # device auto: gpu=1 only where torch sees a CUDA device (on a CPU machine the extractions run side by side)
    import torch

    cuda = int(torch.cuda.is_available())
    for rule in gpu_rules():
        for res in job_resources(out, rule):
            assert res.get("gpu", 0) <= 1, (rule, res)
    assert gpu_rules() == {"extract", "position_probe", "extract_harm", "harm"}
    for rule in gpu_rules():  # baseline and three experiments; the harm jobs for the baseline only
        assert [r["gpu"] for r in job_resources(out, rule)] == [cuda] * RUNS_OF[rule], rule


@pytest.mark.parametrize("device,gpu", [("cuda", 1), ("cuda:1", 1), ("cpu", 0)])
def test_gpu_resource_follows_the_device(workdir, env, device, gpu):
    """A configured CUDA device makes the GPU jobs declare gpu=1 (one at a time under profiles/default) whatever the
    machine has; the CPU never does."""
    cfg = workdir / f"device_{device.replace(':', '_')}.yaml"
    cfg.write_text(yaml.safe_dump({"extraction": {"device": device}}))
    out = dry_run(workdir, env, "--configfile", "config/demo.yaml", str(cfg))
    for rule in gpu_rules():
        assert [r["gpu"] for r in job_resources(out, rule)] == [gpu] * RUNS_OF[rule], rule


# ---------------------------------------------------------------------------------------------
# profiles/slurm
# ---------------------------------------------------------------------------------------------

def test_slurm_profile_settings(workdir, monkeypatch):
    pytest.importorskip("snakemake_executor_plugin_slurm")
    from snakemake.cli import parse_args

    profile = yaml.safe_load((PROFILES / "slurm" / "config.yaml").read_text())
    overlap = set(profile) & set(yaml.safe_load((PROFILES / "default" / "config.yaml").read_text()))
    assert not overlap, f"profiles/default overrides these keys of profiles/slurm: {overlap}"
    assert gpu_rules() <= set(profile["set-resources"]), "every GPU rule needs a GPU partition"
    for rule in gpu_rules():
        assert "slurm_extra" not in profile["set-resources"][rule]  # the plugin rejects --gres/--gpus there
        assert profile["set-resources"][rule]["gpu"] == 1  # the login node's own devices do not decide

    monkeypatch.chdir(workdir)
    _, args = parse_args(["-n", "--profile", "profiles/slurm"])
    assert args.executor == "slurm" and args.jobs == 20
    assert args.resources["gpu"].value == 1  # from profiles/default, layered on top
    assert args.rerun_incomplete and args.latency_wait == 60
    assert args.set_resources["extract"]["mem_mb"].value == 32000


@pytest.mark.parametrize("configfiles", [[], ["--configfile", "config/demo.yaml"]], ids=["paper", "demo"])
def test_slurm_profile_dry_run(workdir, env, configfiles):
    pytest.importorskip("snakemake_executor_plugin_slurm")
    out = dry_run(workdir, env, "--profile", "profiles/slurm", *configfiles)
    assert "Using profiles profiles/slurm and workflow specific profile profiles/default" in out
    cfgs = ["params.yaml"] + configfiles[1:]
    stats = job_stats(out)
    assert stats == expected_jobs(workdir, *cfgs)
    if configfiles:  # the demo builds the embedded model; its comparison with the paper says why there is none;
        # its baseline and three experiments each extract and get a verdict
        assert stats["build_mini"] == 1 and stats["paper_comparison"] == 1
        assert stats["paper_reference"] == stats["extract"] == stats["run_summary"] == 4
    else:  # the paper: three models, from the hub
        assert "build_mini" not in stats and stats["paper_comparison"] == 3
        assert stats["position_probe"] == stats["quantitative_figure"] == stats["credibility"] == 3
    assert stats["extract"] >= 1 and stats["dataset"] == 1 and stats["cross_model_figure"] == 1

    extract = job_resources(out, "extract")
    assert len(extract) == stats["extract"]
    for res in extract:
        assert res["gpu"] == 1 and res["slurm_partition"] == "gpu"
        assert res["mem_mb"] == 32000 and res["runtime"] == 180 and res["cpus_per_task"] == 8
    assert [r["gpu"] for r in job_resources(out, "position_probe")] == [1] * stats["position_probe"]
    for res in job_resources(out, "channel_outliers"):
        assert "gpu" not in res and "slurm_partition" not in res  # cluster default partition
        assert res["runtime"] == 60 and res["mem_mb"] == 16000 and res["cpus_per_task"] == 4


def test_slurm_submit_line_for_extract(workdir, env):
    """What the plugin would hand to sbatch for an `extract` job, built from the dry run's resources."""
    pytest.importorskip("snakemake_executor_plugin_slurm")
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string
    from snakemake_executor_plugin_slurm.validation import validate_slurm_extra

    class Resources(dict):
        def __getattr__(self, name):
            try:
                return self[name]
            except KeyError:
                raise AttributeError(name) from None

    class Job:
        threads = 1

        def __init__(self, resources):
            self.resources = Resources(resources)

    out = dry_run(workdir, env, "--profile", "profiles/slurm", "--configfile", "config/demo.yaml")
    job = Job(job_resources(out, "extract")[0])
    validate_slurm_extra(job)
    params = {"run_uuid": "diffaudit_x", "slurm_logfile": "log", "comment_str": "extract", "account": "",
              "partition": f"-p {job.resources['slurm_partition']}", "workdir": str(workdir)}
    call = get_submit_command(job, params) + set_gres_string(job)
    assert " --gpus=1" in call and " -p gpu" in call
    assert " --mem 32000" in call and " -t 180" in call and "--cpus-per-task=8" in call
