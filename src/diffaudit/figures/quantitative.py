"""The paper's quantitative figure (docs/method.md §4.1): probe accuracy, corner/border similarity, anomaly norm per layer.

:func:`plot_quantitative` draws one model: three panels over the layers (x = ``layer_index``), sharing the x axis:

1. "test accuracy" (%): per-axis probe test accuracy of the final epoch (mean over seeds), one line per
   granularity (8x8 ... 64x64), coloured ``Reds(linspace(.25, .9, k))``, with a +-1 sd band over seeds when there
   are several (corrected mode);
2. "rel. similarity" (log2 y): corner (``tab:blue``) and border (``#50b0bf``) ratio R_crop / R_full_ring, with
   ``conv_out`` and every non-positive ratio left out, and a dashed gray line at 1;
3. "rel. norm" (log y): mean relative norm of the labelled anomalies with a +-1 sd band (alpha .2), green
   ``#26a259``, one line per label source (paper solid, auto dashed, user dotted), dashed gray line at 1.

Uncertainty bands: where a table has the bootstrap interval columns (docs/method.md §3.7: ``ci_low``/``ci_high``
of the probe, ``corner_ratio_ci_low`` ... of the similarity, ``rel_norm_ci_low``/``_high`` of the anomalies),
every line also gets its interval as a translucent band in its colour (alpha :data:`CI_ALPHA`; on top of the
lighter sd band where there is one, which then reads as the spread and the interval as the darker core). With
several seeds the probe band spans the seeds' mean ``ci_low`` to mean ``ci_high`` (the typical single run's
interval; the seed mean's own is in ``position_probe_summary.csv``). Tables without these columns (older runs, the
published numbers) are drawn as before, without the band; the y-limits widen to show the bands.

Light-gray dashed separators mark block boundaries; below the bottom panel the layer types (conv, res, attn,
down, up) are written per layer (rotated) and the block names (in, dn0..dn3, mid, up0..up3, out) per block, with
the row labels "layers:" and "blocks:". Any subset of layers works: blocks and types are derived from the layer
names (:func:`layer_type`, :func:`layer_block`). A missing table (None or empty) leaves its panel saying "not
computed". ``reference=`` (the paper's tables of the model, :func:`diffaudit.paper_files.paper_tables`) overlays the
published numbers as thin black/gray dashed lines labelled "paper", matched to our layers by name. Legends sit to
the right of the panels so they never cover data. The y-limits are the paper's (accuracy -5..105, similarity
0.46..2.8, norm 0.45..5.8) and widen when data (or the overlay) fall outside them.

The layer types and blocks come from :mod:`diffaudit.figures.layer_labels`; the styles, the layer axis and the drawing
helpers from :mod:`diffaudit.figures.style`; the cross-model variant is :mod:`diffaudit.figures.cross_model`.

It writes ``<out_stem>.png`` (dpi 150) and ``<out_stem>.svg`` with ``bbox_inches="tight"``; SVGs are
deterministic (fixed ``svg.hashsalt``, no date) and keep their text as text (``svg.fonttype="none"``).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..tables import PAPER_TABLES, SIMILARITY_CI_COLUMNS, final_epoch_accuracy
from .style import (ACC_LIM, COLOR_ANOMALY, COLOR_BORDER, COLOR_CORNER, NORM_LIM, REF_STYLE, REF_STYLE_BORDER,
                    SD_ALPHA, SIM_LIM, UNITY, LayerAxis, add_legend, draw_band, draw_line, finite_values,
                    layer_axis, layer_series, linear_limits, log2_ticks, log_limits, new_figure, nonempty,
                    not_computed, save_figure, set_log_y, setup_layer_axis, source_kind, source_style)

TABLE_KEYS = tuple(PAPER_TABLES)  # the tables with a published counterpart


# ---------------------------------------------------------------------------------------------
# Table preparation
# ---------------------------------------------------------------------------------------------

def for_model(df, model: str | None):
    if not nonempty(df):
        return None
    if model is not None and "model" in df.columns and (df["model"].astype(str) == str(model)).any():
        df = df[df["model"].astype(str) == str(model)]
    return df


def final_accuracy(probe: pd.DataFrame, stat: str = "mean", column: str = "accuracy") -> tuple[pd.DataFrame, str]:
    """Final-epoch accuracy (%) per layer x granularity over seeds (``stat``: ``mean``, or ``std``, the sample sd,
    NaN for one seed); per_axis (joint if that is all). ``column``: another column of the same unit (``ci_low``,
    ``ci_high``)."""
    metric = "per_axis"
    if "metric" in probe.columns:
        if not (probe["metric"] == "per_axis").any():
            metric = str(probe["metric"].iloc[0])
        probe = probe[probe["metric"] == metric]
    acc = final_epoch_accuracy(probe, by=("layer",), stat=stat, column=column)
    wide = acc.set_index(["layer", "granularity"])["value"].unstack("granularity") * 100.0
    return wide.sort_index(axis=1), metric


def has_values(df, *columns: str) -> bool:
    """The table has all ``columns`` and at least one finite value in each."""
    return all(c in df.columns and np.isfinite(pd.to_numeric(df[c], errors="coerce")).any() for c in columns)


SIM_CI_COLUMNS = SIMILARITY_CI_COLUMNS


def similarity_ratios(sim: pd.DataFrame) -> pd.DataFrame:
    """corner/border ratio per layer (and their interval columns where the table has them); conv_out dropped,
    non-positive / non-finite values -> NaN."""
    d = sim[sim["layer"].astype(str) != "conv_out"]
    cols = ["corner_ratio", "border_ratio", *(c for c in SIM_CI_COLUMNS if c in d.columns)]
    out = d.groupby("layer")[cols].mean()
    return out.where(np.isfinite(out) & (out > 0))


def anomaly_norms(an: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """label_source -> per-layer rel_norm_mean / rel_norm_std (paper first, then auto, then the rest)."""
    d = an.copy()
    if "label_source" not in d.columns:
        d["label_source"] = "paper"
    d["label_source"] = d["label_source"].fillna("unknown").astype(str)
    order = {"paper": 0, "auto": 1}
    out = {}
    cols = ["rel_norm_mean", "rel_norm_std", *(c for c in ("rel_norm_ci_low", "rel_norm_ci_high") if c in d.columns)]
    for src in sorted(d["label_source"].unique(), key=lambda s: (order.get(source_kind(s), 2), s)):
        g = d[d["label_source"] == src].groupby("layer")[cols].mean()
        out[src] = g
    return out


# ---------------------------------------------------------------------------------------------
# Panels
# ---------------------------------------------------------------------------------------------

def _gran_label(g) -> str:
    g = int(g)
    return f"{g}×{g}"


def _panel_accuracy(ax, axis: LayerAxis, probe, ref_probe, markers: bool) -> None:
    ax.set_ylabel("test accuracy")
    vals = []
    if probe is None:
        not_computed(ax)
    else:
        wide, metric = final_accuracy(probe)
        if metric != "per_axis":
            ax.set_ylabel(f"test accuracy\n({metric})")
        sd, _ = final_accuracy(probe, "std")  # several seeds (corrected mode): a +-1 sd band per granularity
        ci = ((final_accuracy(probe, column="ci_low")[0], final_accuracy(probe, column="ci_high")[0])
              if has_values(probe, "ci_low", "ci_high") else None)  # the bootstrap interval (mean over seeds)
        cols = matplotlib.colormaps["Reds"](np.linspace(0.25, 0.9, max(len(wide.columns), 1)))
        for c, g in zip(cols, wide.columns):
            x, y = layer_series(axis, wide[g])
            draw_line(ax, x, y, markers, color=c, lw=1.5, label=_gran_label(g), zorder=3)
            _, e = layer_series(axis, sd[g]) if g in sd.columns else (x, np.full_like(y, np.nan))
            if np.isfinite(e).any():
                ax.fill_between(x, y - e, y + e, color=c, alpha=SD_ALPHA, lw=0, zorder=2)
            vals.append(y)
            if ci is not None and g in ci[0].columns:
                lo, hi = layer_series(axis, ci[0][g])[1], layer_series(axis, ci[1][g])[1]
                if draw_band(ax, x, lo, hi, c):
                    vals.extend([lo, hi])
    if ref_probe is not None:
        rwide, _ = final_accuracy(ref_probe)
        first = True
        for g in rwide.columns:
            x, y = layer_series(axis, rwide[g])
            if np.isfinite(y).any():
                draw_line(ax, x, y, **REF_STYLE, label="paper" if first else "_nolegend_")
                first = False
                vals.append(y)
    if probe is not None or ref_probe is not None:
        ax.set_ylim(*linear_limits(ACC_LIM, finite_values(*vals)))
        ax.set_yticks([0, 50, 100])
        add_legend(ax)


def _panel_similarity(ax, axis: LayerAxis, sim, ref_sim, markers: bool) -> None:
    ax.set_ylabel("rel. similarity")
    vals = []
    if sim is None:
        not_computed(ax)
    else:
        r = similarity_ratios(sim)
        for col, color, label in (("corner_ratio", COLOR_CORNER, "corner"), ("border_ratio", COLOR_BORDER,
                                                                               "border")):
            x, y = layer_series(axis, r[col])
            draw_line(ax, x, y, markers, color=color, lw=1.5, label=label, zorder=3)
            vals.append(y)
            if has_values(r, f"{col}_ci_low", f"{col}_ci_high"):
                lo, hi = layer_series(axis, r[f"{col}_ci_low"])[1], layer_series(axis, r[f"{col}_ci_high"])[1]
                if draw_band(ax, x, lo, hi, color, positive=True):
                    vals.extend([lo, hi])
    if ref_sim is not None:
        r = similarity_ratios(ref_sim)
        for col, style, label in (("corner_ratio", REF_STYLE, "paper corner"),
                                  ("border_ratio", REF_STYLE_BORDER, "paper border")):
            x, y = layer_series(axis, r[col])
            if np.isfinite(y).any():
                draw_line(ax, x, y, **style, label=label)
                vals.append(y)
    if sim is not None or ref_sim is not None:
        ax.axhline(1.0, **UNITY)
        v = finite_values(*vals)
        lo, hi = log_limits(SIM_LIM, v, v)
        set_log_y(ax, lo, hi, log2_ticks(lo, hi))
        add_legend(ax)


def _panel_norm(ax, axis: LayerAxis, an, ref_an, markers: bool) -> None:
    ax.set_ylabel("rel. norm")
    lows, highs = [], []
    if an is None:
        not_computed(ax)
    else:
        by_source = anomaly_norms(an)
        single = len(by_source) == 1
        for src, g in by_source.items():
            x, m = layer_series(axis, g["rel_norm_mean"])
            _, s = layer_series(axis, g["rel_norm_std"])
            s = np.nan_to_num(s, nan=0.0)
            label = "anomalies" if single and src == "paper" else f"anomalies ({src} labels)"
            draw_line(ax, x, m, markers, color=COLOR_ANOMALY, lw=1.5, ls=source_style(src), label=label, zorder=3)
            lower = m - s
            lower = np.where(lower > 0, lower, np.nanmin(m[m > 0]) / 1e3 if (m > 0).any() else 1e-3)
            ax.fill_between(x, lower, m + s, color=COLOR_ANOMALY, alpha=SD_ALPHA, lw=0, zorder=2)
            fin = np.isfinite(m)
            iso = fin & ~np.r_[False, fin[:-1]] & ~np.r_[fin[1:], False]
            if iso.any():  # a band needs two neighbours; show the +-1 sd of a lone layer as a bar
                ax.vlines(x[iso], lower[iso], (m + s)[iso], color=COLOR_ANOMALY, alpha=0.3, lw=4, zorder=2)
            lows.append(m)
            highs.append(m + s)
            if has_values(g, "rel_norm_ci_low", "rel_norm_ci_high"):
                lo, hi = layer_series(axis, g["rel_norm_ci_low"])[1], layer_series(axis, g["rel_norm_ci_high"])[1]
                if draw_band(ax, x, lo, hi, COLOR_ANOMALY, positive=True):
                    lows.append(lo)
                    highs.append(hi)
    if ref_an is not None:
        d = ref_an
        if "label_source" in d.columns and (d["label_source"] == "paper").any():
            d = d[d["label_source"] == "paper"]
        g = d.groupby("layer")["rel_norm_mean"].mean()
        x, y = layer_series(axis, g)
        if np.isfinite(y).any():
            draw_line(ax, x, y, **REF_STYLE, label="paper")
            lows.append(y)
            highs.append(y)
    if an is not None or ref_an is not None:
        ax.axhline(1.0, **UNITY)
        lo, hi = log_limits(NORM_LIM, finite_values(*lows), finite_values(*highs), factor=1.08)
        set_log_y(ax, lo, hi, log2_ticks(lo, hi))
        add_legend(ax)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def plot_quantitative(probe, similarity, anomalies, out_stem, model: str,
                      reference: Mapping[str, pd.DataFrame | None] | None = None) -> tuple[Path, Path]:
    """The paper's 3-panel figure for one model; writes ``<out_stem>.png`` and ``.svg`` and returns both paths.

    Arguments as for :func:`quantitative_figure`.
    """
    return save_figure(quantitative_figure(probe, similarity, anomalies, model, reference), out_stem)


def quantitative_figure(probe, similarity, anomalies, model: str,
                        reference: Mapping[str, pd.DataFrame | None] | None = None) -> Figure:
    """The paper's 3-panel figure for one model as a matplotlib Figure (axes: accuracy, similarity, norm).

    ``probe``, ``similarity``, ``anomalies``: our ``position_probe``, ``token_group_similarity`` and
    ``anomaly_rel_norm`` tables (None or empty -> "not computed"); rows of other models are ignored when the
    table has rows of ``model``. ``reference``: the paper's tables, keyed ``position_probe``,
    ``token_group_similarity``, ``anomaly_rel_norm`` (any may be missing), overlaid and labelled "paper".
    """
    probe, similarity, anomalies = (for_model(t, model) for t in (probe, similarity, anomalies))
    ref = {k: for_model((reference or {}).get(k), model) for k in TABLE_KEYS}
    ours = [probe, similarity, anomalies]
    axis = layer_axis(ours)
    if not len(axis):
        axis = layer_axis(list(ref.values()))
    markers = 0 < len(axis) <= 15
    fig, axes = new_figure(axis)
    _panel_accuracy(axes[0], axis, probe, ref["position_probe"], markers)
    _panel_similarity(axes[1], axis, similarity, ref["token_group_similarity"], markers)
    _panel_norm(axes[2], axis, anomalies, ref["anomaly_rel_norm"], markers)
    axes[0].set_title(str(model))
    fig.align_ylabels(axes)
    setup_layer_axis(fig, axes, axis)
    return fig
