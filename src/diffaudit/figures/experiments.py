"""The experiments figure of one model: the paper's three panels with the baseline and every experiment overlaid.

Input: the model's ``experiments.csv`` (:func:`diffaudit.analyses.comparison.compare`). Panels over the layers
(x = the baseline's ``layer_index``; block and layer-type labels below, as in the paper figure):

1. "8x8 accuracy" (%): final-epoch per-axis probe accuracy at the fixed 8 x 8 grid, with the chance level
   ``1/min(8, n)`` as a gray dotted line;
2. "corner ratio" (log2 y): the corner similarity of the cropped image over the full image with the ring removed,
   dashed gray line at 1;
3. "rel. norm" (log y): the mean relative norm of the anomalies, dashed gray line at 1; an experiment's at the
   baseline's label positions (``rel_norm_source`` ``baseline:<source>``: the same patches of the same images).

One colour per run (the baseline black, thicker), each with its own 95 % bootstrap interval as a translucent band.
"Differs from the baseline" is not judged by the bands (two overlapping bands can still differ: the images vary
alike in both runs) but by the paired interval of the difference (``<quantity>_diff_ci_low/high`` of
experiments.csv, the same resampled images on both sides): a layer whose paired interval excludes 0 gets a filled
marker in the run's colour (:data:`DIFFERS_MARKER`). Runs that extracted only some layers are drawn with small
hollow markers. Written as ``<out_stem>.png`` and ``.svg`` like the paper figure.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..layout import BASELINE
from ..tables import PAIRED_QUANTITIES
from .style import (UNITY, LayerAxis, add_legend, draw_band, draw_line, new_figure, not_computed, save_figure,
                    setup_layer_axis)

BASELINE_STYLE = dict(color="black", lw=2.0, zorder=5)
PALETTE = ("tab:orange", "tab:blue", "tab:red", "tab:purple", "tab:green", "tab:brown", "tab:pink", "tab:olive",
           "tab:cyan", "tab:gray")
PANELS = (("acc_8x8", "8x8 accuracy (%)", 100.0, False),
          ("corner_ratio", "corner ratio", 1.0, True),
          ("rel_norm_mean", "rel. norm", 1.0, True))
CI = {"acc_8x8": ("acc_8x8_ci_low", "acc_8x8_ci_high"), "corner_ratio": ("corner_ratio_ci_low", "corner_ratio_ci_high"),
      "rel_norm_mean": ("rel_norm_ci_low", "rel_norm_ci_high")}
#: The marker of a layer whose paired interval of the difference to the baseline excludes 0.
DIFFERS_MARKER = dict(marker="o", ms=6, ls="none", markeredgecolor="white", markeredgewidth=0.6, zorder=6)


def differs(df: pd.DataFrame, col: str) -> np.ndarray:
    """Per row of a run: whether the paired interval of its difference to the baseline in ``col`` excludes 0."""
    stem = PAIRED_QUANTITIES[col]
    if f"{stem}_ci_low" not in df.columns:
        return np.zeros(len(df), dtype=bool)
    lo, hi = (df[f"{stem}{end}"].to_numpy(float) for end in ("_ci_low", "_ci_high"))
    with np.errstate(invalid="ignore"):
        return (lo > 0) | (hi < 0)


def _axis(table: pd.DataFrame) -> LayerAxis:
    order = table[["layer_index", "layer"]].drop_duplicates("layer").sort_values("layer_index", kind="stable")
    return LayerAxis(order["layer"].astype(str).tolist(), order["layer_index"].to_numpy(float))


def _with_gaps(df: pd.DataFrame, axis: LayerAxis) -> pd.DataFrame:
    """A run's rows with a NaN row wherever it skips a layer of the axis, so its line breaks there instead of
    joining layers that are not neighbours."""
    xs = axis.xs.tolist()
    have = set(df["layer_index"].astype(float))
    missing = [x for x in xs if x not in have and min(have, default=x) < x < max(have, default=x)]
    if not missing:
        return df
    gaps = pd.DataFrame({"layer_index": missing})
    return pd.concat([df, gaps], ignore_index=True).sort_values("layer_index", kind="stable")


def experiments_figure(table: pd.DataFrame, model: str, title: str | None = None):
    """The figure (matplotlib ``Figure``) for ``table`` (rows of one model)."""
    axis = _axis(table) if not table.empty else LayerAxis([], np.zeros(0))
    fig, axes = new_figure(axis)
    runs = list(dict.fromkeys(table["experiment"].astype(str))) if not table.empty else []
    colours = {}
    k = 0
    for run in runs:
        if run == BASELINE:
            colours[run] = BASELINE_STYLE["color"]
        else:
            colours[run] = PALETTE[k % len(PALETTE)]
            k += 1
    marked = False
    for ax, (col, label, scale, log) in zip(axes, PANELS):
        ax.set_ylabel(label)
        drawn = False
        for run in runs:
            df = _with_gaps(table[table["experiment"].astype(str) == run].sort_values("layer_index"), axis)
            x = df["layer_index"].to_numpy(float)
            y = df[col].to_numpy(float) * scale
            if log:
                y = np.where(y > 0, y, np.nan)
            if not np.isfinite(y).any():
                continue
            sparse = len(df) < len(axis)
            style = dict(BASELINE_STYLE) if run == BASELINE else dict(color=colours[run], lw=1.4, zorder=4)
            if sparse:  # hollow: only a layer whose paired interval excludes 0 gets a filled marker
                style.update(ms=4, mfc="white")
            changes = str(df["changes"].iloc[0]) if "changes" in df and isinstance(df["changes"].iloc[0], str) else ""
            draw_line(ax, x, y, markers=sparse, label=run + (f" ({changes})" if changes else ""), **style)
            lo, hi = (df[c].to_numpy(float) * scale for c in CI[col])
            draw_band(ax, x, lo, hi, colours[run], positive=log)
            hit = differs(df, col) & np.isfinite(y)
            if hit.any():
                ax.plot(x[hit], y[hit], color=colours[run], label="_nolegend_", **DIFFERS_MARKER)
                marked = True
            drawn = True
        if not drawn:
            not_computed(ax)
            continue
        if col == "acc_8x8":
            chance = table.drop_duplicates("layer").sort_values("layer_index")
            ax.plot(chance["layer_index"], chance["chance_8x8"] * 100, color="gray", ls=":", lw=1.2, zorder=1,
                    label="chance")
        else:
            ax.axhline(1.0, **UNITY)
        if log:
            ax.set_yscale("log", base=2)
    if marked:  # one legend entry for the filled markers
        axes[0].plot([], [], color="gray", label="paired 95% interval of the difference excludes 0", **DIFFERS_MARKER)
    add_legend(axes[0])
    setup_layer_axis(fig, axes, axis)
    fig.suptitle(title or f"{model}: baseline and experiments (bands: each run's 95% bootstrap interval over images; "
                           "filled: the paired interval of the difference excludes 0)", fontsize=10)
    return fig


def plot_experiments(table: pd.DataFrame, out_stem, model: str, title: str | None = None):
    return save_figure(experiments_figure(table, model, title), out_stem)
