"""The shared look and drawing helpers of the per-layer figures (quantitative, cross-model, experiments).

Colours and line styles (:data:`COLOR_CORNER`, :data:`UNITY`, :data:`REF_STYLE`, ...), the paper's y-ranges
(:data:`ACC_LIM`, :data:`SIM_LIM`, :data:`NORM_LIM`), the layer axis (:class:`LayerAxis`, :func:`layer_axis`,
:func:`setup_layer_axis`: block separators, layer types and block names under the bottom panel), lines and bands
with NaN gaps (:func:`draw_line`, :func:`draw_band`), y-limits and log2 ticks, legends outside the axes
(:func:`add_legend`), the three-panel figure or a rows x columns grid over one layer axis (:func:`new_figure`) and deterministic PNG + SVG output
(:func:`save_figure`: dpi 150, ``bbox_inches="tight"``, fixed ``svg.hashsalt``, no date, text kept as text).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator
from matplotlib.transforms import Bbox

from .layer_labels import block_spans, layer_label

COLOR_CORNER = "tab:blue"
COLOR_BORDER = "#50b0bf"
COLOR_ANOMALY = "#26a259"
SEPARATOR = dict(color="lightgray", ls="--", lw=1.2, zorder=0)
UNITY = dict(color="gray", ls="--", lw=1.2, zorder=1)
REF_STYLE = dict(color="black", lw=0.8, ls=(0, (4, 2)), alpha=0.75, zorder=4)
REF_STYLE_BORDER = dict(color="0.45", lw=0.8, ls=(0, (4, 1.5, 1, 1.5)), alpha=0.9, zorder=4)
SOURCE_LINESTYLE = {"paper": "-", "auto": "--", "user": ":"}
SD_ALPHA = 0.2
CI_ALPHA = 0.3

# Paper y-ranges (plot.py); widened when the data fall outside.
ACC_LIM = (-5.0, 105.0)
SIM_LIM = (0.46, 2.8)
NORM_LIM = (0.45, 5.8)

SVG_HASHSALT = "diffaudit"
FIGSIZE = (8.0, 5.0)


# ---------------------------------------------------------------------------------------------
# Layer axis
# ---------------------------------------------------------------------------------------------

@dataclass
class LayerAxis:
    """The ordered layers of a figure and their x positions."""

    names: list[str]
    xs: np.ndarray

    @property
    def pos(self) -> dict[str, float]:
        return dict(zip(self.names, self.xs.tolist()))

    def __len__(self) -> int:
        return len(self.names)


def nonempty(df) -> bool:
    return df is not None and isinstance(df, pd.DataFrame) and not df.empty


def layer_axis(frames: Sequence[pd.DataFrame | None]) -> LayerAxis:
    """x = ``layer_index`` when name <-> index is one-to-one over all tables, else the rank in index order."""
    pairs = []
    for df in frames:
        if nonempty(df) and {"layer", "layer_index"} <= set(df.columns):
            pairs.append(df[["layer_index", "layer"]].drop_duplicates())
    if not pairs:
        return LayerAxis([], np.zeros(0))
    p = pd.concat(pairs, ignore_index=True).drop_duplicates()
    p["layer"] = p["layer"].astype(str)
    p["layer_index"] = pd.to_numeric(p["layer_index"])
    consistent = p["layer"].is_unique and p["layer_index"].is_unique
    order = (p.groupby("layer", sort=False)["layer_index"].min().reset_index()
             .sort_values("layer_index", kind="stable"))
    names = order["layer"].tolist()
    xs = order["layer_index"].to_numpy(float) if consistent else np.arange(len(names), dtype=float)
    return LayerAxis(names, xs)


def layer_series(axis: LayerAxis, values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) over the layers of ``values`` that are on the axis, in axis order."""
    pos = axis.pos
    names = [n for n in axis.names if n in values.index]
    x = np.array([pos[n] for n in names], dtype=float)
    y = np.array([values.get(n, np.nan) for n in names], dtype=float)
    return x, y


# ---------------------------------------------------------------------------------------------
# Line styles of the label sources
# ---------------------------------------------------------------------------------------------

def source_kind(source: str) -> str:
    s = str(source)
    return "user" if s.startswith("user") else s


def source_style(source: str) -> str | tuple:
    return SOURCE_LINESTYLE.get(source_kind(source), "-.")


# ---------------------------------------------------------------------------------------------
# Drawing helpers
# ---------------------------------------------------------------------------------------------

def draw_line(ax, x, y, markers: bool = False, **kw):
    """A line with NaN gaps; points with no finite neighbour get a marker so they stay visible."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if markers:
        kw.setdefault("marker", "o")
        kw.setdefault("ms", 3)
    (ln,) = ax.plot(x, y, **kw)
    fin = np.isfinite(y)
    iso = fin & ~np.r_[False, fin[:-1]] & ~np.r_[fin[1:], False]
    if iso.any() and not markers:
        ax.plot(x[iso], y[iso], ls="none", marker="o", ms=3, color=ln.get_color(), alpha=kw.get("alpha", 1),
                zorder=kw.get("zorder", 2), label="_nolegend_")
    return ln


def draw_band(ax, x, lo, hi, color, alpha: float = CI_ALPHA, positive: bool = False) -> bool:
    """A translucent band between ``lo`` and ``hi`` (NaN gaps; ``positive``: for a log axis, non-positive limits
    are gaps too); a layer without finite neighbours gets a bar. True if anything was drawn."""
    x, lo, hi = (np.asarray(a, float) for a in (x, lo, hi))
    ok = np.isfinite(lo) & np.isfinite(hi)
    if positive:
        ok &= (lo > 0) & (hi > 0)
    if not ok.any():
        return False
    lo, hi = np.where(ok, lo, np.nan), np.where(ok, hi, np.nan)
    ax.fill_between(x, lo, hi, where=ok, color=color, alpha=alpha, lw=0, zorder=2)
    iso = ok & ~np.r_[False, ok[:-1]] & ~np.r_[ok[1:], False]
    if iso.any():  # fill_between needs two neighbours
        ax.vlines(x[iso], lo[iso], hi[iso], color=color, alpha=alpha + 0.1, lw=4, zorder=2)
    return True


def tick_format(v, _pos=None) -> str:
    return f"{v:.1f}" if float(v).is_integer() or v >= 1 else f"{v:g}"


def log2_ticks(lo: float, hi: float, max_ticks: int = 7) -> list[float]:
    e0, e1 = math.ceil(math.log2(lo) - 1e-9), math.floor(math.log2(hi) + 1e-9)
    exps = list(range(e0, e1 + 1))
    step = max(1, math.ceil(len(exps) / max_ticks))
    return [2.0 ** e for e in exps[::step]]


def finite_values(*arrays) -> np.ndarray:
    vals = [np.asarray(a, float).ravel() for a in arrays if a is not None and np.size(a)]
    if not vals:
        return np.zeros(0)
    v = np.concatenate(vals)
    return v[np.isfinite(v)]


def linear_limits(paper: tuple[float, float], values: np.ndarray, margin: float = 5.0) -> tuple[float, float]:
    """The paper's range; a side is widened (with a margin) only when data fall outside it."""
    lo, hi = paper
    if values.size:
        if values.min() < lo:
            lo = float(values.min()) - margin
        if values.max() > hi:
            hi = float(values.max()) + margin
    return lo, hi


def log_limits(paper: tuple[float, float], low_values: np.ndarray, high_values: np.ndarray,
                factor: float = 1.12) -> tuple[float, float]:
    """The paper's range on a log axis; a side is widened (by ``factor``) only when data fall outside it."""
    lo, hi = paper
    low_values = low_values[low_values > 0]
    high_values = high_values[high_values > 0]
    if low_values.size and low_values.min() < lo:
        lo = float(low_values.min()) / factor
    if high_values.size and high_values.max() > hi:
        hi = float(high_values.max()) * factor
    return lo, hi


def set_log_y(ax, lo: float, hi: float, ticks: Sequence[float]) -> None:
    ax.set_yscale("log", base=2)
    ax.set_ylim(lo, hi)
    ax.yaxis.set_major_locator(FixedLocator(list(ticks)))
    ax.yaxis.set_major_formatter(FuncFormatter(tick_format))
    ax.yaxis.set_minor_formatter(NullFormatter())


def not_computed(ax, what: str = "not computed") -> None:
    ax.text(0.5, 0.5, what, transform=ax.transAxes, ha="center", va="center", color="0.4", fontsize=10,
            style="italic")
    ax.yaxis.set_major_locator(NullLocator())
    ax.yaxis.set_minor_locator(NullLocator())


def add_legend(ax, handles=None, labels=None, **kw):
    """Legend outside the axes, on the right: it never covers data."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return None
    kw = dict(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8, frameon=True,
              handlelength=2.2) | kw
    return ax.legend(handles, labels, **kw)


def new_figure(axis: LayerAxis, nrows: int = 3, ncols: int = 1, height: float | None = None,
               wspace: float = 0.12) -> tuple[Figure, np.ndarray]:
    """The panels over one layer axis, sharing x: by default the paper's 3 x 1 column (``axes`` 1-D); with
    ``ncols`` > 1 an ``nrows`` x ``ncols`` grid (``axes`` 2-D), each panel wide enough for its layer ticks.
    ``height`` (inches) defaults to the paper figure's height per row."""
    span = (axis.xs.max() - axis.xs.min() + 1.5) if len(axis) else 1.0
    # keep at least ~7.5 pt between layer ticks: widen the figure for long layer lists (the panels of a row share
    # 0.775 of the width with ncols - 1 gaps of wspace x a panel's width)
    width = max(FIGSIZE[0], span * 7.5 / 72 * (ncols + (ncols - 1) * wspace) / 0.775)
    fig = Figure(figsize=(width, FIGSIZE[1] * nrows / 3 if height is None else height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, sharex=True, squeeze=ncols == 1)
    if ncols == 1:
        fig.subplots_adjust(hspace=0.05)
    else:
        fig.subplots_adjust(hspace=0.08, wspace=wspace)
    return fig, axes


def _grid(axes) -> np.ndarray:
    """``axes`` as rows x columns: a 1-D sequence is one column."""
    grid = np.asarray(axes, dtype=object)
    return grid[:, None] if grid.ndim == 1 else grid


def setup_layer_axis(fig: Figure, axes, axis: LayerAxis) -> None:
    """Limits, block separators, layer-type tick labels, block-name row and the row labels. ``axes``: one column
    (1-D) or a rows x columns grid (2-D): every column's bottom panel gets the labels, the row labels ("layers:",
    "blocks:") stand left of the first column only."""
    grid = _grid(axes)
    if not len(axis):
        for ax in grid.ravel():
            ax.set_xlim(-0.5, 0.5)
            ax.xaxis.set_major_locator(NullLocator())
        return
    xs = axis.xs
    lo, hi = float(xs.min()) - 0.5, float(xs.max()) + 1.0
    spans = block_spans(axis.names)
    seps = [(xs[a - 1] + xs[a]) / 2 for _, a, _ in spans[1:]]
    for ax in grid.ravel():
        ax.set_xlim(lo, hi)
        for s in seps:
            ax.axvline(s, **SEPARATOR)
        ax.tick_params(axis="x", which="minor", length=0)
    bottoms = list(grid[-1])
    ax_w_pt = bottoms[0].get_position().width * fig.get_figwidth() * 72
    spacing = ax_w_pt / (hi - lo)
    fs = float(np.clip(spacing * 0.95, 5.0, 10.0))
    centers = [(xs[a] + xs[b]) / 2 for _, a, b in spans]
    for bottom in bottoms:
        bottom.set_xticks(xs)
        bottom.set_xticklabels([layer_label(n) for n in axis.names], rotation=90, fontsize=fs)
        bottom.xaxis.remove_overlapping_locs = False
        bottom.set_xticks(centers, minor=True)
        bottom.set_xticklabels([b for b, _, _ in spans], minor=True, fontsize=fs)

    canvas = fig.canvas
    canvas.draw()
    r = canvas.get_renderer()

    def visible(ax, minor: bool):
        return [t for t in ax.get_xticklabels(minor=minor) if t.get_visible() and t.get_text()]

    mbs = []
    for bottom in bottoms:
        mb = Bbox.union([t.get_window_extent(r) for t in visible(bottom, False)])
        # at least 1.4 font heights, so that the "layers:" and "blocks:" row labels never touch (short type names)
        height_pt = max(mb.height * 72 / fig.dpi, 1.4 * fs)
        pad_pt = height_pt + bottom.xaxis.get_major_ticks()[0].get_pad() + 4
        bottom.tick_params(axis="x", which="minor", pad=pad_pt)
        mbs.append(mb)
    canvas.draw()
    boxes = sorted((t.get_window_extent(r) for t in visible(bottoms[0], True)), key=lambda b: b.x0)
    if any(b1.x0 < b0.x1 + 2 for b0, b1 in zip(boxes[:-1], boxes[1:])):
        # narrow blocks: block names would touch -> write them vertically as well
        for bottom in bottoms:
            for t in visible(bottom, True):
                t.set_rotation(90)
        canvas.draw()
    first, mb = bottoms[0], mbs[0]
    nb = Bbox.union([t.get_window_extent(r) for t in visible(first, True)])
    axb = first.get_window_extent(r)
    x_right = min(axb.x0, mb.x0, nb.x0) - 6
    inv = fig.transFigure.inverted()
    for label, bb in (("layers:", mb), ("blocks:", nb)):
        fx, fy = inv.transform((x_right, (bb.y0 + bb.y1) / 2))
        fig.text(fx, fy, label, ha="right", va="center", fontsize=min(10.0, fs + 0.5))


def save_figure(fig: Figure, out_stem) -> tuple[Path, Path]:
    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    png, svg = out_stem.with_name(out_stem.name + ".png"), out_stem.with_name(out_stem.name + ".svg")
    with matplotlib.rc_context({"svg.hashsalt": SVG_HASHSALT, "svg.fonttype": "none"}):
        fig.savefig(png, dpi=150, bbox_inches="tight")
        fig.savefig(svg, bbox_inches="tight", metadata={"Date": None})
    return png, svg
