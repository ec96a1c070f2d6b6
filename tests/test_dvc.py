"""DVC mirrors the Snakemake DAG: the committed dvc.yaml is what the generator makes, and `dvc repro` works."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, copy_repo, kill_mid_extraction
from diffaudit.config import load_config
from diffaudit.dvcgen import EXPERIMENT_SUFFIX, EXTRA_RULES, TASK_SCRIPT, code_deps, render, snakemake_jobs
from diffaudit.pipeline.common import JOB_PARAMS


def test_committed_dvc_yaml_is_what_the_rules_give():
    assert (REPO / "dvc.yaml").read_text() == render(), (
        "dvc.yaml is out of date with the workflow's rules; regenerate it with `diffaudit dvc-yaml > dvc.yaml`")


def resolved_stages(root: Path) -> dict[str, dict]:
    """The stages as DVC resolves dvc.yaml's templates with the params.yaml at ``root``."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    out = {}
    with Repo(str(root)) as repo:
        for s in repo.index.stages:
            params = [k for d in s.deps if isinstance(d, ParamsDependency) for k in d.params]
            out[s.name] = {"cmd": s.cmd, "params": params,
                           "deps": [d.def_path for d in s.deps if not isinstance(d, ParamsDependency)],
                           "outs": [o.def_path for o in s.outs]}
    return out


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def check_dvc_matches_snakemake(root: Path):
    """Every Snakemake job of the configuration at ``root`` (params.yaml) is the DVC stage of the same name:
    same outputs, inputs covered by deps, the params the rule declares, the code its task reaches."""
    stages = resolved_stages(root)
    jobs = [j for j in snakemake_jobs([root / "params.yaml"], snakefile=root / "Snakefile")
            if j["rule"] not in {r for extra in EXTRA_RULES.values() for r in extra}]
    names = set()
    for job in jobs:
        model = job["wildcards"].get("model")
        # an experiment's job (wildcard exp "/experiments/<name>", or run "<name>") is a stage of the matrix
        exp = job["wildcards"].get("exp", "").split("/")[-1] or job["wildcards"].get("run", "baseline")
        exp = "" if exp == "baseline" else exp
        name = job["rule"] + (f"{EXPERIMENT_SUFFIX}@{model}-{exp}" if exp else f"@{model}" if model else "")
        names.add(name)
        assert name in stages, f"no DVC stage {name} for Snakemake job {job['rule']} {job['wildcards']}"
        st = stages[name]
        if job["rule"] == "extract":  # the stage's one output is the folder of every shard
            assert st["outs"] == [job["outputs"][0].split("/representations")[0] + "/representations"], name
            assert all(_covered(o, st["outs"]) for o in job["outputs"]), name
            assert st["cmd"] == f"diffaudit dvc-extract {model}" + (f" --experiment {exp}" if exp else "")
        else:
            assert sorted(st["outs"]) == sorted(job["outputs"]), name
            rules_allowed = " ".join([job["rule"]] + EXTRA_RULES.get(job["rule"], []))
            assert st["cmd"].startswith(f"snakemake --cores all --nolock --allowed-rules {rules_allowed} -- ")
            assert sorted(st["cmd"].split(" -- ")[1].split()) == sorted(job["outputs"]), name
        extra = EXTRA_RULES.get(job["rule"], [])
        assert str(Path(job["rule_file"]).relative_to(root.resolve())) in st["deps"], f"{name}: rule file"
        for i in job["inputs"]:
            made_here = i.startswith("resources/models/") and "build_mini" in extra
            assert made_here or _covered(i, st["deps"]), f"{name}: input {i} is not a DVC dep"
        declared = {("model_sources." + model if p == "model_source" else
                     f"experiments.{exp}" if p == "experiment" else p.replace("__", "."))
                    for p in job["params"] if p not in JOB_PARAMS and not (p == "experiment" and not exp)}
        if "build_mini" in extra:
            declared.add("mini")
        assert set(st["params"]) == declared, f"{name}: DVC params {st['params']} != the rule's {sorted(declared)}"
        script = REPO / "workflow" / "scripts" / TASK_SCRIPT
        code = set().union(*(code_deps(script, r) for r in [job["rule"]] + extra))
        assert {d for d in st["deps"] if d.startswith("src/")} == code, name
    assert names == set(stages), f"DVC stages without a Snakemake job: {set(stages) - names}"


def with_params(tmp_path: Path, *configs, **extraction) -> Path:
    """A copy of the repository whose params.yaml is the merge of ``configs`` (as Snakemake merges them)."""
    repo = copy_repo(tmp_path / "repo")
    cfg = load_config(*[repo / c for c in configs])
    cfg["extraction"].update(extraction)
    (repo / "params.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    return repo


@pytest.mark.parametrize("configs, extraction", [
    (["params.yaml"], {}),
    (["params.yaml", "config/demo.yaml"], {}),
    (["params.yaml", "config/demo.yaml"], {"shards": 2}),
], ids=["paper", "demo", "demo-2-shards"])  # the demo has experiments (stages of the matrix), the paper none
def test_dvc_stages_are_the_snakemake_jobs(tmp_path, configs, extraction):
    """The drift test: dvc.yaml, resolved by DVC for a configuration, has exactly the jobs of Snakemake's DAG."""
    check_dvc_matches_snakemake(with_params(tmp_path, *configs, **extraction))


def test_changing_models_results_dir_or_shards_needs_no_new_dvc_yaml(tmp_path):
    cfg_changes = {"models": ["sd15", "mini"], "results_dir": "results/elsewhere"}
    repo = with_params(tmp_path, "params.yaml")
    cfg = load_config(repo / "params.yaml")
    cfg.update(cfg_changes)
    cfg["extraction"]["shards"] = 5
    (repo / "params.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    stages = resolved_stages(repo)
    assert {"extract@sd15", "extract@mini", "paper_reference@mini", "cross_model_figure"} <= set(stages)
    assert not {s for s in stages if s.endswith(("@sd21", "@sdturbo"))}
    assert stages["position_probe@mini"]["deps"][0] == "results/elsewhere/mini/representations"
    check_dvc_matches_snakemake(repo)


def test_code_dependencies_are_the_rules_own():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    probe_deps = stages["position_probe"]["do"]["deps"]
    assert "src/diffaudit/analyses/probe.py" in probe_deps
    assert not any(d.startswith("src/diffaudit/extract/") for d in probe_deps)
    # a package's modules reached through its __init__'s relative imports count (diffaudit.extract re-exports)
    extract_deps = stages["extract"].get("do", stages["extract"])["deps"]
    assert {"src/diffaudit/extract/extractor.py", "src/diffaudit/families/registry.py"} <= set(extract_deps)
    # each rule's task is its own module: editing one task re-runs only the stages of that rule (and downstream)
    others = {f"src/diffaudit/pipeline/{p.stem}.py" for p in (REPO / "src/diffaudit/pipeline").glob("*.py")
              if p.stem not in ("position_probe", "common", "__init__")}
    assert not others & set(probe_deps)
    for rule, stage in stages.items():
        body = stage.get("do", stage)
        rule = rule.removesuffix(EXPERIMENT_SUFFIX)  # an experiment's stage runs the same rule
        assert f"src/diffaudit/pipeline/{rule}.py" in body["deps"], rule


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
SNAKEMAKE = (sys.executable, "-m", "snakemake")
TABLES = ("position_probe", "token_group_similarity", "anomaly_rel_norm", "channel_outliers", "credibility")


def demo_repo(tmp_path: Path, experiments=(), size=256, **extraction):
    """A fresh clone of this repository whose params.yaml alone is switched to the demo on 6 images of ``size`` px
    (committed; no `dvc init`, no new dvc.yaml), with only the demo's ``experiments`` named (each costs a run).
    256 px rather than the demo's 512: these tests are about DVC's mechanics, not the numbers; the 45 layers are the
    same, the crop variants are 8/16/32 px rings (the 4x4 maps of 64-px tokens are too small for one). Returns ``(repo, cfg, run)``; ``run(*cmd)`` asserts
    success and returns the output."""
    src = copy_repo(tmp_path / "src")
    subprocess.run(["git", "init", "-q"], cwd=src, check=True)
    subprocess.run(["git", "add", "-A"], cwd=src, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "src"], cwd=src, check=True)
    repo = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", str(src), str(repo)], check=True)
    cfg = load_config(repo / "params.yaml", repo / "config" / "demo.yaml")
    cfg["models"] = ["mini"]  # DVC's mechanics on the first embedded model (the demo itself runs mini-cal)
    cfg["harm"]["enabled"] = False  # its stages still run (empty), as DVC runs them; the demo test measures harm
    cfg["dataset"]["n_images"] = 6
    cfg["dataset"]["size"] = size
    cfg["experiments"] = {name: cfg["experiments"][name] for name in experiments}
    cfg["extraction"].update(extraction)
    (repo / "params.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    def run(*cmd):
        proc = subprocess.run(cmd, cwd=repo, env=ENV, capture_output=True, text=True)
        assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        return proc.stdout + proc.stderr

    assert (repo / ".dvc" / "config").is_file()  # the clone is a DVC repository as it is
    run("git", "add", "-A")
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "demo")
    return repo, cfg, run


@pytest.mark.slow
def test_dvc_repro_on_the_demo(tmp_path):
    """From scratch, then nothing to do, then one parameter re-runs only its analysis and what reads it."""
    repo, cfg, run = demo_repo(tmp_path, experiments=("circular_independent",))
    first = run("dvc", "repro")
    assert "Running stage 'extract@mini'" in first and "Running stage 'cross_model_figure'" in first
    assert "Running stage 'extract_experiment@mini-circular_independent'" in first
    assert "Running stage 'experiment_comparison@mini'" in first
    assert "Nothing to be done" in run(sys.executable, "-m", "snakemake", "-n")
    # the paper's quantities as DVC plots, from the tidy per-layer summary (and the figures as images)
    shown = json.loads(subprocess.run(["dvc", "plots", "show", "--json"], cwd=repo, env=ENV, check=True,
                                      capture_output=True, text=True).stdout)
    plot = shown["data"]["results/demo/layer_summary/mini.csv"][0]
    assert plot["type"] == "vega" and len(plot["content"]["data"]["values"]) >= 45  # one per layer
    assert not shown.get("errors"), shown.get("errors")
    assert any(k.endswith("quantitative_mini.png") for k in shown["data"])
    assert "Running stage" not in run("dvc", "repro")
    assert "up to date" in run("dvc", "status")
    run("git", "add", "-A")
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "results")  # dvc.lock
    cfg["probe"]["epochs"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    ran = set(re.findall(r"Running stage '([^']+)'", run("dvc", "repro")))
    experiments = {f"{stage}_experiment@mini-{name}" for name in cfg["experiments"]
                   for stage in ("position_probe", "run_summary")}  # the demo's experiments are probed too
    # the harm stage reads the probe's settings too (its mitigated probe), and the validation reads credibility.csv
    assert experiments and ran == {"position_probe@mini", "credibility@mini", "quantitative_figure@mini",
                                   "paper_comparison@mini", "cross_model_figure", "run_summary@mini",
                                   "experiment_comparison@mini", "harm@mini",
                                   "credibility_validation@mini"} | experiments
    # browsing versions: the committed revision and the workspace side by side
    diff = json.loads(subprocess.run(["dvc", "plots", "diff", "HEAD", "--json"], cwd=repo, env=ENV, check=True,
                                     capture_output=True, text=True).stdout)
    values = diff["data"]["results/demo/layer_summary/mini.csv"][0]["content"]["data"]["values"]
    revs = {v["rev"] for v in values}
    assert revs == {"HEAD", "workspace"}, revs
    by_rev = {r: [v for v in values if v["rev"] == r] for r in revs}
    assert len(by_rev["HEAD"]) == len(by_rev["workspace"]) >= 45


@pytest.mark.slow
def test_snakemake_first_then_dvc_commit_and_checkout_recovery(tmp_path):
    """The Snakemake-first flow: `snakemake`, then `dvc commit` leaves `dvc status` clean. After checking out an
    older revision (`git checkout` + `dvc checkout`), Snakemake's own records are stale; `snakemake --touch`
    makes them current (README, Reproducing with DVC)."""
    repo, cfg, run = demo_repo(tmp_path)
    git_commit = ("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm")
    run(*SNAKEMAKE, "--cores", "2")
    assert "Data and pipelines are up to date" not in run("dvc", "status")  # nothing recorded yet
    run("dvc", "commit", "-f")
    assert "Data and pipelines are up to date" in run("dvc", "status")
    assert "Running stage" not in run("dvc", "repro")
    run("git", "add", "-A")
    run(*git_commit, "epochs 5")
    first = (repo / "results" / "demo" / "mini" / "position_probe.csv").read_bytes()

    cfg["probe"]["epochs"] = 2  # a second revision with another probe
    (repo / "params.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    run(*SNAKEMAKE, "--cores", "2")
    run("dvc", "commit", "-f")
    run("git", "add", "-A")
    run(*git_commit, "epochs 2")

    run("git", "checkout", "HEAD~1", "--", "params.yaml", "dvc.lock")  # back to the first revision
    run("dvc", "checkout")
    assert (repo / "results" / "demo" / "mini" / "position_probe.csv").read_bytes() == first
    assert "Data and pipelines are up to date" in run("dvc", "status")
    assert "params have changed since last execution" in run(*SNAKEMAKE, "-n")  # Snakemake's records: epochs 2
    run(*SNAKEMAKE, "--cores", "1", "--touch")
    assert "Nothing to be done" in run(*SNAKEMAKE, "-n")
    assert (repo / "results" / "demo" / "mini" / "position_probe.csv").read_bytes() == first
    assert "Data and pipelines are up to date" in run("dvc", "status")


@pytest.mark.slow
def test_kill_9_during_dvc_repro_then_rerun(tmp_path):
    """kill -9 of the whole `dvc repro` process group mid-extraction; a plain second `dvc repro` resumes the
    partial stores and gives the tables of an uninterrupted run."""
    import pandas as pd

    repo, cfg, run = demo_repo(tmp_path, batch_size=2)
    n = kill_mid_extraction(["dvc", "repro"], repo, ENV, after_images=2,
                            partial_store=repo / "results" / "demo" / "mini" / "representations.partial" / "full.zarr")
    assert 2 <= n < 6, f"the kill came too late or never (n_complete={n})"
    assert not (repo / "results" / "demo" / "mini" / "representations").exists()

    second = run("dvc", "repro")
    assert "Running stage 'extract@mini'" in second and "Running stage 'cross_model_figure'" in second
    assert "Data and pipelines are up to date" in run("dvc", "status")
    assert "Nothing to be done" in run(*SNAKEMAKE, "-n")
    # the same tables as an uninterrupted run (Snakemake into another results_dir, same params; only the tables
    # compared, not the figures)
    run(*SNAKEMAKE, "--cores", "2", "--config", "results_dir=results/reference", "--",
        *[f"results/reference/mini/{name}.csv" for name in TABLES])
    for name in TABLES:
        pd.testing.assert_frame_equal(pd.read_csv(repo / "results" / "reference" / "mini" / f"{name}.csv"),
                                      pd.read_csv(repo / "results" / "demo" / "mini" / f"{name}.csv"),
                                      check_exact=True, obj=name)
