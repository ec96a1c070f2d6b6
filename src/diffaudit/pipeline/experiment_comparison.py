"""Rule ``experiment_comparison``: the runs of one model (baseline first, then each experiment) in
``experiments.csv`` and the experiments figure (the paper's three panels, every run overlaid with its bands)."""
from __future__ import annotations

from pathlib import Path

from . import common


def run(cfg: dict, model: str, summary_csvs: list[str | Path], out_csv: str | Path, out_stem: str | Path) -> Path:
    import pandas as pd

    from ..analyses.comparison import compare
    from ..figures.experiments import plot_experiments

    summaries = {Path(p).stem: pd.read_csv(p) for p in summary_csvs}
    table = compare(model, summaries, dict(cfg["experiments"]))
    common.write_csv(table, out_csv)
    n = len(cfg["experiments"])
    title = (f"{model}: baseline only (no experiments configured); bands: 95% bootstrap intervals over images"
             if not n else None)
    plot_experiments(table, out_stem, model=model, title=title)
    return Path(out_csv)


def from_snakemake(smk):
    return run(common.task_config(smk), smk.wildcards.model, list(smk.input), smk.output.table,
               common.stem(smk.output.figure[0]))
