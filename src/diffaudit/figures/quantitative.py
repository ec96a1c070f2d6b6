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
computed". ``reference=`` (the paper's tables of the model, :func:`diffaudit.reference.paper_tables`) overlays the
published numbers as thin black/gray dashed lines labelled "paper", matched to our layers by name. Legends sit to
the right of the panels so they never cover data. The y-limits are the paper's (accuracy -5..105, similarity
0.46..2.8, norm 0.45..5.8) and widen when data (or the overlay) fall outside them.

:func:`plot_cross_model` draws one line per model in each panel: accuracy at 8x8 (solid) and at the layer's native
granularity (dashed), corner ratio, and anomaly relative norm. When all models share one ordered layer list they sit
on that layer axis (as above); when the lists differ (model families with different layer counts: SD-1/2 U-Nets 45
layers, SDXL 34, SD3 / FLUX transformers), every model is drawn on a relative depth axis instead, its layer i of n
at x = i / (n - 1) (0 = first layer, 1 = last; :func:`relative_depth`), with each U-Net's ``mid_block`` marked.

Layer names of diffusion transformers are labelled too: the patch embedding (``pos_embed``, ``x_embedder``) is type
``embed`` in block ``in``, ``transformer_blocks[i]`` / ``single_transformer_blocks[i]`` are whole blocks (type
``block``) named tb{i} / stb{i}, grouped on the layer axis as "joint" and "single" (:func:`block_group`,
:func:`layer_label`).

Both write ``<out_stem>.png`` (dpi 150) and ``<out_stem>.svg`` with ``bbox_inches="tight"``; SVGs are
deterministic (fixed ``svg.hashsalt``, no date) and keep their text as text (``svg.fonttype="none"``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator
from matplotlib.transforms import Bbox

from ..layers import parse_segment

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
TABLE_KEYS = ("position_probe", "token_group_similarity", "anomaly_rel_norm")

# ---------------------------------------------------------------------------------------------
# Layer names -> type and block labels
# ---------------------------------------------------------------------------------------------

_TYPE_OF_LIST = {"resnets": "res", "attentions": "attn", "downsamplers": "down", "upsamplers": "up"}
#: The patch embeddings of diffusion transformers (SD3 ``pos_embed``, FLUX ``x_embedder``): their first layer.
PATCH_EMBEDDINGS = ("pos_embed", "x_embedder", "patch_embed")
#: DiT block lists -> (per-block label prefix, label of a run of them on the layer axis): SD3's MMDiT blocks and
#: FLUX's double-stream blocks are "joint" (text and image streams), FLUX's single-stream blocks "single".
_DIT_BLOCKS = {"transformer_blocks": ("tb", "joint"), "single_transformer_blocks": ("stb", "single")}


def _segments(name: str) -> list[tuple[str, list[int]]]:
    parsed = (parse_segment(part) for part in str(name).strip().split("."))  # diffaudit.layers' one parser
    return [(part[0], list(part[1])) if part else (raw, []) for part, raw in zip(parsed, str(name).strip().split("."))]


def layer_block(name: str) -> str:
    """Block label of a layer: in, dn0..dn3, mid, up0..up3, out, tb{i}, stb{i} (else the name's first attribute).

    ``conv_in`` -> in; ``down_blocks[i]...`` -> dn{i}; ``mid_block...`` -> mid; ``up_blocks[i]...`` -> up{i};
    ``conv_out``, ``conv_norm_out``, ``conv_act`` -> out; on diffusion transformers the patch embedding
    (``pos_embed`` of SD3, ``x_embedder`` of FLUX) -> in, ``transformer_blocks[i]...`` -> tb{i},
    ``single_transformer_blocks[i]...`` -> stb{i}; anything else (e.g. ``time_embedding.linear_1``) -> its first
    attribute name.
    """
    segs = _segments(name)
    head, idx = segs[0]
    if head == "conv_in" or (head in PATCH_EMBEDDINGS and len(segs) == 1):
        return "in"
    if head in ("conv_out", "conv_norm_out", "conv_act"):
        return "out"
    if head == "mid_block":
        return "mid"
    if head in ("down_blocks", "up_blocks") and idx:
        return f"{'dn' if head == 'down_blocks' else 'up'}{idx[0]}"
    if head in _DIT_BLOCKS and idx:
        return f"{_DIT_BLOCKS[head][0]}{idx[0]}"
    return head


def layer_type(name: str) -> str:
    """Type label of a layer: conv, res, attn, down, up (else a short form of the deepest attribute).

    The first ``resnets``/``attentions``/``downsamplers``/``upsamplers`` segment decides (so a sub-module such as
    ``up_blocks[1].attentions[0].proj_out`` is still ``attn``); ``conv_in``/``conv_out`` are ``conv``; a whole
    block (``down_blocks[1]``, ``mid_block``, a DiT's ``transformer_blocks[i]`` or ``single_transformer_blocks[i]``)
    is ``block``; a DiT's patch embedding (``pos_embed``, ``x_embedder``) is ``embed``.
    """
    segs = _segments(name)
    for attr, _ in segs[1:]:
        if attr in _TYPE_OF_LIST:
            return _TYPE_OF_LIST[attr]
    head, idx = segs[0]
    if head.startswith("conv"):
        return "conv"
    if len(segs) == 1 and head in PATCH_EMBEDDINGS:
        return "embed"
    if len(segs) == 1 and (head == "mid_block" or (head in ("down_blocks", "up_blocks", *_DIT_BLOCKS) and idx)):
        return "block"
    last = segs[-1][0]
    return last if len(last) <= 6 else last[:5] + "."


def block_group(name: str) -> str:
    """The group a layer belongs to on the layer axis: its :func:`layer_block`, except that a diffusion
    transformer's blocks group by stream (``transformer_blocks[i]`` -> joint, ``single_transformer_blocks[i]`` ->
    single), so a DiT's axis reads in | joint | single rather than one group per block."""
    head, idx = _segments(name)[0]
    if head in _DIT_BLOCKS and idx:
        return _DIT_BLOCKS[head][1]
    return layer_block(name)


def layer_label(name: str) -> str:
    """The per-layer tick label: :func:`layer_type`, but a whole DiT block is named by its block (tb3, stb0)."""
    t = layer_type(name)
    if t == "block" and _segments(name)[0][0] in _DIT_BLOCKS:
        return layer_block(name)
    return t


def block_boundaries(names: Sequence[str]) -> list[int]:
    """Positions i in ``names`` where the block (:func:`block_group`) changes from ``names[i-1]`` to
    ``names[i]``."""
    blocks = [block_group(n) for n in names]
    return [i for i in range(1, len(blocks)) if blocks[i] != blocks[i - 1]]


def block_spans(names: Sequence[str]) -> list[tuple[str, int, int]]:
    """Runs of consecutive layers of one block (:func:`block_group`): (block, first position, last position)."""
    cuts = [0, *block_boundaries(names), len(names)]
    return [(block_group(names[a]), a, b - 1) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


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


def _nonempty(df) -> bool:
    return df is not None and isinstance(df, pd.DataFrame) and not df.empty


def layer_axis(frames: Sequence[pd.DataFrame | None]) -> LayerAxis:
    """x = ``layer_index`` when name <-> index is one-to-one over all tables, else the rank in index order."""
    pairs = []
    for df in frames:
        if _nonempty(df) and {"layer", "layer_index"} <= set(df.columns):
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


# ---------------------------------------------------------------------------------------------
# Table preparation
# ---------------------------------------------------------------------------------------------

def _for_model(df, model: str | None):
    if not _nonempty(df):
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
    last = probe.groupby("layer")["epoch"].transform("max")
    d = probe[probe["epoch"] == last]
    wide = d.groupby(["layer", "granularity"])[column].agg(stat).unstack("granularity") * 100.0
    return wide.sort_index(axis=1), metric


def _has(df, *columns: str) -> bool:
    """The table has all ``columns`` and at least one finite value in each."""
    return all(c in df.columns and np.isfinite(pd.to_numeric(df[c], errors="coerce")).any() for c in columns)


SIM_CI_COLUMNS = ("corner_ratio_ci_low", "corner_ratio_ci_high", "border_ratio_ci_low", "border_ratio_ci_high")


def similarity_ratios(sim: pd.DataFrame) -> pd.DataFrame:
    """corner/border ratio per layer (and their interval columns where the table has them); conv_out dropped,
    non-positive / non-finite values -> NaN."""
    d = sim[sim["layer"].astype(str) != "conv_out"]
    cols = ["corner_ratio", "border_ratio", *(c for c in SIM_CI_COLUMNS if c in d.columns)]
    out = d.groupby("layer")[cols].mean()
    return out.where(np.isfinite(out) & (out > 0))


def _source_kind(source: str) -> str:
    s = str(source)
    return "user" if s.startswith("user") else s


def _source_style(source: str) -> str | tuple:
    return SOURCE_LINESTYLE.get(_source_kind(source), "-.")


def anomaly_norms(an: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """label_source -> per-layer rel_norm_mean / rel_norm_std (paper first, then auto, then the rest)."""
    d = an.copy()
    if "label_source" not in d.columns:
        d["label_source"] = "paper"
    d["label_source"] = d["label_source"].fillna("unknown").astype(str)
    order = {"paper": 0, "auto": 1}
    out = {}
    cols = ["rel_norm_mean", "rel_norm_std", *(c for c in ("rel_norm_ci_low", "rel_norm_ci_high") if c in d.columns)]
    for src in sorted(d["label_source"].unique(), key=lambda s: (order.get(_source_kind(s), 2), s)):
        g = d[d["label_source"] == src].groupby("layer")[cols].mean()
        out[src] = g
    return out


def _series(axis: LayerAxis, values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) over the layers of ``values`` that are on the axis, in axis order."""
    pos = axis.pos
    names = [n for n in axis.names if n in values.index]
    x = np.array([pos[n] for n in names], dtype=float)
    y = np.array([values.get(n, np.nan) for n in names], dtype=float)
    return x, y


# ---------------------------------------------------------------------------------------------
# Drawing helpers
# ---------------------------------------------------------------------------------------------

def _line(ax, x, y, markers: bool = False, **kw):
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


def _band(ax, x, lo, hi, color, alpha: float = CI_ALPHA, positive: bool = False) -> bool:
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


def _tick_fmt(v, _pos=None) -> str:
    return f"{v:.1f}" if float(v).is_integer() or v >= 1 else f"{v:g}"


def _log2_ticks(lo: float, hi: float, max_ticks: int = 7) -> list[float]:
    e0, e1 = math.ceil(math.log2(lo) - 1e-9), math.floor(math.log2(hi) + 1e-9)
    exps = list(range(e0, e1 + 1))
    step = max(1, math.ceil(len(exps) / max_ticks))
    return [2.0 ** e for e in exps[::step]]


def _finite(*arrays) -> np.ndarray:
    vals = [np.asarray(a, float).ravel() for a in arrays if a is not None and np.size(a)]
    if not vals:
        return np.zeros(0)
    v = np.concatenate(vals)
    return v[np.isfinite(v)]


def _linear_limits(paper: tuple[float, float], values: np.ndarray, margin: float = 5.0) -> tuple[float, float]:
    """The paper's range; a side is widened (with a margin) only when data fall outside it."""
    lo, hi = paper
    if values.size:
        if values.min() < lo:
            lo = float(values.min()) - margin
        if values.max() > hi:
            hi = float(values.max()) + margin
    return lo, hi


def _log_limits(paper: tuple[float, float], low_values: np.ndarray, high_values: np.ndarray,
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


def _set_log_y(ax, lo: float, hi: float, ticks: Sequence[float]) -> None:
    ax.set_yscale("log", base=2)
    ax.set_ylim(lo, hi)
    ax.yaxis.set_major_locator(FixedLocator(list(ticks)))
    ax.yaxis.set_major_formatter(FuncFormatter(_tick_fmt))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _not_computed(ax, what: str = "not computed") -> None:
    ax.text(0.5, 0.5, what, transform=ax.transAxes, ha="center", va="center", color="0.4", fontsize=10,
            style="italic")
    ax.yaxis.set_major_locator(NullLocator())
    ax.yaxis.set_minor_locator(NullLocator())


def _legend(ax, handles=None, labels=None, **kw):
    """Legend outside the axes, on the right: it never covers data."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return None
    kw = dict(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8, frameon=True,
              handlelength=2.2) | kw
    return ax.legend(handles, labels, **kw)


def _new_figure(axis: LayerAxis) -> tuple[Figure, np.ndarray]:
    span = (axis.xs.max() - axis.xs.min() + 1.5) if len(axis) else 1.0
    # keep at least ~7.5 pt between layer ticks: widen the figure for long layer lists
    width = max(FIGSIZE[0], span * 7.5 / 72 / 0.775)
    fig = Figure(figsize=(width, FIGSIZE[1]))
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 1, sharex=True)
    fig.subplots_adjust(hspace=0.05)
    return fig, axes


def _setup_layer_axis(fig: Figure, axes, axis: LayerAxis) -> None:
    """Limits, block separators, layer-type tick labels, block-name row and the row labels."""
    if not len(axis):
        for ax in axes:
            ax.set_xlim(-0.5, 0.5)
            ax.xaxis.set_major_locator(NullLocator())
        return
    xs = axis.xs
    lo, hi = float(xs.min()) - 0.5, float(xs.max()) + 1.0
    spans = block_spans(axis.names)
    seps = [(xs[a - 1] + xs[a]) / 2 for _, a, _ in spans[1:]]
    for ax in axes:
        ax.set_xlim(lo, hi)
        for s in seps:
            ax.axvline(s, **SEPARATOR)
        ax.tick_params(axis="x", which="minor", length=0)
    bottom = axes[-1]
    ax_w_pt = bottom.get_position().width * fig.get_figwidth() * 72
    spacing = ax_w_pt / (hi - lo)
    fs = float(np.clip(spacing * 0.95, 5.0, 10.0))
    bottom.set_xticks(xs)
    bottom.set_xticklabels([layer_label(n) for n in axis.names], rotation=90, fontsize=fs)
    centers = [(xs[a] + xs[b]) / 2 for _, a, b in spans]
    bottom.xaxis.remove_overlapping_locs = False
    bottom.set_xticks(centers, minor=True)
    bottom.set_xticklabels([b for b, _, _ in spans], minor=True, fontsize=fs)

    canvas = fig.canvas
    canvas.draw()
    r = canvas.get_renderer()
    major = [t for t in bottom.get_xticklabels() if t.get_visible() and t.get_text()]
    mb = Bbox.union([t.get_window_extent(r) for t in major])
    # at least 1.4 font heights, so that the "layers:" and "blocks:" row labels never touch (short type names)
    height_pt = max(mb.height * 72 / fig.dpi, 1.4 * fs)
    pad_pt = height_pt + bottom.xaxis.get_major_ticks()[0].get_pad() + 4
    bottom.tick_params(axis="x", which="minor", pad=pad_pt)
    canvas.draw()
    minor = [t for t in bottom.get_xticklabels(minor=True) if t.get_visible() and t.get_text()]
    boxes = sorted((t.get_window_extent(r) for t in minor), key=lambda b: b.x0)
    if any(b1.x0 < b0.x1 + 2 for b0, b1 in zip(boxes[:-1], boxes[1:])):
        # narrow blocks: block names would touch -> write them vertically as well
        for t in minor:
            t.set_rotation(90)
        canvas.draw()
    minor = [t for t in bottom.get_xticklabels(minor=True) if t.get_visible() and t.get_text()]
    nb = Bbox.union([t.get_window_extent(r) for t in minor])
    axb = bottom.get_window_extent(r)
    x_right = min(axb.x0, mb.x0, nb.x0) - 6
    inv = fig.transFigure.inverted()
    for label, bb in (("layers:", mb), ("blocks:", nb)):
        fx, fy = inv.transform((x_right, (bb.y0 + bb.y1) / 2))
        fig.text(fx, fy, label, ha="right", va="center", fontsize=min(10.0, fs + 0.5))


def _save(fig: Figure, out_stem) -> tuple[Path, Path]:
    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    png, svg = out_stem.with_name(out_stem.name + ".png"), out_stem.with_name(out_stem.name + ".svg")
    with matplotlib.rc_context({"svg.hashsalt": SVG_HASHSALT, "svg.fonttype": "none"}):
        fig.savefig(png, dpi=150, bbox_inches="tight")
        fig.savefig(svg, bbox_inches="tight", metadata={"Date": None})
    return png, svg


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
        _not_computed(ax)
    else:
        wide, metric = final_accuracy(probe)
        if metric != "per_axis":
            ax.set_ylabel(f"test accuracy\n({metric})")
        sd, _ = final_accuracy(probe, "std")  # several seeds (corrected mode): a +-1 sd band per granularity
        ci = ((final_accuracy(probe, column="ci_low")[0], final_accuracy(probe, column="ci_high")[0])
              if _has(probe, "ci_low", "ci_high") else None)  # the bootstrap interval (mean over seeds)
        cols = matplotlib.colormaps["Reds"](np.linspace(0.25, 0.9, max(len(wide.columns), 1)))
        for c, g in zip(cols, wide.columns):
            x, y = _series(axis, wide[g])
            _line(ax, x, y, markers, color=c, lw=1.5, label=_gran_label(g), zorder=3)
            _, e = _series(axis, sd[g]) if g in sd.columns else (x, np.full_like(y, np.nan))
            if np.isfinite(e).any():
                ax.fill_between(x, y - e, y + e, color=c, alpha=SD_ALPHA, lw=0, zorder=2)
            vals.append(y)
            if ci is not None and g in ci[0].columns:
                lo, hi = _series(axis, ci[0][g])[1], _series(axis, ci[1][g])[1]
                if _band(ax, x, lo, hi, c):
                    vals.extend([lo, hi])
    if ref_probe is not None:
        rwide, _ = final_accuracy(ref_probe)
        first = True
        for g in rwide.columns:
            x, y = _series(axis, rwide[g])
            if np.isfinite(y).any():
                _line(ax, x, y, **REF_STYLE, label="paper" if first else "_nolegend_")
                first = False
                vals.append(y)
    if probe is not None or ref_probe is not None:
        ax.set_ylim(*_linear_limits(ACC_LIM, _finite(*vals)))
        ax.set_yticks([0, 50, 100])
        _legend(ax)


def _panel_similarity(ax, axis: LayerAxis, sim, ref_sim, markers: bool) -> None:
    ax.set_ylabel("rel. similarity")
    vals = []
    if sim is None:
        _not_computed(ax)
    else:
        r = similarity_ratios(sim)
        for col, color, label in (("corner_ratio", COLOR_CORNER, "corner"), ("border_ratio", COLOR_BORDER,
                                                                               "border")):
            x, y = _series(axis, r[col])
            _line(ax, x, y, markers, color=color, lw=1.5, label=label, zorder=3)
            vals.append(y)
            if _has(r, f"{col}_ci_low", f"{col}_ci_high"):
                lo, hi = _series(axis, r[f"{col}_ci_low"])[1], _series(axis, r[f"{col}_ci_high"])[1]
                if _band(ax, x, lo, hi, color, positive=True):
                    vals.extend([lo, hi])
    if ref_sim is not None:
        r = similarity_ratios(ref_sim)
        for col, style, label in (("corner_ratio", REF_STYLE, "paper corner"),
                                  ("border_ratio", REF_STYLE_BORDER, "paper border")):
            x, y = _series(axis, r[col])
            if np.isfinite(y).any():
                _line(ax, x, y, **style, label=label)
                vals.append(y)
    if sim is not None or ref_sim is not None:
        ax.axhline(1.0, **UNITY)
        v = _finite(*vals)
        lo, hi = _log_limits(SIM_LIM, v, v)
        _set_log_y(ax, lo, hi, _log2_ticks(lo, hi))
        _legend(ax)


def _panel_norm(ax, axis: LayerAxis, an, ref_an, markers: bool) -> None:
    ax.set_ylabel("rel. norm")
    lows, highs = [], []
    if an is None:
        _not_computed(ax)
    else:
        by_source = anomaly_norms(an)
        single = len(by_source) == 1
        for src, g in by_source.items():
            x, m = _series(axis, g["rel_norm_mean"])
            _, s = _series(axis, g["rel_norm_std"])
            s = np.nan_to_num(s, nan=0.0)
            label = "anomalies" if single and src == "paper" else f"anomalies ({src} labels)"
            _line(ax, x, m, markers, color=COLOR_ANOMALY, lw=1.5, ls=_source_style(src), label=label, zorder=3)
            lower = m - s
            lower = np.where(lower > 0, lower, np.nanmin(m[m > 0]) / 1e3 if (m > 0).any() else 1e-3)
            ax.fill_between(x, lower, m + s, color=COLOR_ANOMALY, alpha=SD_ALPHA, lw=0, zorder=2)
            fin = np.isfinite(m)
            iso = fin & ~np.r_[False, fin[:-1]] & ~np.r_[fin[1:], False]
            if iso.any():  # a band needs two neighbours; show the +-1 sd of a lone layer as a bar
                ax.vlines(x[iso], lower[iso], (m + s)[iso], color=COLOR_ANOMALY, alpha=0.3, lw=4, zorder=2)
            lows.append(m)
            highs.append(m + s)
            if _has(g, "rel_norm_ci_low", "rel_norm_ci_high"):
                lo, hi = _series(axis, g["rel_norm_ci_low"])[1], _series(axis, g["rel_norm_ci_high"])[1]
                if _band(ax, x, lo, hi, COLOR_ANOMALY, positive=True):
                    lows.append(lo)
                    highs.append(hi)
    if ref_an is not None:
        d = ref_an
        if "label_source" in d.columns and (d["label_source"] == "paper").any():
            d = d[d["label_source"] == "paper"]
        g = d.groupby("layer")["rel_norm_mean"].mean()
        x, y = _series(axis, g)
        if np.isfinite(y).any():
            _line(ax, x, y, **REF_STYLE, label="paper")
            lows.append(y)
            highs.append(y)
    if an is not None or ref_an is not None:
        ax.axhline(1.0, **UNITY)
        lo, hi = _log_limits(NORM_LIM, _finite(*lows), _finite(*highs), factor=1.08)
        _set_log_y(ax, lo, hi, _log2_ticks(lo, hi))
        _legend(ax)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def plot_quantitative(probe, similarity, anomalies, out_stem, model: str,
                      reference: Mapping[str, pd.DataFrame | None] | None = None) -> tuple[Path, Path]:
    """The paper's 3-panel figure for one model; writes ``<out_stem>.png`` and ``.svg`` and returns both paths.

    Arguments as for :func:`quantitative_figure`.
    """
    return _save(quantitative_figure(probe, similarity, anomalies, model, reference), out_stem)


def quantitative_figure(probe, similarity, anomalies, model: str,
                        reference: Mapping[str, pd.DataFrame | None] | None = None) -> Figure:
    """The paper's 3-panel figure for one model as a matplotlib Figure (axes: accuracy, similarity, norm).

    ``probe``, ``similarity``, ``anomalies``: our ``position_probe``, ``token_group_similarity`` and
    ``anomaly_rel_norm`` tables (None or empty -> "not computed"); rows of other models are ignored when the
    table has rows of ``model``. ``reference``: the paper's tables, keyed ``position_probe``,
    ``token_group_similarity``, ``anomaly_rel_norm`` (any may be missing), overlaid and labelled "paper".
    """
    probe, similarity, anomalies = (_for_model(t, model) for t in (probe, similarity, anomalies))
    ref = {k: _for_model((reference or {}).get(k), model) for k in TABLE_KEYS}
    ours = [probe, similarity, anomalies]
    axis = layer_axis(ours)
    if not len(axis):
        axis = layer_axis(list(ref.values()))
    markers = 0 < len(axis) <= 15
    fig, axes = _new_figure(axis)
    _panel_accuracy(axes[0], axis, probe, ref["position_probe"], markers)
    _panel_similarity(axes[1], axis, similarity, ref["token_group_similarity"], markers)
    _panel_norm(axes[2], axis, anomalies, ref["anomaly_rel_norm"], markers)
    axes[0].set_title(str(model))
    fig.align_ylabels(axes)
    _setup_layer_axis(fig, axes, axis)
    return fig


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
    heads = {_segments(n)[0][0] for n in names}
    if heads & {"down_blocks", "up_blocks", "mid_block"}:
        return "U-Net"
    if heads & {*_DIT_BLOCKS, *PATCH_EMBEDDINGS}:
        return "DiT"
    return ""


RELATIVE_TICKS = (0.0, 0.25, 0.5, 0.75, 1.0)
RELATIVE_XLABEL = "relative depth (0 = first layer, 1 = last)"
MID_STYLE = dict(ls=":", lw=1.0, alpha=0.8, zorder=1)


def plot_cross_model(tables_by_model: Mapping[str, Mapping[str, pd.DataFrame | None]], out_stem
                     ) -> tuple[Path, Path]:
    """:func:`cross_model_figure` written to ``<out_stem>.png`` and ``.svg``; returns both paths."""
    return _save(cross_model_figure(tables_by_model), out_stem)


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
    tabs = {m: {k: _for_model((tables_by_model[m] or {}).get(k), m) for k in TABLE_KEYS} for m in models}
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
        fig, axes = _new_figure(axis)
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
                x, y = _series(axis, wide[8])
                _line(ax_acc, x, y, markers, color=c, lw=1.5, zorder=3, label=f"_{m} 8×8", **style)
                acc_vals.append(y)
            x, y = _series(axis, _native_accuracy(t["position_probe"]))
            _line(ax_acc, x, y, markers, color=c, lw=1.2, ls="--", zorder=3, label=f"_{m} native", **style)
            acc_vals.append(y)
            acc_models.append(m)
        if t["token_group_similarity"] is not None:
            x, y = _series(axis, similarity_ratios(t["token_group_similarity"])["corner_ratio"])
            _line(ax_sim, x, y, markers, color=c, lw=1.5, zorder=3, label=f"_{m} corner", **style)
            sim_vals.append(y)
            sim_models.append(m)
        if t["anomaly_rel_norm"] is not None:
            by_source = anomaly_norms(t["anomaly_rel_norm"])
            src = "paper" if "paper" in by_source else next(iter(by_source))
            x, y = _series(axis, by_source[src]["rel_norm_mean"])
            label = m if src == "paper" else f"{m} ({src} labels)"
            _line(ax_norm, x, y, markers, color=c, lw=1.5, ls=_source_style(src), zorder=3, label=f"_{m} norm",
                  **style)
            norm_handles.append((Line2D([], [], color=c, lw=1.5, ls=_source_style(src)), label))
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
        ax_acc.set_ylim(*_linear_limits(ACC_LIM, _finite(*acc_vals)))
        ax_acc.set_yticks([0, 50, 100])
        _legend(ax_acc, h, lab)
    else:
        _not_computed(ax_acc)
    if sim_models:
        ax_sim.axhline(1.0, **UNITY)
        v = _finite(*sim_vals)
        lo, hi = _log_limits(SIM_LIM, v, v)
        _set_log_y(ax_sim, lo, hi, _log2_ticks(lo, hi))
        _legend(ax_sim, *model_handles(sim_models))
    else:
        _not_computed(ax_sim)
    if norm_handles:
        ax_norm.axhline(1.0, **UNITY)
        v = _finite(*norm_vals)
        lo, hi = _log_limits(NORM_LIM, v, v, factor=1.08)
        _set_log_y(ax_norm, lo, hi, _log2_ticks(lo, hi))
        _legend(ax_norm, [h for h, _ in norm_handles], [lab for _, lab in norm_handles])
    else:
        _not_computed(ax_norm)
    axes[0].set_title("cross-model comparison: " + ", ".join(models) if models else "no models",
                      **(dict(pad=10) if relative else {}))  # room for the mid_block triangles
    fig.align_ylabels(axes)
    if relative:
        _setup_relative_axis(axes, {m: (x, colors[m]) for m, x in mids.items()})
    else:
        _setup_layer_axis(fig, axes, axis)
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
