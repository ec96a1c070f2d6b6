"""Rule ``channel_outliers``: channels of extreme magnitude (massive activations) per layer."""
from __future__ import annotations

from pathlib import Path

from . import common


def run(cfg: dict, model: str, rep_dirs: str | Path | list, out_csv: str | Path) -> Path:
    from ..analyses.channels import channel_outliers
    from ..store import open_model_stores

    full, _ = open_model_stores(rep_dirs)
    df = channel_outliers(full, model_name=model, ratio_threshold=cfg["channels"]["ratio_threshold"])
    return common.write_csv(df, out_csv)


def from_snakemake(smk):
    return run(common.task_config(smk), smk.wildcards.model, list(smk.input.rep), smk.output[0])
