"""Our tables next to the authors' published numbers: the ``paper_comparison.csv`` table and the per-layer
quantities of the paper's figure (``layer_summary/{model}.csv``).

:func:`compare_with_paper` lines our ``position_probe``, ``token_group_similarity`` and ``anomaly_rel_norm`` up
against the published ones (parsed by :mod:`diffaudit.paper_files`): final-epoch per-axis accuracy per granularity
(:func:`diffaudit.tables.final_epoch_accuracy`), corner and border ratio and the anomaly relative norm, matched on
(model, layer). :func:`per_layer_quantities` gives the same quantities of one run, one row per layer.
"""
from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from ..tables import LAYER_SUMMARY_COLUMNS, PAPER_COMPARISON_COLUMNS, QUANTITY_ORDER, final_epoch_accuracy

#: The columns of ``paper_comparison.csv`` (:data:`diffaudit.tables.PAPER_COMPARISON_COLUMNS`).
COMPARISON_COLUMNS = PAPER_COMPARISON_COLUMNS


def _final_accuracy(df: pd.DataFrame) -> pd.DataFrame:
    """Per (model, layer, granularity): per-axis accuracy of the final epoch, mean over seeds."""
    d = df[df["metric"] == "per_axis"]
    if d.empty:
        return pd.DataFrame(columns=["model", "layer_index", "layer", "quantity", "value"])
    out = final_epoch_accuracy(d, by=("model", "layer"), sort=False)
    out["quantity"] = [f"acc_{int(g)}x{int(g)}" for g in out["granularity"]]
    return out[["model", "layer_index", "layer", "quantity", "value"]]


def _long_quantities(tables: Mapping[str, pd.DataFrame | None], *, paper_labels_only: bool) -> pd.DataFrame:
    parts = []
    probe = tables.get("position_probe")
    if probe is not None and not probe.empty:
        parts.append(_final_accuracy(probe))
    sim = tables.get("token_group_similarity")
    if sim is not None and not sim.empty:
        for q in ("corner_ratio", "border_ratio"):
            s = sim.groupby(["model", "layer"], sort=False).agg(layer_index=("layer_index", "first"),
                                                                value=(q, "mean")).reset_index()
            s["quantity"] = q
            parts.append(s[["model", "layer_index", "layer", "quantity", "value"]])
    an = tables.get("anomaly_rel_norm")
    if an is not None and not an.empty:
        if paper_labels_only:
            an = an[an["label_source"] == "paper"]
        s = an.groupby(["model", "layer"], sort=False).agg(layer_index=("layer_index", "first"),
                                                           value=("rel_norm_mean", "mean")).reset_index()
        s["quantity"] = "rel_norm_mean"
        parts.append(s[["model", "layer_index", "layer", "quantity", "value"]])
    parts = [p for p in parts if not p.empty]
    if not parts:
        return pd.DataFrame(columns=["model", "layer_index", "layer", "quantity", "value"])
    return pd.concat(parts, ignore_index=True)


_QUANTITY_ORDER = QUANTITY_ORDER


def per_layer_quantities(tables: Mapping[str, pd.DataFrame | None]) -> pd.DataFrame:
    """One row per layer with the plotted quantities of the paper's figure (the columns of
    ``paper_comparison.csv``): final-epoch per-axis accuracy per granularity (mean over seeds), corner and
    border ratio, and the anomaly relative norm (the authors' labels when present, else the mean over the
    label sources, named in ``rel_norm_source``), with each layer's ``spatial`` size. Written as
    ``layer_summary/{model}.csv`` for ``dvc plots`` and the cross-model figure."""
    an = tables.get("anomaly_rel_norm")
    has_an = an is not None and not an.empty
    has_paper = has_an and (an["label_source"] == "paper").any()
    columns = list(LAYER_SUMMARY_COLUMNS)
    long = _long_quantities(tables, paper_labels_only=bool(has_paper))
    if long.empty:
        return pd.DataFrame(columns=columns)
    wide = long.pivot_table(index=["layer_index", "layer"], columns="quantity", values="value").reset_index()
    spatial = pd.concat([t[["layer", "spatial"]] for t in tables.values()
                         if t is not None and not t.empty and "spatial" in t.columns], ignore_index=True)
    wide["spatial"] = wide["layer"].map(spatial.groupby("layer")["spatial"].first())
    wide["rel_norm_source"] = ("paper" if has_paper else
                               "+".join(sorted(an["label_source"].astype(str).unique())) if has_an else "")
    wide = wide.reindex(columns=columns)  # every column, NaN if not computed
    return wide.sort_values("layer_index", kind="stable").reset_index(drop=True)


def compare_with_paper(ours: Mapping[str, pd.DataFrame | None],
                       paper: Mapping[str, pd.DataFrame | None]) -> pd.DataFrame:
    """Our numbers next to the published ones: the ``paper_comparison.csv`` table.

    ``ours`` and ``paper`` map table names (``position_probe``, ``token_group_similarity``,
    ``anomaly_rel_norm``; missing or None tables are skipped) to tidy tables. Quantities: ``acc_{g}x{g}``
    (per-axis accuracy of the final epoch, mean over seeds), ``corner_ratio``, ``border_ratio`` and
    ``rel_norm_mean`` (ours: the ``paper`` label source only, the labels the published numbers use). Rows are
    matched on (model, layer); ``layer_index`` is ours; ``delta = ours - paper``.
    """
    a = _long_quantities(ours, paper_labels_only=True)
    b = _long_quantities(paper, paper_labels_only=True)
    m = a.merge(b.drop(columns="layer_index"), on=["model", "layer", "quantity"], suffixes=("_ours", "_paper"))
    out = pd.DataFrame({"model": m["model"].astype(str), "layer_index": m["layer_index"].astype(int),
                        "layer": m["layer"].astype(str), "quantity": m["quantity"].astype(str),
                        "ours": m["value_ours"].astype(float), "paper": m["value_paper"].astype(float)})
    out["delta"] = out["ours"] - out["paper"]
    rank = {q: i for i, q in enumerate(_QUANTITY_ORDER)}
    out["_q"] = out["quantity"].map(lambda q: rank.get(q, len(rank)))
    out = out.sort_values(["model", "layer_index", "_q", "quantity"], kind="stable").drop(columns="_q")
    return out.reset_index(drop=True)[PAPER_COMPARISON_COLUMNS]
