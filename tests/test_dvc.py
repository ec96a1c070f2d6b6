"""DVC mirrors the Snakemake DAG: the committed dvc.yaml is what the generator makes, and `dvc repro` works."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, copy_repo
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
            tracked = stage.get("outs", []) + stage.get("plots", []) + [next(iter(m)) for m in stage.get("metrics", [])]
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


@pytest.mark.slow
def test_dvc_repro_on_the_demo(tmp_path):
    """From scratch, then nothing to do, then one parameter re-runs only its analysis and what reads it."""
    repo = copy_repo(tmp_path / "repo")
    cfg = load_config(repo / "params.yaml", repo / "config" / "demo.yaml")
    cfg["dataset"]["n_images"] = 6
    (repo / "params.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (repo / "dvc.yaml").write_text(render(["params.yaml"], root=repo))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    def run(*cmd):
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        return proc.stdout + proc.stderr

    run("git", "init", "-q")
    run("dvc", "init", "-q")
    run("git", "add", "-A")
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "demo")
    first = run("dvc", "repro")
    assert "Running stage 'extract-mini'" in first and "Running stage 'cross_model_figure'" in first
    assert "Nothing to be done" in run(sys.executable, "-m", "snakemake", "-n")
    # the paper's three panels as DVC plots, from the tidy per-layer summary (and the figures as images)
    shown = json.loads(subprocess.run(["dvc", "plots", "show", "--json"], cwd=repo, env=env, check=True,
                                      capture_output=True, text=True).stdout)
    for name in ("probe_accuracy-mini", "corner_border_ratio-mini", "anomaly_rel_norm-mini"):
        plot = shown["data"][name][0]
        assert plot["type"] == "vega" and len(plot["content"]["data"]["values"]) >= 45, name  # one per layer and y
    assert not shown.get("errors"), shown.get("errors")
    assert any(k.endswith("quantitative_mini.png") for k in shown["data"])
    assert "Running stage" not in run("dvc", "repro")
    assert "up to date" in run("dvc", "status")
    cfg["probe"]["epochs"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    ran = set(re.findall(r"Running stage '([^']+)'", run("dvc", "repro")))
    assert ran == {"position_probe-mini", "credibility-mini", "quantitative_figure-mini", "cross_model_figure"}
