"""Rule ``run_summary``: one run (the baseline or an experiment) reduced to the per-layer quantities of the
paper's three panels with their bootstrap intervals (:func:`diffaudit.analyses.comparison.run_summary`)."""
from __future__ import annotations

from pathlib import Path

from . import common


def _read(path):
    import pandas as pd

    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return None


def run(cfg: dict, probe_summary: str | Path, similarity: str | Path, anomalies: str | Path,
        out_csv: str | Path) -> Path:
    from ..analyses.comparison import run_summary

    summary = run_summary(_read(probe_summary), _read(similarity), _read(anomalies),
                          interior_k=int(cfg["probe"]["interior_k"]))
    return common.write_csv(summary, out_csv)


def from_snakemake(smk):
    return run(common.task_config(smk), *smk.input, smk.output[0])
