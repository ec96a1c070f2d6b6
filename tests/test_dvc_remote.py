"""Results travel through a DVC remote: compute once, `dvc push`, then a fresh `git clone` + `dvc pull`
gets the same bytes, and neither DVC nor Snakemake wants to recompute anything there."""
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import copy_repo
from diffaudit.config import load_config

pytestmark = pytest.mark.slow


def tracked_outputs(root: Path) -> tuple[list[str], list[str]]:
    """All outputs of the stages as DVC resolves dvc.yaml (outs, metrics, plots), and those kept out of the DVC
    cache (cache: false)."""
    from dvc.repo import Repo

    every, uncached = [], []
    with Repo(str(root)) as repo:
        for stage in repo.index.stages:
            for out in stage.outs:
                every.append(out.def_path)
                if not out.use_cache:
                    uncached.append(out.def_path)
    return every, uncached


def digests(root: Path, outputs: list[str]) -> dict[str, str]:
    """sha256 of every file of the outputs (directories walked), by path relative to ``root``."""
    out = {}
    for o in outputs:
        p = root / o
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        assert files, f"{o} is missing or empty under {root}"
        for f in files:
            out[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def test_push_then_pull_into_a_fresh_clone(tmp_path):
    origin = copy_repo(tmp_path / "origin")
    cfg = load_config(origin / "params.yaml", origin / "config" / "demo.yaml")
    cfg["models"] = ["mini"]  # moving results on the first embedded model (the demo itself runs mini-cal)
    cfg["dataset"]["n_images"] = 6
    cfg["dataset"]["size"] = 256  # small images: this test is about moving results, not about the numbers
    cfg["experiments"] = {"circular": cfg["experiments"]["circular"]}  # one experiment's outputs move too
    (origin / "params.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    store = tmp_path / "dvc-store"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}

    def run(cwd: Path, *cmd: str) -> str:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        return proc.stdout + proc.stderr

    # --- compute and push -------------------------------------------------------------------
    run(origin, "git", "init", "-q")  # the repository carries .dvc/: no `dvc init`
    run(origin, "git", "add", "-A")
    run(origin, "git", "commit", "-qm", "demo")
    assert "Running stage 'extract@mini'" in run(origin, "dvc", "repro")
    run(origin, "dvc", "remote", "add", "-d", "store", str(store))
    outputs, uncached = tracked_outputs(origin)
    assert not uncached  # every output (metrics too) goes through the DVC cache: results/ is git-ignored
    run(origin, "git", "add", "-A")
    run(origin, "git", "commit", "-qm", "results")
    pushed = run(origin, "dvc", "push")
    m = re.search(r"(\d+) files? pushed", pushed)
    assert m and int(m[1]) > 0, pushed
    assert "Everything is up to date" in run(origin, "dvc", "push")  # nothing left behind
    expected = digests(origin, outputs)

    # --- a fresh clone, from the remote alone ------------------------------------------------------
    clone = tmp_path / "clone"
    run(tmp_path, "git", "clone", "-q", str(origin), str(clone))
    shutil.rmtree(origin / ".dvc" / "cache")  # so the only source of the data is the remote
    assert not (clone / "results").exists() or not any((clone / "results").rglob("*.png"))
    remotes = run(clone, "dvc", "remote", "list").split()
    assert remotes[:2] == ["store", str(store)], remotes  # configured through git (.dvc/config)
    run(clone, "dvc", "remote", "modify", "--local", "store", "url", str(store))  # or point it at your own mount
    pulled = run(clone, "dvc", "pull")
    assert re.search(r"\d+ files? (fetched|added)", pulled), pulled

    got = digests(clone, outputs)
    assert got == expected  # same files, byte for byte
    results = clone / "results" / "demo"
    figures = sorted(p.relative_to(results).as_posix() for p in (results / "figures").rglob("*.png"))
    assert "figures/quantitative_mini.png" in figures and "figures/cross_model.png" in figures
    assert len(figures) >= 6
    for table in ["position_probe", "token_group_similarity", "anomaly_rel_norm", "channel_outliers", "credibility"]:
        assert (results / "mini" / f"{table}.csv").stat().st_size > 0, table

    # --- nothing to recompute ---------------------------------------------------------------------
    status = run(clone, "dvc", "status")
    assert "Data and pipelines are up to date" in status, status
    repro = run(clone, "dvc", "repro")
    assert "Running stage" not in repro, repro
    assert digests(clone, outputs) == expected
    # Snakemake has no run records in a clone: --touch adopts the pulled files, then there is nothing to do
    run(clone, sys.executable, "-m", "snakemake", "--cores", "1", "--touch")
    assert "Nothing to be done" in run(clone, sys.executable, "-m", "snakemake", "-n")
    assert "Data and pipelines are up to date" in run(clone, "dvc", "status")
