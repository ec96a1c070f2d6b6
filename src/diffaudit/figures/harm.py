"""The downstream-harm figure of one model: dense correspondence by nearest-neighbour matching, per layer and
mitigation.

Input: the model's ``harm.csv`` (columns :data:`HARM_INPUT_COLUMNS`; ``value``, ``ci_low`` and ``ci_high`` are
shares in [0, 1], drawn in %). A grid of panels over the paper figure's layer axis (x = ``layer_index``; block and
layer-type labels under each column):

* rows: the metrics of :data:`ROWS`, ``pck`` (share of source tokens matched within 1 token of their ground-truth
  correspondence) and ``position_following`` (share of the tokens that moved by at least 2 tokens that are matched
  within 1 token of their own, old position instead), y from 0 to 100 %;
* columns: the tasks of :data:`TASKS` (``flip``, ``shift``, ``stereo``), then any other task in the table; the
  column title gives the task and what its interval resamples (``unit``: images, or tokens of a single pair).

In each panel one line per mitigation: ``none`` (the unmodified features) black and thicker, every other
mitigation in its own colour (:data:`MITIGATION_COLOURS`, the same in every panel and every model), each with its
95 % bootstrap interval as a translucent band; a layer a mitigation skips is a gap in its line. A panel without any
finite value says "not computed" with the table's ``note`` where there is one. One legend, right of the top-right
panel. ``hub_ratio`` is in the table but not drawn. Written as ``<out_stem>.png`` and ``.svg``.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator

from .style import ACC_LIM, add_legend, draw_band, draw_line, layer_axis, new_figure, not_computed, save_figure, \
    setup_layer_axis

HARM_INPUT_COLUMNS = ["model", "layer_index", "layer", "task", "mitigation", "metric", "value", "ci_low", "ci_high",
                      "n", "unit", "note"]
#: (metric, y label) of the panel rows, top to bottom.
ROWS = (("pck", "PCK (%)"), ("position_following", "position following (%)"))
#: The columns always drawn (a missing one says "not computed"); other tasks of the table follow.
TASKS = ("flip", "shift", "stereo")
NONE = "none"
MITIGATIONS = (NONE, "position_mean", "position_subspace", "anomaly_inpaint", "channel_mean", "all")
NONE_STYLE = dict(color="black", lw=2.0, zorder=5)
MITIGATION_COLOURS = {"position_mean": "tab:blue", "position_subspace": "tab:cyan", "anomaly_inpaint": "tab:green",
                      "channel_mean": "tab:purple", "all": "tab:red"}
#: Colours of mitigations not in :data:`MITIGATION_COLOURS`, in order of appearance.
EXTRA_COLOURS = ("tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:gray")
SCALE = 100.0
HEIGHT = 4.6


def _ordered(present, first) -> list[str]:
    present = list(dict.fromkeys(str(v) for v in present))
    return [v for v in first if v in present] + [v for v in present if v not in first]


def mitigation_styles(mitigations) -> dict[str, dict]:
    """The line style of each mitigation: ``none`` black and thick, the known ones their fixed colour, others the
    next of :data:`EXTRA_COLOURS`."""
    styles, k = {}, 0
    for m in mitigations:
        if m == NONE:
            styles[m] = dict(NONE_STYLE)
        elif m in MITIGATION_COLOURS:
            styles[m] = dict(color=MITIGATION_COLOURS[m], lw=1.3, zorder=4)
        else:
            styles[m] = dict(color=EXTRA_COLOURS[k % len(EXTRA_COLOURS)], lw=1.3, zorder=4)
            k += 1
    return styles


def _interval_title(rows: pd.DataFrame) -> str:
    """What the task's intervals resample, e.g. ``n = 16 images`` or ``n = 3969-4096 tokens``."""
    if rows.empty or "unit" not in rows:
        return ""
    if "value" in rows:  # rows with a value (a mitigation with nothing to act on has none, and n = 0)
        rows = rows[pd.to_numeric(rows["value"], errors="coerce").notna()]
    units = [str(u) for u in dict.fromkeys(rows["unit"].dropna())]
    n = pd.to_numeric(rows.get("n"), errors="coerce").dropna() if "n" in rows else pd.Series(dtype=float)
    if not units:
        return ""
    if n.empty:
        return f"interval over {'/'.join(units)}"
    lo, hi = int(n.min()), int(n.max())
    return f"n = {lo}{'' if lo == hi else f'-{hi}'} {'/'.join(units)}"


def _note(rows: pd.DataFrame) -> str:
    if "note" not in rows:
        return ""
    notes = [str(v) for v in rows["note"].dropna() if str(v).strip()]
    if not notes:
        return ""
    note = max(set(notes), key=notes.count)  # the most frequent reason
    return "\n".join(textwrap.wrap(note, 44, max_lines=3, placeholder=" ..."))


def harm_panels(harm: pd.DataFrame, model: str = "") -> Figure:
    """The figure (matplotlib ``Figure``, not saved): ``fig.axes`` row by row, ``len(ROWS)`` x number of tasks."""
    harm = harm.copy() if harm is not None else pd.DataFrame(columns=HARM_INPUT_COLUMNS)
    for c in HARM_INPUT_COLUMNS:
        if c not in harm:
            harm[c] = np.nan
    for c in ("task", "mitigation", "metric", "layer"):
        harm[c] = harm[c].astype(str)
    for c in ("value", "ci_low", "ci_high"):
        harm[c] = pd.to_numeric(harm[c], errors="coerce")
    if not model:
        models = harm["model"].dropna().astype(str).unique()
        model = ", ".join(models)
    axis = layer_axis([harm])
    pos = axis.pos
    tasks = list(TASKS) + [t for t in _ordered(harm["task"], TASKS) if t not in TASKS]
    styles = mitigation_styles(_ordered(harm["mitigation"], MITIGATIONS))

    fig, grid = new_figure(axis, nrows=len(ROWS), ncols=len(tasks), height=HEIGHT)
    grid = np.asarray(grid, dtype=object).reshape(len(ROWS), len(tasks))
    handles: dict[str, Line2D] = {}
    for j, task in enumerate(tasks):
        of_task = harm[harm["task"] == task]
        sub = _interval_title(of_task)
        grid[0, j].set_title(task + (f"  ({sub})" if sub else ""), fontsize=10)
        for i, (metric, ylabel) in enumerate(ROWS):
            ax = grid[i, j]
            if j == 0:
                ax.set_ylabel(ylabel)
            rows = of_task[of_task["metric"] == metric]
            drawn = False
            for mit, style in styles.items():
                r = rows[rows["mitigation"] == mit].drop_duplicates("layer", keep="last").set_index("layer")
                r = r[r.index.isin(pos)]
                if not np.isfinite(r["value"].to_numpy(float)).any():
                    continue
                r = r.reindex(axis.names)  # every layer of the axis: a skipped layer is a gap
                x = axis.xs
                y, lo, hi = (r[c].to_numpy(float) * SCALE for c in ("value", "ci_low", "ci_high"))
                ln = draw_line(ax, x, y, label=mit, **style)
                draw_band(ax, x, lo, hi, style["color"])
                handles.setdefault(mit, ln)
                drawn = True
            if drawn:
                ax.set_ylim(*ACC_LIM)
                ax.yaxis.set_major_locator(FixedLocator([0, 25, 50, 75, 100]))
            else:
                note = _note(rows)
                not_computed(ax, "not computed" + (f"\n{note}" if note else ""))
    legend = [(m, handles[m]) for m in styles if m in handles]
    if legend:
        add_legend(grid[0, -1], [h for _, h in legend], [m for m, _ in legend], title="mitigation")
    setup_layer_axis(fig, grid, axis)
    fig.suptitle(f"{model}: dense correspondence by nearest-neighbour matching per layer and mitigation "
                 "(bands: 95% bootstrap intervals)", fontsize=10)
    return fig


def harm_figure(harm: pd.DataFrame, out_stem, model: str = "") -> tuple[Path, Path]:
    """Draw :func:`harm_panels` and write ``<out_stem>.png`` and ``<out_stem>.svg``."""
    return save_figure(harm_panels(harm, model), out_stem)
