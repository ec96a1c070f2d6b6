"""Rule ``cross_model_figure``: every model's panels overlaid, from the per-layer summaries
(``layer_summary/{model}.csv``, written by rule ``credibility``)."""
from __future__ import annotations

from pathlib import Path

from . import common


def run(summaries: dict[str, str | Path], out_stem: str | Path) -> None:
    import pandas as pd

    from ..figures.cross_model import plot_cross_model, tables_from_summary

    plot_cross_model({m: tables_from_summary(pd.read_csv(p)) for m, p in summaries.items()}, out_stem)


def from_snakemake(smk):
    return run({Path(p).stem: p for p in smk.input}, common.stem(smk.output[0]))
