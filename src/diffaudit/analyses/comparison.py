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
    the mean relative norm of the anomalies of one label source (``rel_norm_source``): for an experiment the
    baseline's label positions evaluated on the experiment's stores (``baseline:paper``, ``baseline:auto``) where
    that is possible, else, like for the baseline, the run's own labels (paper, else auto, else the first user
    source); ``own_rel_norm_*`` are always the run's own labels (an experiment's own detections)
``<quantity>_diff`` (``_ci_low``, ``_ci_high``) and ``diff_note``
    the experiment minus the baseline with a paired bootstrap interval (the same resampled images on both sides,
    :mod:`diffaudit.analyses.paired`) for ``acc_8x8``, ``interior_acc_8x8``, ``corner_ratio`` and
    ``rel_norm_mean`` (``rel_norm_diff``, at the baseline's labels); empty for the baseline, and empty with the
    reason in ``diff_note`` where the runs cannot be paired

The intervals are the analyses' own percentile bootstrap over images (``bootstrap`` in params.yaml).
:func:`compare` stacks the runs of a model, the baseline first, with each experiment's overrides in ``changes``
and every layer at the baseline's ``layer_index`` (an experiment may extract fewer layers).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..layout import BASELINE
from ..tables import EXPERIMENT_COMPARISON_COLUMNS, PAIRED_COLUMNS, RUN_SUMMARY_COLUMNS, final_epoch
from .bootstrap import Bootstrap
from .paired import BASELINE_PREFIX, GRID, REL_NORM, paired_differences
from .probe import interior_chance_level

SOURCE_PREFERENCE = ("paper", "auto")
SUMMARY_COLUMNS = RUN_SUMMARY_COLUMNS + PAIRED_COLUMNS  # the schemas live in diffaudit.tables
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


def _own_source(anom: pd.DataFrame | None) -> str | None:
    """The run's own label source: paper, else auto, else the first (never one at the baseline's labels)."""
    if anom is None or anom.empty or "label_source" not in anom.columns:
        return None
    sources = [s for s in dict.fromkeys(anom["label_source"].astype(str)) if not s.startswith(BASELINE_PREFIX)]
    return next((s for s in SOURCE_PREFERENCE if s in sources), sources[0] if sources else None)


def anomaly_rows(anom: pd.DataFrame | None, source: str | None = None, prefix: str = "rel_norm") -> pd.DataFrame:
    """``layer, <prefix>_mean, <prefix>_ci_low, <prefix>_ci_high, <prefix>_source`` of one label source of an
    anomaly table (default: the run's own, :func:`_own_source`)."""
    cols = ["layer", f"{prefix}_mean", f"{prefix}_ci_low", f"{prefix}_ci_high", f"{prefix}_source"]
    source = source or _own_source(anom)
    if source is None:
        return pd.DataFrame(columns=cols)
    df = anom[anom["label_source"].astype(str) == source]
    out = pd.DataFrame({new: _col(df, old) for new, old in zip(cols[:-1], ["layer", "rel_norm_mean", "rel_norm_ci_low",
                                                                         "rel_norm_ci_high"])})
    out[cols[-1]] = source
    return out


def run_summary(probe: pd.DataFrame | None, sim: pd.DataFrame | None, anom: pd.DataFrame | None,
                interior_k: int = 2, per_image: pd.DataFrame | None = None,
                base_per_image: pd.DataFrame | None = None, bootstrap: Bootstrap | None = None) -> pd.DataFrame:
    """One run's per-layer quantities (:data:`SUMMARY_COLUMNS`), in the run's layer order.

    ``rel_norm_*`` are at the baseline's label positions (source ``baseline:<the baseline's source>``) where the
    run was evaluated there, else the run's own labels; ``own_rel_norm_*`` always the run's own. For an experiment
    (``base_per_image``: the baseline's per-image aggregates; ``per_image``: the run's) the ``*_diff`` columns are
    its paired differences to the baseline (:func:`diffaudit.analyses.paired.paired_differences`, ``bootstrap``
    default ``Bootstrap()``); the baseline's (``base_per_image`` None) are empty."""
    own_source = _own_source(anom)
    base_source = paired_source = None
    if base_per_image is not None and not base_per_image.empty:
        rel = base_per_image[base_per_image["quantity"] == REL_NORM]
        base_sources = [s for s in dict.fromkeys(rel["label_source"].fillna("").astype(str))
                        if s and not s.startswith(BASELINE_PREFIX)]
        base_source = next((s for s in SOURCE_PREFERENCE if s in base_sources),
                           base_sources[0] if base_sources else None)
        have = set(anom["label_source"].astype(str)) if anom is not None and "label_source" in anom else set()
        if base_source and f"{BASELINE_PREFIX}{base_source}" in have:
            paired_source = f"{BASELINE_PREFIX}{base_source}"
    own = anomaly_rows(anom, own_source, prefix="own_rel_norm")
    parts = [probe_rows(probe, interior_k), corner_rows(sim), anomaly_rows(anom, paired_source or own_source), own]
    layers = list(dict.fromkeys(layer for p in parts for layer in p["layer"]))
    out = pd.DataFrame({"layer": layers})
    for p in parts:
        out = out.merge(p.drop_duplicates("layer"), on="layer", how="left")
    if base_per_image is not None:
        diffs = paired_differences(base_per_image, per_image, layers, bootstrap or Bootstrap(), base_source,
                                   paired_source)
        out = out.merge(diffs, on="layer", how="left")
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
    out = out.reindex(columns=SUMMARY_COLUMNS).reset_index(drop=True)
    out["diff_note"] = out["diff_note"].astype(object).where(out["diff_note"].notna(), "")
    return out


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
