"""Rule ``build_mini``: an embedded offline model (``mini``, ``mini-sdxl``, ``mini-sd3``, ``mini-flux``), saved with
``save_pretrained``."""
from __future__ import annotations

from pathlib import Path

from . import common


def run(cfg: dict, out_dir: str | Path, name: str = "mini") -> Path:
    from ..models import save_embedded_model

    return save_embedded_model(name, out_dir, seed=int(cfg["mini"]["seed"]))


def from_snakemake(smk):
    return run(common.task_config(smk), smk.output[0], smk.wildcards.embedded)
