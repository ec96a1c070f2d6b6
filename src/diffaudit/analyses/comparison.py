"""Experiments compared with the baseline: per run, the per-layer quantities of the paper's three panels with
their bootstrap intervals over images; per model, one table of every run.

A *run* is the baseline (the ``extraction`` section) or one experiment (docs/experiments.md). Its summary
(:func:`run_summary`) has one row per layer:

``acc_8x8`` (``_ci_low``, ``_ci_high``)
    the final-epoch ``per_axis`` probe accuracy at the fixed 8 x 8 grid (mean over seeds), chance ``1/min(8, n)``
    (column ``chance_8x8``); ``interior_acc_8x8`` the same on tokens at least ``probe.interior_k`` tokens from the
    border, whose chance level (a guess that knows only that a token is interior) is ``interior_chance_8x8``
``corner_ratio`` (``_ci_low``, ``_ci_high``)
    the corner/border similarity control's corner ratio (cropped image vs full image with the ring removed)
``rel_norm_mean`` (``rel_norm_ci_low``, ``rel_norm_ci_high``)
    the mean relative norm of the anomalies of one label source (paper, else auto, else the first user source:
    ``rel_norm_source``)

The intervals are the analyses' own percentile bootstrap over images (``bootstrap`` in params.yaml).
:func:`compare` stacks the runs of a model, the baseline first, with each experiment's overrides in ``changes``
and every layer at the baseline's ``layer_index`` (an experiment may extract fewer layers).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..layout import BASELINE
from ..tables import EXPERIMENT_COMPARISON_COLUMNS, RUN_SUMMARY_COLUMNS, final_epoch
from .probe import interior_chance_level

#: The probe grid of the comparison (the paper's 8 x 8).
GRID = 8
SOURCE_PREFERENCE = ("paper", "auto")
SUMMARY_COLUMNS = RUN_SUMMARY_COLUMNS  # the schemas live in diffaudit.tables
COMPARISON_COLUMNS = EXPERIMENT_COMPARISON_COLUMNS


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    return df[name] if name in df.columns else pd.Series(np.nan, index=df.index)


def probe_rows(probe: pd.DataFrame | None, interior_k: int = 2) -> pd.DataFrame:
    """``layer, layer_index, spatial, acc_8x8 (+ CI), chance_8x8, interior_acc_8x8`` from a probe summary
    (position_probe_summary.csv), final epoch, ``per_axis`` at granularity 8."""
    cols = ["layer", "layer_index", "spatial", "acc_8x8", "acc_8x8_ci_low", "acc_8x8_ci_high", "chance_8x8",
            "interior_acc_8x8", "interior_chance_8x8"]
    if probe is None or probe.empty:
        return pd.DataFrame(columns=cols)
    df = probe[(probe["metric"] == "per_axis") & (probe["granularity"] == GRID)]
    df = final_epoch(df, ["layer"])
    n = df["spatial"].astype(float)
    return pd.DataFrame({"layer": df["layer"], "layer_index": df["layer_index"], "spatial": df["spatial"],
                         "acc_8x8": df["accuracy"], "acc_8x8_ci_low": _col(df, "ci_low"),
                         "acc_8x8_ci_high": _col(df, "ci_high"), "chance_8x8": 1.0 / np.minimum(GRID, n),
                         "interior_acc_8x8": _col(df, "interior_accuracy"),
                         "interior_chance_8x8": [interior_chance_level(int(s), GRID, interior_k) for s in n]})[cols]


def corner_rows(sim: pd.DataFrame | None) -> pd.DataFrame:
    cols = ["layer", "corner_ratio", "corner_ratio_ci_low", "corner_ratio_ci_high"]
    if sim is None or sim.empty:
        return pd.DataFrame(columns=cols)
    return pd.DataFrame({c: _col(sim, c) for c in cols})


def anomaly_rows(anom: pd.DataFrame | None) -> pd.DataFrame:
    cols = ["layer", "rel_norm_mean", "rel_norm_ci_low", "rel_norm_ci_high", "rel_norm_source"]
    if anom is None or anom.empty or "label_source" not in anom.columns:
        return pd.DataFrame(columns=cols)
    sources = list(dict.fromkeys(anom["label_source"].astype(str)))
    source = next((s for s in SOURCE_PREFERENCE if s in sources), sources[0])
    df = anom[anom["label_source"].astype(str) == source]
    out = pd.DataFrame({c: _col(df, c) for c in cols[:-1]})
    out["rel_norm_source"] = source
    return out


def run_summary(probe: pd.DataFrame | None, sim: pd.DataFrame | None, anom: pd.DataFrame | None,
                interior_k: int = 2) -> pd.DataFrame:
    """One run's per-layer quantities (:data:`SUMMARY_COLUMNS`), in the run's layer order."""
    parts = [probe_rows(probe, interior_k), corner_rows(sim), anomaly_rows(anom)]
    layers = list(dict.fromkeys(layer for p in parts for layer in p["layer"]))
    out = pd.DataFrame({"layer": layers})
    for p in parts:
        out = out.merge(p.drop_duplicates("layer"), on="layer", how="left")
    order = {}
    for t in (probe, sim, anom):
        if t is not None and not t.empty and "layer_index" in t.columns:
            order.update({lay: i for lay, i in zip(t["layer"], t["layer_index"]) if lay not in order})
    out["layer_index"] = [order.get(lay, np.nan) for lay in out["layer"]]
    if "spatial" in out.columns:
        spatial = {}
        for t in (probe, sim, anom):
            if t is not None and not t.empty and "spatial" in t.columns:
                spatial.update({lay: s for lay, s in zip(t["layer"], t["spatial"]) if lay not in spatial})
        out["spatial"] = [spatial.get(lay, np.nan) for lay in out["layer"]]
    out = out.sort_values("layer_index", kind="stable")
    return out.reindex(columns=SUMMARY_COLUMNS).reset_index(drop=True)


def describe_changes(overrides: dict | None) -> str:
    """The switches an experiment changes, ``padding_mode=circular; noise=independent`` (the baseline: empty;
    the scope keys ``layers`` and ``crops`` are not causes and are left out)."""
    from ..experiments import CAUSES

    return "; ".join(f"{k}={v}" for k, v in (overrides or {}).items() if k in CAUSES)


def compare(model: str, summaries: dict[str, pd.DataFrame], experiments: dict[str, dict]) -> pd.DataFrame:
    """The runs of ``model`` in one table (:data:`COMPARISON_COLUMNS`): the baseline first, then the experiments
    in configuration order; every layer at the baseline's ``layer_index`` (layers only an experiment has follow
    the baseline's, in that experiment's order)."""
    base = summaries.get(BASELINE)
    index = {} if base is None else dict(zip(base["layer"], base["layer_index"]))
    names = [BASELINE] + [n for n in experiments if n in summaries]
    frames = []
    for name in names:
        df = summaries[name].copy()
        for lay in df["layer"]:
            if lay not in index:
                index[lay] = max(index.values(), default=-1) + 1
        df["layer_index"] = [index[lay] for lay in df["layer"]]
        df.insert(0, "changes", describe_changes(experiments.get(name)))
        df.insert(0, "experiment", name)
        df.insert(0, "model", model)
        frames.append(df)
    if not frames:
        return pd.DataFrame(columns=COMPARISON_COLUMNS)
    out = pd.concat(frames, ignore_index=True).reindex(columns=COMPARISON_COLUMNS)
    out["layer_index"] = out["layer_index"].astype(np.int64)
    return out
