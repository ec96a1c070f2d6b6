"""Rule ``run_summary``: one run (the baseline or an experiment) reduced to the per-layer quantities of the
paper's three panels with their bootstrap intervals (:func:`diffaudit.analyses.comparison.run_summary`), and for
an experiment its paired differences to the baseline, from both runs' per-image aggregates."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from . import common


def _read(path):
    import pandas as pd

    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return None


def _read_all(paths: Sequence[str | Path] | None):
    """The per-image aggregates of a run's analyses in one table (None when no path is given)."""
    import pandas as pd

    from ..analyses.paired import read_table

    if not paths:
        return None
    frames = [f for f in (read_table(p) for p in paths) if f is not None and not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def run(cfg: dict, probe_summary: str | Path, similarity: str | Path, anomalies: str | Path,
        out_csv: str | Path, per_image: Sequence[str | Path] | None = None,
        base_per_image: Sequence[str | Path] | None = None) -> Path:
    """``per_image``: the run's per-image tables; ``base_per_image``: the baseline's (an experiment only: then the
    summary holds the paired differences to the baseline)."""
    from ..analyses.bootstrap import Bootstrap
    from ..analyses.comparison import run_summary

    summary = run_summary(_read(probe_summary), _read(similarity), _read(anomalies),
                          interior_k=int(cfg["probe"]["interior_k"]), per_image=_read_all(per_image),
                          base_per_image=_read_all(base_per_image),
                          bootstrap=Bootstrap.from_config(cfg["bootstrap"]))
    return common.write_csv(summary, out_csv)


def from_snakemake(smk):
    i = smk.input
    base = list(i.base_per_image) if "base_per_image" in i.keys() else []
    return run(common.task_config(smk), i.probe, i.similarity, i.anomalies, smk.output[0],
               per_image=list(i.per_image), base_per_image=base or None)
