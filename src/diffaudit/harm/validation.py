"""Is the credibility score right? Its axes against the measured harm, across layers.

For every credibility axis (``position_score``, ``corner_score``, ``anomaly_score`` and ``hazard``, their maximum)
and every harm metric under mitigation ``none`` (``mismatch`` = 1 - pck, ``position_following``, ``hub_ratio``),
per task: the Spearman rank correlation over the layers where both are measured, with a percentile bootstrap
interval over layers (layers drawn with replacement; a resample whose values are all tied has no correlation and
is left out). Layers are not independent draws (neighbouring layers share their input), so the interval is a
guide to the spread, not an exact coverage statement. A positive correlation means: the higher the score, the
more harm (for ``mismatch``: the more wrong matches)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..analyses.bootstrap import Bootstrap
from ..tables import CREDIBILITY_VALIDATION_COLUMNS

AXES = {"position": "position_score", "corner": "corner_score", "anomaly": "anomaly_score", "hazard": "hazard"}
HARM_METRICS = {"mismatch": ("pck", True), "position_following": ("position_following", False),
                "hub_ratio": ("hub_ratio", False)}
COLUMNS = CREDIBILITY_VALIDATION_COLUMNS
#: Fewest layers for a correlation.
MIN_LAYERS = 4


def _ranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x, axis=-1)


def spearman(x, y) -> float:
    """Spearman's rank correlation of two 1-D arrays (average ranks for ties); NaN when either is constant."""
    rx, ry = _ranks(np.asarray(x, float)), _ranks(np.asarray(y, float))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = np.sqrt((rx ** 2).sum() * (ry ** 2).sum())
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def spearman_interval(x, y, boot: Bootstrap) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`spearman` over the pairs (layers), resampled with replacement."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    rng = np.random.default_rng(boot.seed)
    idx = rng.integers(0, x.size, size=(boot.n_resamples, x.size))
    rx, ry = _ranks(x[idx]), _ranks(y[idx])
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    den = np.sqrt((rx ** 2).sum(axis=1) * (ry ** 2).sum(axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(den > 0, (rx * ry).sum(axis=1) / np.where(den > 0, den, 1), np.nan)
    lo, hi = boot.interval(r)
    return float(lo), float(hi)


def validate(credibility: pd.DataFrame, harm: pd.DataFrame, boot: Bootstrap | None = None,
             axes: dict[str, str] = AXES) -> pd.DataFrame:
    """The table :data:`COLUMNS`: one row per axis, harm metric and task (module docstring)."""
    boot = boot or Bootstrap()
    rows = []
    if harm is None or harm.empty or credibility is None or credibility.empty:
        return pd.DataFrame(rows, columns=COLUMNS)
    none = harm[harm["mitigation"] == "none"]
    for task in none["task"].drop_duplicates():
        for metric, (source, flip) in HARM_METRICS.items():
            h = none[(none["task"] == task) & (none["metric"] == source)][["layer", "value"]]
            if flip:
                h = h.assign(value=1.0 - h["value"])
            for axis, col in axes.items():
                if col not in credibility.columns:
                    continue
                d = credibility[["layer", col]].merge(h, on="layer").dropna()
                d = d[np.isfinite(d[col].astype(float)) & np.isfinite(d["value"].astype(float))]
                x, y = d[col].to_numpy(float), d["value"].to_numpy(float)
                note, r, lo, hi = "", np.nan, np.nan, np.nan
                if len(d) < MIN_LAYERS:
                    note = f"{len(d)} layers with both values (fewer than {MIN_LAYERS})"
                elif np.ptp(x) == 0:
                    note = f"the {axis} axis is the same on every layer ({x[0]:g}): no correlation defined"
                elif np.ptp(y) == 0:
                    note = f"{metric} is the same on every layer ({y[0]:g}): no correlation defined"
                else:
                    r = spearman(x, y)
                    lo, hi = spearman_interval(x, y, boot)
                rows.append({"axis": axis, "harm_metric": metric, "task": task, "spearman": r, "ci_low": lo,
                             "ci_high": hi, "n_layers": int(len(d)), "note": note})
    return pd.DataFrame(rows, columns=COLUMNS)
