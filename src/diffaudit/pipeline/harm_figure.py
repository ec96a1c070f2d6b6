"""Rule ``harm_figure``: pck and position_following per layer and task, without and with each mitigation
(:func:`diffaudit.figures.harm.harm_figure`)."""
from __future__ import annotations

from pathlib import Path

from . import common


def run(model: str, harm_csv: str | Path, out_png: str | Path) -> Path:
    from ..figures.harm import harm_figure

    harm_figure(common.read_table(harm_csv), common.stem(out_png), model=model)
    return Path(out_png)


def from_snakemake(smk):
    return run(smk.wildcards.model, smk.input[0], smk.output.png)
