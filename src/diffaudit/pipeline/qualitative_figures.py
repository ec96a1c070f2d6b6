"""Rule ``qualitative_figures``: token similarity, corner similarity, norm maps (with the anomaly labels in
use) and PCA-RGB views of one model."""
from __future__ import annotations

from pathlib import Path

from .anomalies import label_sources


def run(cfg: dict, model: str, rep_dirs: str | Path | list, dataset_dir: str | Path, out_dir: str | Path) -> None:
    from ..analyses.anomalies import load_label_file
    from ..figures.qualitative import render_all
    from ..store import open_model_stores

    full, _ = open_model_stores(rep_dirs)
    hand = {s: p for s, p in label_sources(cfg, model).items() if p is not None and Path(p).is_file()}
    labels = load_label_file(next(iter(hand.values())), n_images=full.n_images) if hand else None
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    render_all(full, dataset_dir, out_dir, labels=labels)


def from_snakemake(smk):
    return run(smk.config, smk.wildcards.model, list(smk.input.rep), smk.input.dataset, Path(smk.output[0]).parent)
