"""Rule ``build_mini``: the embedded offline model, saved with ``save_pretrained``."""
from __future__ import annotations

from pathlib import Path

from . import common


def run(cfg: dict, out_dir: str | Path) -> Path:
    from ..models import save_mini_model

    return save_mini_model(out_dir, seed=int(cfg["mini"]["seed"]))


def from_snakemake(smk):
    return run(common.task_config(smk), smk.output[0])
