"""Rule ``token_group_similarity``: corner/border/other similarity ratios per layer."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from . import common


def run(cfg: dict, model: str, rep_dirs: str | Path | list, out_csv: str | Path) -> Path:
    from ..analyses.similarity import token_group_similarity
    from ..store import open_model_stores

    full, crops = open_model_stores(rep_dirs)
    if not crops:
        raise UserError(f"{full.path} has no cropped variants; set extraction.crops: true and re-extract")
    layers = sorted(set().union(*(c.layers for c in crops.values())), key=full.layers.index)
    df = token_group_similarity(full, crops, layers=layers, mode=cfg["similarity"]["mode"],
                                image_size=int(cfg["dataset"]["size"]),
                                chunk_images=cfg["similarity"]["chunk_images"], model_name=model)
    return common.write_csv(df, out_csv)


def from_snakemake(smk):
    return run(common.task_config(smk), smk.wildcards.model, list(smk.input.rep), smk.output[0])
