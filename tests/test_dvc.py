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
from diffaudit.dvcgen import render, snakemake_jobs, stage_name


def test_committed_dvc_yaml_matches_the_snakemake_dag():
    committed = (REPO / "dvc.yaml").read_text()
    assert committed == render(["params.yaml"], root=REPO), (
        "dvc.yaml is out of date with the Snakemake workflow; regenerate it with `diffaudit dvc-yaml > dvc.yaml`")


def test_every_rule_has_stages_and_every_output_is_tracked():
    rules = set(re.findall(r"^rule (\w+):", "\n".join(p.read_text() for p in (REPO / "workflow" / "rules").glob("*.smk")),
                           re.M))
    stages = {}
    for cfgs in (["params.yaml"], ["params.yaml", "config/demo.yaml"]):
        jobs = snakemake_jobs([REPO / c for c in cfgs], snakefile=REPO / "Snakefile")
        gen = yaml.safe_load(render(cfgs, root=REPO))["stages"]
        for job in jobs:
            name = stage_name(job)
            stage = gen[name]
            tracked = [o if isinstance(o, str) else next(iter(o))
                       for o in stage.get("outs", []) + stage.get("plots", []) + stage.get("metrics", [])]
            assert sorted(tracked) == sorted(job["outputs"]), name
            assert f"--allowed-rules {job['rule']} " in stage["cmd"]
        stages.update(gen)
    assert {name.split("-")[0] for name in stages} == rules  # no rule is missing on either side


def test_stage_params_are_config_sections():
    cfg = load_config(REPO / "params.yaml")
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for key in stage.get("params", []):
            node = cfg
            for part in key.split("."):
                assert part in node, f"{name}: params key {key} not in params.yaml"
                node = node[part]
    assert stages["extract-sd15"]["params"] == ["layers", "extraction", "model_sources.sd15"]
    # code dependencies are the modules the rule's task reaches, not the whole package
    probe_deps = stages["position_probe-sd15"]["deps"]
    assert "src/diffaudit/analyses/probe.py" in probe_deps and "src/diffaudit/extract.py" not in probe_deps
    # each rule's task is its own module: editing one task re-runs only the stages of that rule (and downstream)
    assert "src/diffaudit/pipeline/position_probe.py" in probe_deps
    others = {f"src/diffaudit/pipeline/{p.stem}.py" for p in (REPO / "src/diffaudit/pipeline").glob("*.py")
              if p.stem not in ("position_probe", "common", "__init__")}
    assert not others & set(probe_deps)
    for name, stage in stages.items():
        rule = name.split("-")[0]
        assert f"src/diffaudit/pipeline/{rule}.py" in stage["deps"], name


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
SNAKEMAKE = (sys.executable, "-m", "snakemake")
TABLES = ("position_probe", "token_group_similarity", "anomaly_rel_norm", "channel_outliers", "credibility")


def demo_repo(tmp_path: Path, **extraction):
    """A git + DVC repository copied from this one, with params.yaml = the demo on 6 images (dvc.yaml regenerated
    for it, committed). Returns ``(repo, cfg, run)``; ``run(*cmd)`` asserts success and returns the output."""
    repo = copy_repo(tmp_path / "repo")
    cfg = load_config(repo / "params.yaml", repo / "config" / "demo.yaml")
    cfg["dataset"]["n_images"] = 6
    cfg["extraction"].update(extraction)
    (repo / "params.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (repo / "dvc.yaml").write_text(render(["params.yaml"], root=repo))

    def run(*cmd):
        proc = subprocess.run(cmd, cwd=repo, env=ENV, capture_output=True, text=True)
        assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        return proc.stdout + proc.stderr

    run("git", "init", "-q")
    run("dvc", "init", "-q")
    run("git", "add", "-A")
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "demo")
    return repo, cfg, run


@pytest.mark.slow
def test_dvc_repro_on_the_demo(tmp_path):
    """From scratch, then nothing to do, then one parameter re-runs only its analysis and what reads it."""
    repo, cfg, run = demo_repo(tmp_path)
    first = run("dvc", "repro")
    assert "Running stage 'extract-mini'" in first and "Running stage 'cross_model_figure'" in first
    assert "Nothing to be done" in run(sys.executable, "-m", "snakemake", "-n")
    # the paper's three panels as DVC plots, from the tidy per-layer summary (and the figures as images)
    shown = json.loads(subprocess.run(["dvc", "plots", "show", "--json"], cwd=repo, env=ENV, check=True,
                                      capture_output=True, text=True).stdout)
    for name in ("probe_accuracy-mini", "corner_border_ratio-mini", "anomaly_rel_norm-mini"):
        plot = shown["data"][name][0]
        assert plot["type"] == "vega" and len(plot["content"]["data"]["values"]) >= 45, name  # one per layer and y
    assert not shown.get("errors"), shown.get("errors")
    assert any(k.endswith("quantitative_mini.png") for k in shown["data"])
    assert "Running stage" not in run("dvc", "repro")
    assert "up to date" in run("dvc", "status")
    run("git", "add", "-A")
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "results")  # dvc.lock
    cfg["probe"]["epochs"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    ran = set(re.findall(r"Running stage '([^']+)'", run("dvc", "repro")))
    assert ran == {"position_probe-mini", "credibility-mini", "quantitative_figure-mini", "cross_model_figure"}
    # browsing versions: the committed revision and the workspace side by side
    diff = json.loads(subprocess.run(["dvc", "plots", "diff", "HEAD", "--json"], cwd=repo, env=ENV, check=True,
                                     capture_output=True, text=True).stdout)
    values = diff["data"]["probe_accuracy-mini"][0]["content"]["data"]["values"]
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
    assert "Running stage 'extract-mini'" in second and "Running stage 'cross_model_figure'" in second
    assert "Data and pipelines are up to date" in run("dvc", "status")
    assert "Nothing to be done" in run(*SNAKEMAKE, "-n")
    # the same tables as an uninterrupted run (Snakemake into another results_dir, same params)
    run(*SNAKEMAKE, "--cores", "2", "--config", "results_dir=results/reference")
    for name in TABLES:
        pd.testing.assert_frame_equal(pd.read_csv(repo / "results" / "reference" / "mini" / f"{name}.csv"),
                                      pd.read_csv(repo / "results" / "demo" / "mini" / f"{name}.csv"),
                                      check_exact=True, obj=name)
