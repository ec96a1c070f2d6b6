"""The downstream-harm figure (diffaudit.figures.harm) and the grid layout of figures/style.py."""
from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection

from diffaudit.families.sd import PAPER_LAYERS
from diffaudit.figures.harm import HARM_INPUT_COLUMNS, MITIGATIONS, ROWS, TASKS, harm_figure, harm_panels
from diffaudit.figures.style import LayerAxis, new_figure

#: A handful of SD layers across the blocks (conv_in, down, mid, up, conv_out), at their paper layer index.
LAYERS = [PAPER_LAYERS[i] for i in (0, 1, 2, 6, 19, 24, 25, 44)]
METRICS = ("pck", "position_following", "hub_ratio")


def planted(i: int, task: str, mitigation: str, metric: str) -> float:
    """A distinct share in [0.05, 0.95] per cell, so that a line can be checked against its rows."""
    k = MITIGATIONS.index(mitigation)
    return 0.05 + ((7 * i + 3 * k + 5 * TASKS.index(task) + METRICS.index(metric)) % 19) / 20


def synthetic_harm(model: str = "sd15") -> pd.DataFrame:
    rows = []
    for layer in LAYERS:
        i = PAPER_LAYERS.index(layer)
        for task in TASKS:
            unit, n = ("tokens", 4096) if task == "stereo" else ("images", 8)
            for mit in MITIGATIONS:
                for metric in METRICS:
                    v = planted(i, task, mit, metric)
                    rows.append((model, i, layer, task, mit, metric, v, v - 0.04, v + 0.04, n, unit, ""))
    return pd.DataFrame(rows, columns=HARM_INPUT_COLUMNS)


def panel(fig, metric: str, task: str):
    ncols = len(fig.axes) // len(ROWS) if len(fig.axes) % len(ROWS) == 0 else None
    assert ncols, "the figure is not a rows x columns grid"
    r = [m for m, _ in ROWS].index(metric)
    return fig.axes[r * ncols + TASKS.index(task)]


def mitigation_lines(ax) -> dict:
    return {ln.get_label(): ln for ln in ax.get_lines() if ln.get_label() in MITIGATIONS}


def bands(ax) -> list:
    return [c for c in ax.collections if isinstance(c, PolyCollection)]


def texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def svg_texts(path) -> list[str]:
    root = ET.parse(path).getroot()
    return ["".join(e.itertext()).strip() for e in root.iter() if e.tag.endswith("text")]


@pytest.fixture(scope="module")
def harm():
    return synthetic_harm()


def test_writes_png_and_svg(tmp_path, harm):
    png, svg = harm_figure(harm, tmp_path / "fig" / "harm_sd15", model="sd15")
    assert (png.name, svg.name) == ("harm_sd15.png", "harm_sd15.svg")
    assert png.stat().st_size > 5000 and svg.stat().st_size > 5000
    found = " ".join(svg_texts(svg))
    for t in ("sd15", "flip", "shift", "stereo", "n = 8 images", "n = 4096 tokens", "PCK (%)",
              "position following (%)", "mitigation", "layers:", "blocks:", "dn0", "up1", "attn", *MITIGATIONS):
        assert t in found, t
    assert "not computed" not in found


def test_grid_lines_and_bands_carry_the_planted_values(harm):
    fig = harm_panels(harm)
    assert len(fig.axes) == len(ROWS) * len(TASKS)
    xs = [PAPER_LAYERS.index(n) for n in LAYERS]
    for metric, _ in ROWS:
        for task in TASKS:
            ax = panel(fig, metric, task)
            lines = mitigation_lines(ax)
            assert sorted(lines) == sorted(MITIGATIONS) and len(bands(ax)) == len(MITIGATIONS)
            for mit, ln in lines.items():
                np.testing.assert_array_equal(ln.get_xdata(), xs)  # x = the paper's layer index
                np.testing.assert_allclose(ln.get_ydata(), [100 * planted(i, task, mit, metric) for i in xs])
            assert lines["none"].get_color() == "black"
            assert lines["none"].get_linewidth() > max(ln.get_linewidth() for m, ln in lines.items() if m != "none")
            assert len({ln.get_color() for ln in lines.values()}) == len(MITIGATIONS)
            assert ax.get_ylim()[0] <= 0 and ax.get_ylim()[1] >= 100
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 1 and [t.get_text() for t in legends[0].get_texts()] == list(MITIGATIONS)


def test_one_line_and_band_per_mitigation_with_finite_values(harm):
    h = harm.copy()
    cell = (h["task"] == "shift") & (h["metric"] == "pck")
    h.loc[cell & (h["mitigation"] == "channel_mean"), ["value", "ci_low", "ci_high"]] = np.nan  # all NaN
    h = h[~(cell & (h["mitigation"] == "anomaly_inpaint"))]  # absent
    gap = (h["task"] == "flip") & (h["metric"] == "pck") & (h["mitigation"] == "all") & (h["layer"] == LAYERS[3])
    h = h[~gap]  # one layer skipped
    fig = harm_panels(h)
    ax = panel(fig, "pck", "shift")
    expected = sorted(set(MITIGATIONS) - {"channel_mean", "anomaly_inpaint"})
    assert sorted(mitigation_lines(ax)) == expected and len(bands(ax)) == len(expected)
    assert len(bands(panel(fig, "position_following", "shift"))) == len(MITIGATIONS)  # other panels untouched
    y = mitigation_lines(panel(fig, "pck", "flip"))["all"].get_ydata()
    assert np.isnan(y[3]) and np.isfinite(np.delete(y, 3)).all()  # a gap, not a line across the skipped layer
    # the legend still lists every mitigation drawn anywhere, in the fixed order
    legend = next(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)
    assert [t.get_text() for t in legend.get_texts()] == list(MITIGATIONS)


def test_missing_task_and_metric_say_not_computed(tmp_path, harm):
    h = harm[harm["task"] != "stereo"].copy()  # no stereo at all
    pf = (h["task"] == "shift") & (h["metric"] == "position_following")
    h.loc[pf, ["value", "ci_low", "ci_high"]] = np.nan
    h.loc[pf, "note"] = "no token moves by 2 or more"
    fig = harm_panels(h)
    assert len(fig.axes) == len(ROWS) * len(TASKS)  # the stereo column is still there
    for metric, _ in ROWS:
        ax = panel(fig, metric, "stereo")
        assert texts(ax) == ["not computed"] and not mitigation_lines(ax) and not bands(ax)
    ax = panel(fig, "position_following", "shift")
    assert texts(ax) == ["not computed\nno token moves by 2 or more"] and not mitigation_lines(ax)
    assert len(mitigation_lines(panel(fig, "pck", "shift"))) == len(MITIGATIONS)
    png, svg = harm_figure(h, tmp_path / "partial", model="sd15")
    assert png.stat().st_size > 5000 and "not computed" in " ".join(svg_texts(svg))
    # nothing at all still renders: every panel not computed
    png, _ = harm_figure(pd.DataFrame(columns=HARM_INPUT_COLUMNS), tmp_path / "empty", model="sd15")
    assert png.stat().st_size > 1000


def test_an_extra_task_and_mitigation_get_their_own_column_and_colour(harm):
    extra = harm[harm["task"] == "flip"].copy()
    extra["task"] = "rotate"
    other = harm[(harm["task"] == "flip") & (harm["mitigation"] == "none")].copy()
    other["mitigation"] = "whitening"
    fig = harm_panels(pd.concat([harm, extra, other], ignore_index=True))
    assert len(fig.axes) == len(ROWS) * (len(TASKS) + 1)
    assert fig.axes[len(TASKS)].get_title().startswith("rotate")
    lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines() if not ln.get_label().startswith("_")}
    assert "whitening" in lines
    assert lines["whitening"].get_color() not in {ln.get_color() for m, ln in lines.items() if m != "whitening"}


def test_grid_layout_labels_every_column_and_nothing_overlaps(harm):
    fig = harm_panels(harm)
    r = fig.canvas.get_renderer()
    ncols = len(TASKS)
    bottoms, others = fig.axes[-ncols:], fig.axes[:-ncols]
    for ax in bottoms:
        labels = [t for t in ax.get_xticklabels() if t.get_text()]
        assert len(labels) == len(LAYERS)
        boxes = sorted((t.get_window_extent(r) for t in labels), key=lambda b: b.x0)
        assert all(b1.x0 >= b0.x1 for b0, b1 in zip(boxes[:-1], boxes[1:]))
    for ax in others:  # shared x: only the bottom row is labelled
        assert not any(t.get_visible() and t.get_text() for t in ax.get_xticklabels())
    assert [t.get_text() for t in fig.texts].count("layers:") == 1
    boxes = [ax.get_window_extent(r) for ax in fig.axes]
    assert not any(a.overlaps(b) for k, a in enumerate(boxes) for b in boxes[k + 1:])
    leg = next(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)
    assert all(not leg.get_window_extent(r).overlaps(b) for b in boxes)  # outside every panel


def test_new_figure_default_is_the_paper_column():
    axis = LayerAxis(list(PAPER_LAYERS), np.arange(len(PAPER_LAYERS), dtype=float))
    fig, axes = new_figure(axis)
    assert axes.shape == (3,) and tuple(fig.get_size_inches()) == pytest.approx((8.0, 5.0))
    fig, grid = new_figure(axis, nrows=2, ncols=3, height=4.0)
    assert grid.shape == (2, 3) and fig.get_size_inches()[1] == pytest.approx(4.0)
    w = grid[1, 0].get_window_extent().width
    assert w * 72 / fig.dpi / (len(PAPER_LAYERS) + 0.5) >= 7.0  # each panel keeps ~7.5 pt per layer tick
