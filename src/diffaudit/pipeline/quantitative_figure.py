"""Rule ``quantitative_figure``: the paper's three-panel figure for one model."""
from __future__ import annotations

from pathlib import Path

from . import common


def run(cfg: dict, model: str, table_dir: str | Path, out_stem: str | Path) -> None:
    from ..figures.quantitative import plot_quantitative

    t = common.read_tables(table_dir)
    plot_quantitative(t["position_probe"], t["token_group_similarity"], t["anomaly_rel_norm"], out_stem, model=model)


def from_snakemake(smk):
    return run(common.task_config(smk), smk.wildcards.model, Path(smk.input[0]).parent, common.stem(smk.output[0]))
