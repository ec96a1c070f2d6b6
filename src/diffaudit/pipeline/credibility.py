"""Rule ``credibility``: per-layer hazard scores, and the per-layer summary that ``dvc plots`` draws."""
from __future__ import annotations

from pathlib import Path

from . import common


def run(cfg: dict, model: str, table_dir: str | Path, out_csv: str | Path,
        summary_csv: str | Path | None = None) -> Path:
    """The per-layer hazard scores, and (``summary_csv``) the figure's quantities one row per layer."""
    from ..analyses.credibility import credibility as score
    from ..analyses.paper_comparison import per_layer_quantities

    t = common.read_tables(table_dir)
    df = score(t["position_probe"], t["token_group_similarity"], t["anomaly_rel_norm"], t["channel_outliers"],
               model=model, safe_threshold=cfg["credibility"]["safe_below"])
    if summary_csv is not None:
        common.write_csv(per_layer_quantities(t), summary_csv)
    return common.write_csv(df, out_csv)


def from_snakemake(smk):
    return run(common.task_config(smk), smk.wildcards.model, Path(smk.input[0]).parent, smk.output.table, smk.output.summary)
