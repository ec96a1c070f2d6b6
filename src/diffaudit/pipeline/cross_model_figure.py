"""Rule ``cross_model_figure``: every model's panels overlaid."""
from __future__ import annotations

from pathlib import Path

from . import common


def run(cfg: dict, table_dirs: dict[str, str | Path], out_stem: str | Path) -> None:
    from ..figures.quantitative import plot_cross_model

    plot_cross_model({m: common.read_tables(d) for m, d in table_dirs.items()}, out_stem)


def from_snakemake(smk):
    dirs = {Path(p).parent.name: Path(p).parent for p in smk.input}
    return run(smk.config, dirs, common.stem(smk.output[0]))
