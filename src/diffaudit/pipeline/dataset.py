"""Rule ``dataset``: the image set (images/*.png, index.csv, dataset.json)."""
from __future__ import annotations

from pathlib import Path

from . import common


def run(cfg: dict, out_dir: str | Path) -> Path:
    from ..datasets import build_dataset

    return build_dataset(cfg["dataset"], out_dir)


def from_snakemake(smk):
    return run(common.task_config(smk), smk.output[0])
