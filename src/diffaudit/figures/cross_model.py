"""The cross-model figure: one line per model in each of the paper's three panels (:func:`plot_cross_model`).

Accuracy at 8x8 (solid) and at the layer's native granularity (dashed), corner ratio, and anomaly relative norm.
When all models share one ordered layer list they sit on that layer axis (as in
:mod:`diffaudit.figures.quantitative`); when the lists differ (model families with different layer counts: SD-1/2
U-Nets 45 layers, SDXL 34, SD3 / FLUX transformers), every model is drawn on a relative depth axis instead, its
layer i of n at x = i / (n - 1) (0 = first layer, 1 = last; :func:`relative_depth`), with each U-Net's
``mid_block`` marked. :func:`tables_from_summary` rebuilds the drawn tables from a model's ``layer_summary``.

Written as ``<out_stem>.png`` and ``.svg`` like the paper figure (:func:`diffaudit.figures.style.save_figure`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .layer_labels import DIT_BLOCKS, PATCH_EMBEDDINGS, layer_block, layer_segments
from .quantitative import TABLE_KEYS, anomaly_norms, final_accuracy, for_model, similarity_ratios
from .style import (ACC_LIM, FIGSIZE, NORM_LIM, SIM_LIM, UNITY, LayerAxis, add_legend, draw_line, finite_values,
                    layer_axis, layer_series, linear_limits, log2_ticks, log_limits, new_figure, not_computed,
                    save_figure, set_log_y, setup_layer_axis, source_style)


def _native_accuracy(probe: pd.DataFrame) -> pd.Series:
    """Per layer: accuracy (%) at the layer's own resolution (smallest granularity >= spatial)."""
    metric_ok = probe if "metric" not in probe.columns or not (probe["metric"] == "per_axis").any() \
        else probe[probe["metric"] == "per_axis"]
    wide, _ = final_accuracy(metric_ok)
    spatial = probe.groupby("layer")["spatial"].first() if "spatial" in probe.columns else pd.Series(dtype=float)
    out = {}
    grans = np.asarray(wide.columns, dtype=float)
    for layer, row in wide.iterrows():
        n = spatial.get(layer, np.nan)
        ok = grans >= n if np.isfinite(n) else np.zeros(len(grans), bool)
        g = wide.columns[np.flatnonzero(ok)[0]] if ok.any() else wide.columns[-1]
        out[layer] = row[g]
    return pd.Series(out, dtype=float)


def tables_from_summary(summary: pd.DataFrame) -> dict[str, pd.DataFrame | None]:
    """The three tables :func:`cross_model_figure` draws, rebuilt from one model's ``layer_summary`` (final-epoch
    per-axis accuracy per granularity, corner/border ratio, relative norm of one label source)."""
    keys = ["layer_index", "layer", "spatial"]
    acc = [c for c in summary.columns if c.startswith("acc_") and summary[c].notna().any()]
    probe = summary.melt(id_vars=keys, value_vars=acc, var_name="granularity", value_name="accuracy").dropna(
        subset=["accuracy"])
    probe["granularity"] = probe["granularity"].map(lambda c: int(c[4:].split("x")[0]))
    probe = probe.assign(epoch=1, metric="per_axis", seed=0)
    sim = summary[keys + ["corner_ratio", "border_ratio"]].dropna(subset=["corner_ratio"])
    an = summary[keys + ["rel_norm_mean"]].dropna(subset=["rel_norm_mean"]).assign(
        label_source=summary["rel_norm_source"].fillna("").astype(str), rel_norm_std=np.nan)
    return {"position_probe": probe if len(probe) else None, "token_group_similarity": sim if len(sim) else None,
            "anomaly_rel_norm": an if len(an) else None}


def relative_depth(names: Sequence[str]) -> np.ndarray:
    """x of each layer on the relative depth axis: position i of n (in the given order) -> i / (n - 1), so the first
    layer is at 0 and the last at 1 (a single layer at 0)."""
    n = len(names)
    return np.arange(n, dtype=float) / (n - 1) if n > 1 else np.zeros(n)


def model_family(names: Sequence[str]) -> str:
    """``U-Net`` or ``DiT`` from a layer list (block names), else ``""``."""
    heads = {layer_segments(n)[0][0] for n in names}
    if heads & {"down_blocks", "up_blocks", "mid_block"}:
        return "U-Net"
    if heads & {*DIT_BLOCKS, *PATCH_EMBEDDINGS}:
        return "DiT"
    return ""


RELATIVE_TICKS = (0.0, 0.25, 0.5, 0.75, 1.0)
RELATIVE_XLABEL = "relative depth (0 = first layer, 1 = last)"
MID_STYLE = dict(ls=":", lw=1.0, alpha=0.8, zorder=1)


def plot_cross_model(tables_by_model: Mapping[str, Mapping[str, pd.DataFrame | None]], out_stem
                     ) -> tuple[Path, Path]:
    """:func:`cross_model_figure` written to ``<out_stem>.png`` and ``.svg``; returns both paths."""
    return save_figure(cross_model_figure(tables_by_model), out_stem)


def cross_model_figure(tables_by_model: Mapping[str, Mapping[str, pd.DataFrame | None]]) -> Figure:
    """One line per model in each panel: accuracy at 8x8 (solid) and native (dashed), corner ratio, rel. norm.

    ``tables_by_model``: model -> {``position_probe``, ``token_group_similarity``, ``anomaly_rel_norm``} (any
    may be missing). When every model has the same ordered layer list (its layers by ``layer_index``), layers are
    matched by name on the shared layer axis (x = ``layer_index`` if that is consistent across models; layer types
    and blocks below the bottom panel). When the lists differ (model families with different layer counts: SD-1/2
    U-Nets with 45 layers, SDXL with 34, SD3 / FLUX transformers), each model is drawn on a relative depth axis
    instead: its layer i of n at x = i / (n - 1) (:func:`relative_depth`; 0 = first layer, 1 = last), lines with
    small markers, every U-Net's first ``mid_block`` layer marked by a dotted vertical line and a triangle above the
    top panel in the model's colour, and the family and layer count of each model in the legend.
    The anomaly panel uses the ``paper`` label source where a model has it, else its first source (named in the
    legend). Each line carries the (legend-hidden) label ``_<model> <quantity>`` (quantity: 8×8, native, corner,
    norm).
    """
    models = list(tables_by_model)
    tabs = {m: {k: for_model((tables_by_model[m] or {}).get(k), m) for k in TABLE_KEYS} for m in models}
    own = {m: layer_axis(list(tabs[m].values())).names for m in models}
    relative = len({tuple(v) for v in own.values() if v}) > 1
    colors = dict(zip(models, matplotlib.colormaps["tab10"](np.arange(len(models)) % 10)))
    if relative:
        axis_of = {m: LayerAxis(own[m], relative_depth(own[m])) for m in models}
        markers = True
        fig = Figure(figsize=(FIGSIZE[0] + 1.0, FIGSIZE[1]))
        FigureCanvasAgg(fig)
        axes = fig.subplots(3, 1, sharex=True)
        fig.subplots_adjust(hspace=0.05)
    else:
        axis = layer_axis([t for m in models for t in tabs[m].values()])
        axis_of = dict.fromkeys(models, axis)
        markers = 0 < len(axis) <= 15
        fig, axes = new_figure(axis)
    style = dict(ms=2.5) if relative else {}
    ax_acc, ax_sim, ax_norm = axes
    ax_acc.set_ylabel("test accuracy")
    ax_sim.set_ylabel("corner\nrel. similarity")
    ax_norm.set_ylabel("anomaly\nrel. norm")

    acc_vals, sim_vals, norm_vals = [], [], []
    acc_models, sim_models, norm_handles = [], [], []
    for m in models:
        t, c, axis = tabs[m], colors[m], axis_of[m]
        if t["position_probe"] is not None:
            wide, _ = final_accuracy(t["position_probe"])
            if 8 in wide.columns:
                x, y = layer_series(axis, wide[8])
                draw_line(ax_acc, x, y, markers, color=c, lw=1.5, zorder=3, label=f"_{m} 8×8", **style)
                acc_vals.append(y)
            x, y = layer_series(axis, _native_accuracy(t["position_probe"]))
            draw_line(ax_acc, x, y, markers, color=c, lw=1.2, ls="--", zorder=3, label=f"_{m} native", **style)
            acc_vals.append(y)
            acc_models.append(m)
        if t["token_group_similarity"] is not None:
            x, y = layer_series(axis, similarity_ratios(t["token_group_similarity"])["corner_ratio"])
            draw_line(ax_sim, x, y, markers, color=c, lw=1.5, zorder=3, label=f"_{m} corner", **style)
            sim_vals.append(y)
            sim_models.append(m)
        if t["anomaly_rel_norm"] is not None:
            by_source = anomaly_norms(t["anomaly_rel_norm"])
            src = "paper" if "paper" in by_source else next(iter(by_source))
            x, y = layer_series(axis, by_source[src]["rel_norm_mean"])
            label = m if src == "paper" else f"{m} ({src} labels)"
            draw_line(ax_norm, x, y, markers, color=c, lw=1.5, ls=source_style(src), zorder=3, label=f"_{m} norm",
                  **style)
            norm_handles.append((Line2D([], [], color=c, lw=1.5, ls=source_style(src)), label))
            norm_vals.append(y)

    def model_label(m) -> str:
        if not relative:
            return m
        fam = model_family(own[m])
        return f"{m} ({fam + ', ' if fam else ''}{len(own[m])} layers)"

    def model_handles(ms):
        return [Patch(color=colors[m]) for m in ms], [model_label(m) for m in ms]

    mids = {}
    if relative:  # each U-Net's first mid_block layer
        for m in models:
            at = [i for i, n in enumerate(own[m]) if layer_block(n) == "mid"]
            if at:
                mids[m] = float(axis_of[m].xs[at[0]])

    if acc_models:
        h, lab = model_handles(acc_models)
        h += [Line2D([], [], color="0.3", lw=1.5), Line2D([], [], color="0.3", lw=1.2, ls="--")]
        lab += ["8×8", "native"]
        if mids:
            h.append(Line2D([], [], color="0.3", marker="v", ms=5, **MID_STYLE))
            lab.append("U-Net mid_block")
        ax_acc.set_ylim(*linear_limits(ACC_LIM, finite_values(*acc_vals)))
        ax_acc.set_yticks([0, 50, 100])
        add_legend(ax_acc, h, lab)
    else:
        not_computed(ax_acc)
    if sim_models:
        ax_sim.axhline(1.0, **UNITY)
        v = finite_values(*sim_vals)
        lo, hi = log_limits(SIM_LIM, v, v)
        set_log_y(ax_sim, lo, hi, log2_ticks(lo, hi))
        add_legend(ax_sim, *model_handles(sim_models))
    else:
        not_computed(ax_sim)
    if norm_handles:
        ax_norm.axhline(1.0, **UNITY)
        v = finite_values(*norm_vals)
        lo, hi = log_limits(NORM_LIM, v, v, factor=1.08)
        set_log_y(ax_norm, lo, hi, log2_ticks(lo, hi))
        add_legend(ax_norm, [h for h, _ in norm_handles], [lab for _, lab in norm_handles])
    else:
        not_computed(ax_norm)
    axes[0].set_title("cross-model comparison: " + ", ".join(models) if models else "no models",
                      **(dict(pad=10) if relative else {}))  # room for the mid_block triangles
    fig.align_ylabels(axes)
    if relative:
        _setup_relative_axis(axes, {m: (x, colors[m]) for m, x in mids.items()})
    else:
        setup_layer_axis(fig, axes, axis)
    return fig


def _setup_relative_axis(axes, mids: Mapping[str, tuple[float, object]]) -> None:
    """The relative depth axis: 0..1 with ticks at quarters and light vertical grid lines; each U-Net's mid_block
    (x, colour) as a dotted line through the panels and a triangle just above the top panel."""
    for ax in axes:
        ax.set_xlim(-0.03, 1.03)
        ax.grid(axis="x", color="0.9", lw=0.8)
        ax.set_axisbelow(True)
        for x, c in mids.values():
            ax.axvline(x, color=c, label="_mid_block", **MID_STYLE)
    top = axes[0]
    for x, c in mids.values():
        top.plot([x], [1.0], transform=top.get_xaxis_transform(), marker="v", ms=6, color=c, ls="none",
                 clip_on=False, zorder=5, label="_mid_block marker")
    bottom = axes[-1]
    bottom.set_xticks(list(RELATIVE_TICKS))
    bottom.set_xticklabels([f"{v:g}" for v in RELATIVE_TICKS])
    bottom.set_xlabel(RELATIVE_XLABEL)
