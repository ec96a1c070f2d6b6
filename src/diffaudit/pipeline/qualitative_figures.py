"""Rule ``qualitative_figures``: token similarity, corner similarity, norm maps (with the hand labels in use:
the authors' where they apply to this run, else a user's label file) and PCA-RGB views of one model."""
from __future__ import annotations

from pathlib import Path

from ..label_sources import label_sources
from . import common


def run(cfg: dict, model: str, rep_dirs: str | Path | list, dataset_dir: str | Path, out_dir: str | Path,
        paper_dir: str | Path | None = None) -> None:
    from ..analyses.anomalies import load_label_file
    from ..figures.qualitative import render_all
    from ..store import open_model_stores

    full, _ = open_model_stores(rep_dirs)
    sources, _ = label_sources(cfg["anomalies"], model, paper_dir)
    hand = [p for p in sources.values() if p is not None]
    labels = load_label_file(hand[0], n_images=full.n_images) if hand else None
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    render_all(full, dataset_dir, out_dir, labels=labels)


def from_snakemake(smk):
    return run(common.task_config(smk), smk.wildcards.model, list(smk.input.rep), smk.input.dataset,
               Path(smk.output[0]).parent, paper_dir=smk.input.paper)
