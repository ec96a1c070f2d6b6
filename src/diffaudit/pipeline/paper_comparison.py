"""Rule ``paper_comparison``: our tables next to the authors' published numbers, and the overlay figure."""
from __future__ import annotations

from pathlib import Path

from . import common


def run(cfg: dict, model: str, table_dir: str | Path, out_csv: str | Path, out_stem: str | Path) -> None:
    """The published files are fetched at the pinned commit and sha256-checked (``common.PAPER_CACHE``)."""
    from ..figures.quantitative import plot_quantitative
    from ..reference import compare_with_paper, paper_tables

    t = common.read_tables(table_dir)
    paper = paper_tables(model, common.PAPER_CACHE)
    common.write_csv(compare_with_paper(t, paper), out_csv)
    plot_quantitative(t["position_probe"], t["token_group_similarity"], t["anomaly_rel_norm"], out_stem,
                      model=f"{model}: ours vs paper", reference=paper)


def from_snakemake(smk):
    return run(smk.config, smk.wildcards.model, Path(smk.input[0]).parent, smk.output.table,
               common.stem(smk.output.figure[0]))
