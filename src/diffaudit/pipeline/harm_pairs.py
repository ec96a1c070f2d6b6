"""Rule ``harm_pairs``: the harm tasks' image pairs (flip, shift, stereo) from the run's images
(:func:`diffaudit.harm.pairs.build_pairs`); the flip and shift sources are the position probe's first test images
(:func:`diffaudit.harm.evaluate.harm_images`), so the mitigations, fitted on its training images, never see them.
With ``harm.enabled: false`` the folder holds no pair (the later harm rules then write empty tables)."""
from __future__ import annotations

from pathlib import Path

from . import common


def run(cfg: dict, dataset_dir: str | Path, out_dir: str | Path) -> Path:
    from ..harm.evaluate import harm_images
    from ..harm.pairs import build_pairs

    h = cfg["harm"]
    tasks = list(h["tasks"]) if h["enabled"] else []
    _, images = harm_images(int(cfg["dataset"]["n_images"]), cfg["probe"], int(h["n_images"]))
    if not tasks:
        images = []
    return build_pairs(dataset_dir, out_dir, tasks=tasks, images=[int(i) for i in images], shift=float(h["shift"]))


def from_snakemake(smk):
    return run(common.task_config(smk), smk.input.dataset, smk.output[0])
