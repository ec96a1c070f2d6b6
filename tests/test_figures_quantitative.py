"""The paper's quantitative 3-panel figure and its cross-model variant."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from diffaudit.figures import cross_model as cm
from diffaudit.figures import layer_labels as ll
from diffaudit.figures import quantitative as q
from diffaudit.figures.cross_model import cross_model_figure, plot_cross_model
from diffaudit.figures.layer_labels import block_boundaries, block_spans, layer_block, layer_type
from diffaudit.figures.quantitative import plot_quantitative, quantitative_figure
from diffaudit.families.sd import PAPER_LAYERS
from diffaudit.paper_files import paper_layer_shape
from diffaudit.tables import PROBE_COLUMNS, RELNORM_COLUMNS, SIMILARITY_COLUMNS

PAPER_DATA = Path("/work/shared/reference/paper-data")

EXPECTED_TYPES = (["conv"] + ["res", "attn", "res", "attn", "down"] * 3 + ["res", "res"] + ["res", "attn", "res"]
                  + ["res", "res", "up"] + ["res", "attn", "res", "attn", "res", "attn", "up"] * 2
                  + ["res", "attn", "res", "attn", "res", "attn"] + ["conv"])
EXPECTED_BLOCKS = (["in"] + ["dn0"] * 5 + ["dn1"] * 5 + ["dn2"] * 5 + ["dn3"] * 2 + ["mid"] * 3 + ["up0"] * 3
                   + ["up1"] * 7 + ["up2"] * 7 + ["up3"] * 6 + ["out"])


# ---------------------------------------------------------------------------------------------
# Layer labels
# ---------------------------------------------------------------------------------------------

def test_type_and_block_labels_of_the_paper_layers():
    assert [layer_type(n) for n in PAPER_LAYERS] == EXPECTED_TYPES
    assert [layer_block(n) for n in PAPER_LAYERS] == EXPECTED_BLOCKS
    assert block_boundaries(PAPER_LAYERS) == [1, 6, 11, 16, 18, 21, 24, 31, 38, 44]
    spans = block_spans(PAPER_LAYERS)
    assert [b for b, _, _ in spans] == ["in", "dn0", "dn1", "dn2", "dn3", "mid", "up0", "up1", "up2", "up3", "out"]
    assert spans[7] == ("up1", 24, 30)


def test_type_and_block_labels_of_other_names():
    assert (layer_type("down_blocks[1].attentions[0]"), layer_block("down_blocks[1].attentions[0]")) == ("attn",
                                                                                                         "dn1")
    assert (layer_type("conv_in"), layer_block("conv_in")) == ("conv", "in")
    assert (layer_type("conv_out"), layer_block("conv_out")) == ("conv", "out")
    assert (layer_type("mid_block.resnets[0]"), layer_block("mid_block.resnets[0]")) == ("res", "mid")
    assert layer_type("up_blocks[0].resnets[2]") == "res"  # not in the paper's list
    assert layer_type("up_blocks[1].attentions[0].transformer_blocks[0].attn1") == "attn"
    assert (layer_type("up_blocks[1]"), layer_block("up_blocks[1]")) == ("block", "up1")
    assert (layer_type("mid_block"), layer_block("mid_block")) == ("block", "mid")
    assert layer_block("time_embedding.linear_1") == "time_embedding"
    assert block_boundaries(["conv_in", "up_blocks[1].resnets[0]", "up_blocks[1].upsamplers[0]"]) == [1]
    assert block_boundaries([]) == []


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def synthetic_tables(model: str = "sd15", layers=PAPER_LAYERS, seed: int = 0) -> dict:
    """Random tables of the contract's columns over ``layers`` (values inside the paper's plot ranges)."""
    rng = np.random.default_rng(seed)
    meta = [(model, i, n, *paper_layer_shape(n)) for i, n in enumerate(layers)]
    acc = rng.uniform(0.05, 1.0, size=(len(layers), 5, 4))
    probe = pd.DataFrame([(*mt, e + 1, g, "per_axis", 42, float(acc[li, e, gi]))
                          for li, mt in enumerate(meta) for e in range(5) for gi, g in enumerate((8, 16, 32, 64))],
                         columns=PROBE_COLUMNS)
    raw = rng.uniform(0.3, 0.6, size=(len(layers), 6))
    sim = pd.DataFrame([(*mt, s[0] / s[1], s[2] / s[3], s[4] / s[5], *s) for mt, s in zip(meta, raw)],
                       columns=SIMILARITY_COLUMNS)
    norms = rng.uniform(0.8, 3.5, size=len(layers))
    an = pd.DataFrame([(*mt, "paper", float(v), 0.2 * float(v), 100) for mt, v in zip(meta, norms)],
                      columns=RELNORM_COLUMNS)
    return {"position_probe": probe, "token_group_similarity": sim, "anomaly_rel_norm": an}


def subset(tables: dict, names: list[str]) -> dict:
    """Tables of a run over ``names`` only: layer_index is the position in that run's layer list."""
    out = {}
    for k, df in tables.items():
        d = df[df["layer"].isin(names)].copy()
        d["layer_index"] = d["layer"].map({n: i for i, n in enumerate(names)})
        out[k] = d
    return out


def svg_texts(path: Path) -> list[str]:
    root = ET.parse(path).getroot()
    return ["".join(e.itertext()).strip() for e in root.iter() if e.tag.endswith("text")]


def check_written(png: Path, svg: Path) -> None:
    assert png.is_file() and svg.is_file()
    img = mpimg.imread(png)
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 500
    ET.parse(svg)  # well-formed


def line(ax, label: str):
    found = [ln for ln in ax.get_lines() if ln.get_label() == label]
    assert found, f"no line {label!r} in {[ln.get_label() for ln in ax.get_lines()]}"
    return found[0]


def bbox_union(texts, renderer):
    from matplotlib.transforms import Bbox

    return Bbox.union([t.get_window_extent(renderer) for t in texts])


@pytest.fixture(scope="module")
def tables():
    return synthetic_tables("sd15")


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def test_full_tables_write_png_and_svg(tmp_path, tables):
    png, svg = plot_quantitative(tables["position_probe"], tables["token_group_similarity"],
                                 tables["anomaly_rel_norm"], tmp_path / "fig" / "q_sd15", "sd15")
    assert (png.name, svg.name) == ("q_sd15.png", "q_sd15.svg")
    check_written(png, svg)
    texts = svg_texts(svg)
    for t in ("sd15", "layers:", "blocks:", "test accuracy", "rel. similarity", "rel. norm", "8×8", "64×64",
              "corner", "border", "anomalies", "dn0", "up3", "attn", "down"):
        assert t in texts, t
    assert "not computed" not in texts and "paper" not in texts


def test_subset_missing_panels_and_reference(tmp_path, tables):
    names = ["conv_in", "down_blocks[1].attentions[0]", "mid_block.resnets[0]", "up_blocks[1].upsamplers[0]",
             "conv_out"]
    sub = subset(tables, names)
    png, svg = plot_quantitative(sub["position_probe"], None, pd.DataFrame(), tmp_path / "sub", "sd15",
                                 reference=tables)
    check_written(png, svg)
    texts = svg_texts(svg)
    assert texts.count("not computed") == 2
    assert "paper" in texts and "paper corner" in texts  # the overlay still shows the published numbers
    assert [t for t in texts if t in ("in", "dn1", "mid", "up1", "out")] == ["in", "dn1", "mid", "up1", "out"]


def test_all_panels_missing(tmp_path):
    png, svg = plot_quantitative(None, None, None, tmp_path / "none", "sd21")
    check_written(png, svg)
    assert svg_texts(svg).count("not computed") == 3


def test_svg_is_deterministic(tmp_path, tables):
    args = (tables["position_probe"], tables["token_group_similarity"], tables["anomaly_rel_norm"])
    _, a = plot_quantitative(*args, tmp_path / "a", "sd15", reference=tables)
    _, b = plot_quantitative(*args, tmp_path / "b", "sd15", reference=tables)
    assert a.read_bytes() == b.read_bytes()
    assert b"<dc:date>" not in a.read_bytes()


def test_cross_model_figure(tmp_path):
    by_model = {m: synthetic_tables(m, seed=i) for i, m in enumerate(("sd15", "sd21", "sdturbo"))}
    by_model["sd21"]["anomaly_rel_norm"] = by_model["sd21"]["anomaly_rel_norm"].assign(label_source="auto")
    by_model["sdturbo"]["token_group_similarity"] = None
    png, svg = plot_cross_model(by_model, tmp_path / "cross")
    check_written(png, svg)
    texts = svg_texts(svg)
    for t in ("sd15", "sd21 (auto labels)", "sdturbo", "8×8", "native"):
        assert t in texts, t
    fig = cross_model_figure(by_model)
    ax_acc, ax_sim, ax_norm = fig.axes[:3]
    assert len([ln for ln in ax_acc.get_lines() if len(ln.get_xdata()) == 45]) == 6  # 8x8 + native per model
    assert len([ln for ln in ax_sim.get_lines() if len(ln.get_xdata()) == 44]) == 2  # conv_out dropped


# ---------------------------------------------------------------------------------------------
# Content
# ---------------------------------------------------------------------------------------------

def test_panels_plot_the_right_numbers(tables):
    fig = quantitative_figure(tables["position_probe"], tables["token_group_similarity"],
                              tables["anomaly_rel_norm"], "sd15")
    ax_acc, ax_sim, ax_norm = fig.axes[:3]
    probe = tables["position_probe"]
    final = probe[(probe.epoch == 5) & (probe.granularity == 32)].sort_values("layer_index")
    ln = line(ax_acc, "32×32")
    np.testing.assert_array_equal(ln.get_xdata(), np.arange(45))
    np.testing.assert_allclose(ln.get_ydata(), 100 * final["accuracy"].to_numpy())
    corner = line(ax_sim, "corner")
    np.testing.assert_array_equal(corner.get_xdata(), np.arange(44))  # conv_out dropped
    assert ax_sim.get_yscale() == "log" and ax_norm.get_yscale() == "log"
    assert ax_acc.get_xlim() == (-0.5, 45.0)
    # ratios and norms inside the paper's ranges -> the paper's y-limits
    assert ax_sim.get_ylim() == pytest.approx(q.SIM_LIM) and ax_norm.get_ylim() == pytest.approx(q.NORM_LIM)
    assert ax_acc.get_ylim() == pytest.approx(q.ACC_LIM)
    # separators at the block boundaries
    seps = sorted({ln.get_xdata()[0] for ln in ax_acc.get_lines() if ln.get_linestyle() == "--"
                   and ln.get_color() == "lightgray"})
    assert seps == [b - 0.5 for b in (1, 6, 11, 16, 18, 21, 24, 31, 38, 44)]


def test_mean_over_seeds_and_final_epoch(tables):
    p = tables["position_probe"]
    probe = pd.concat([p.assign(seed=1, accuracy=p.accuracy * 0.5), p.assign(seed=2, accuracy=p.accuracy * 1.5),
                       p.assign(metric="joint", accuracy=0.0)])
    fig = quantitative_figure(probe, None, None, "sd15")
    final = p[(p.epoch == 5) & (p.granularity == 8)].sort_values("layer_index")
    np.testing.assert_allclose(line(fig.axes[0], "8×8").get_ydata(), 100 * final["accuracy"].to_numpy())
    # a +-1 sd band per granularity: sd of (0.5 a, 1.5 a) with ddof 1 is a / sqrt(2)
    bands = [c for c in fig.axes[0].collections if len(c.get_paths())]
    assert len(bands) == 4
    top = bands[0].get_paths()[0].vertices[:, 1].max()
    a = final["accuracy"].to_numpy()
    assert top == pytest.approx(100 * (a + a / np.sqrt(2)).max(), rel=1e-6)
    one_seed = quantitative_figure(p, None, None, "sd15")
    assert not [c for c in one_seed.axes[0].collections if len(c.get_paths())]  # one seed: no band


def test_nonpositive_ratios_dropped_and_limits_expand(tables):
    sim = tables["token_group_similarity"].copy()
    sim.loc[sim.layer == "mid_block.resnets[0]", "corner_ratio"] = -0.4
    sim.loc[sim.layer == "up_blocks[1].resnets[0]", "corner_ratio"] = 9.0
    sim.loc[sim.layer == "down_blocks[0].resnets[0]", "border_ratio"] = 0.1
    an = tables["anomaly_rel_norm"].copy()
    an.loc[an.layer == "up_blocks[1].upsamplers[0]", ["rel_norm_mean", "rel_norm_std"]] = (20.0, 5.0)
    fig = quantitative_figure(None, sim, an, "sd15")
    ax_sim, ax_norm = fig.axes[1], fig.axes[2]
    y = line(ax_sim, "corner").get_ydata()
    assert np.isnan(y[18]) and y[24] == 9.0
    lo, hi = ax_sim.get_ylim()
    assert hi >= 9.0 and lo <= 0.1 and lo > 0
    assert ax_norm.get_ylim()[1] >= 25.0
    assert ax_sim.get_yticks().tolist() == [2.0 ** e for e in range(-3, 4)]


def test_reference_overlay_is_matched_by_layer_name(tables):
    names = ["down_blocks[2].resnets[0]", "up_blocks[0].upsamplers[0]", "up_blocks[1].upsamplers[0]"]
    sub = subset(tables, names)
    fig = quantitative_figure(sub["position_probe"], sub["token_group_similarity"], sub["anomaly_rel_norm"],
                              "sd15", reference=tables)
    ref = line(fig.axes[2], "paper")
    np.testing.assert_array_equal(ref.get_xdata(), [0, 1, 2])
    an = tables["anomaly_rel_norm"].set_index("layer")["rel_norm_mean"]
    np.testing.assert_allclose(ref.get_ydata(), an[names].to_numpy())
    assert line(fig.axes[0], "paper").get_linestyle() == "--"


def test_layout_nothing_overlaps(tables):
    fig = quantitative_figure(tables["position_probe"], tables["token_group_similarity"],
                              tables["anomaly_rel_norm"], "sd15", reference=tables)
    r = fig.canvas.get_renderer()
    axes = fig.axes[:3]
    bottom = axes[-1]
    major = [t for t in bottom.get_xticklabels() if t.get_text()]
    minor = [t for t in bottom.get_xticklabels(minor=True) if t.get_text()]
    assert [t.get_text() for t in major] == EXPECTED_TYPES
    assert [t.get_text() for t in minor] == ["in", "dn0", "dn1", "dn2", "dn3", "mid", "up0", "up1", "up2",
                                             "up3", "out"]
    for labels in (major, minor):
        boxes = sorted((t.get_window_extent(r) for t in labels), key=lambda b: b.x0)
        assert all(b1.x0 >= b0.x1 for b0, b1 in zip(boxes[:-1], boxes[1:]))  # no horizontal overlap
    mb, nb = bbox_union(major, r), bbox_union(minor, r)
    assert nb.y1 < mb.y0  # the block row sits below the type row
    assert mb.y1 < bottom.get_window_extent(r).y0
    rows = {t.get_text(): t for t in fig.texts}
    lb, bb = rows["layers:"].get_window_extent(r), rows["blocks:"].get_window_extent(r)
    assert lb.x1 <= mb.x0 and bb.x1 <= nb.x0 and not lb.overlaps(bb)
    assert mb.y0 <= (lb.y0 + lb.y1) / 2 <= mb.y1 and nb.y0 <= (bb.y0 + bb.y1) / 2 <= nb.y1
    for ax in axes:  # legends sit outside the data area
        leg = ax.get_legend()
        assert leg is not None and leg.get_window_extent(r).x0 >= ax.get_window_extent(r).x1


def test_narrow_blocks_get_vertical_block_names(tables):
    blocks = ["down_blocks[0]", "down_blocks[1]", "up_blocks[2]", "up_blocks[3]"]
    names = [f"{blocks[k % 4]}.resnets[{k}]" for k in range(40)]  # 40 one-layer blocks
    rows = []
    for i, n in enumerate(names):
        c, s = paper_layer_shape(n)
        rows.append(("m", i, n, c, s, 5, 8, "per_axis", 0, 0.5))
    probe = pd.DataFrame(rows, columns=PROBE_COLUMNS)
    fig = quantitative_figure(probe, None, None, "m")
    r = fig.canvas.get_renderer()
    minor = [t for t in fig.axes[2].get_xticklabels(minor=True) if t.get_text()]
    boxes = sorted((t.get_window_extent(r) for t in minor), key=lambda b: b.x0)
    assert all(b1.x0 >= b0.x1 for b0, b1 in zip(boxes[:-1], boxes[1:]))
    assert {t.get_rotation() for t in minor} == {90.0}


@pytest.mark.skipif(not PAPER_DATA.is_dir(), reason="shared reference folder not available")
def test_paper_numbers_render(tmp_path):
    from diffaudit.paper_files import paper_tables

    t = paper_tables("sdturbo", PAPER_DATA)
    png, svg = plot_quantitative(t["position_probe"], t["token_group_similarity"], t["anomaly_rel_norm"],
                                 tmp_path / "sdturbo", "sdturbo", reference=t)
    check_written(png, svg)
    fig = quantitative_figure(t["position_probe"], t["token_group_similarity"], t["anomaly_rel_norm"], "sdturbo")
    # sdturbo peaks at 4.22 + 1.47 sd: still inside the paper's norm range
    assert fig.axes[2].get_ylim() == pytest.approx(q.NORM_LIM)


def with_intervals(tables: dict) -> dict:
    """The synthetic tables plus the bootstrap interval columns of our analyses (accuracy -+ 0.05, ratio x/÷ 1.1,
    norm -+ 0.3)."""
    p = tables["position_probe"].assign(ci_low=lambda d: d.accuracy - 0.05, ci_high=lambda d: d.accuracy + 0.05)
    s = tables["token_group_similarity"].assign(
        corner_ratio_ci_low=lambda d: d.corner_ratio / 1.1, corner_ratio_ci_high=lambda d: d.corner_ratio * 1.1,
        border_ratio_ci_low=lambda d: d.border_ratio / 1.1, border_ratio_ci_high=lambda d: d.border_ratio * 1.1)
    a = tables["anomaly_rel_norm"].assign(rel_norm_ci_low=lambda d: d.rel_norm_mean - 0.3,
                                          rel_norm_ci_high=lambda d: d.rel_norm_mean + 0.3)
    return {"position_probe": p, "token_group_similarity": s, "anomaly_rel_norm": a}


def bands(ax):
    return [c for c in ax.collections if len(c.get_paths())]


def band_limits(band) -> tuple[float, float]:
    v = np.concatenate([p.vertices[:, 1] for p in band.get_paths()])
    return float(v.min()), float(v.max())


def test_interval_columns_are_drawn_as_bands(tables):
    t = with_intervals(tables)
    fig = quantitative_figure(t["position_probe"], t["token_group_similarity"], t["anomaly_rel_norm"], "sd15")
    ax_acc, ax_sim, ax_norm = fig.axes[:3]
    # one seed: no sd band, one interval band per granularity, spanning the interval
    acc_bands = bands(ax_acc)
    assert len(acc_bands) == 4
    probe = t["position_probe"]
    final8 = probe[(probe.epoch == 5) & (probe.granularity == 8)]
    assert band_limits(acc_bands[0]) == pytest.approx((100 * final8.ci_low.min(), 100 * final8.ci_high.max()))
    assert [tuple(b.get_facecolor()[0][:3]) for b in acc_bands] == [
        tuple(line(ax_acc, lab).get_color()[:3]) for lab in ("8×8", "16×16", "32×32", "64×64")]
    # corner and border bands (conv_out left out like the lines), in the lines' colours
    sim_bands = bands(ax_sim)
    assert len(sim_bands) == 2
    sim = t["token_group_similarity"]
    sim = sim[sim.layer != "conv_out"]
    assert band_limits(sim_bands[0]) == pytest.approx((sim.corner_ratio_ci_low.min(), sim.corner_ratio_ci_high.max()))
    # the anomaly panel: the sd band and, darker, the interval band
    norm_bands = bands(ax_norm)
    assert len(norm_bands) == 2 and norm_bands[1].get_alpha() > norm_bands[0].get_alpha()
    an = t["anomaly_rel_norm"]
    assert band_limits(norm_bands[1]) == pytest.approx((an.rel_norm_ci_low.min(), an.rel_norm_ci_high.max()))


def test_tables_without_interval_columns_plot_as_before(tables):
    fig = quantitative_figure(tables["position_probe"], tables["token_group_similarity"], tables["anomaly_rel_norm"],
                              "sd15")
    assert [len(bands(ax)) for ax in fig.axes[:3]] == [0, 0, 1]  # only the anomaly sd band
    # empty interval columns (e.g. no anomalies) are no band either, and a band with gaps still draws
    t = with_intervals(tables)
    t["anomaly_rel_norm"] = t["anomaly_rel_norm"].assign(rel_norm_ci_low=np.nan, rel_norm_ci_high=np.nan)
    sim = t["token_group_similarity"].copy()
    sim.loc[sim.layer == "mid_block.resnets[0]", ["corner_ratio_ci_low", "corner_ratio_ci_high"]] = np.nan
    fig = quantitative_figure(t["position_probe"], sim, t["anomaly_rel_norm"], "sd15")
    assert [len(bands(ax)) for ax in fig.axes[:3]] == [4, 2, 1]


def test_bands_widen_the_limits_and_the_reference_figure_renders(tmp_path, tables):
    t = with_intervals(tables)
    s = t["token_group_similarity"].copy()
    s.loc[s.layer == "mid_block.resnets[0]", "corner_ratio_ci_high"] = 6.0
    fig = quantitative_figure(t["position_probe"], s, t["anomaly_rel_norm"], "sd15", reference=tables)
    assert fig.axes[1].get_ylim()[1] >= 6.0
    png, svg = plot_quantitative(t["position_probe"], s, t["anomaly_rel_norm"], tmp_path / "ci", model="sd15",
                                 reference=tables)
    check_written(png, svg)


def test_several_seeds_keep_the_sd_band_under_the_interval_band(tables):
    p = with_intervals(tables)["position_probe"]
    probe = pd.concat([p.assign(seed=1), p.assign(seed=2, accuracy=p.accuracy * 1.2, ci_low=p.ci_low * 1.2,
                                                  ci_high=p.ci_high * 1.2)])
    acc_bands = bands(quantitative_figure(probe, None, None, "sd15").axes[0])
    assert len(acc_bands) == 8  # per granularity: the sd band, then the interval band
    final8 = p[(p.epoch == 5) & (p.granularity == 8)]
    lo, hi = 100 * 1.1 * final8.ci_low, 100 * 1.1 * final8.ci_high  # the seeds' mean limits
    assert band_limits(acc_bands[1]) == pytest.approx((lo.min(), hi.max()))


# ---------------------------------------------------------------------------------------------
# Model families with different layer lists: SDXL U-Nets, diffusion transformers, relative depth
# ---------------------------------------------------------------------------------------------

def sdxl_layers() -> list[str]:
    """The 34 layers of an SDXL U-Net (three levels, no attention at the first; diffaudit.layers.unet_layers)."""
    names = ["conv_in", "down_blocks[0].resnets[0]", "down_blocks[0].resnets[1]", "down_blocks[0].downsamplers[0]"]
    names += ["down_blocks[1].resnets[0]", "down_blocks[1].attentions[0]", "down_blocks[1].resnets[1]",
              "down_blocks[1].attentions[1]", "down_blocks[1].downsamplers[0]"]
    names += ["down_blocks[2].resnets[0]", "down_blocks[2].attentions[0]", "down_blocks[2].resnets[1]",
              "down_blocks[2].attentions[1]"]
    names += ["mid_block.resnets[0]", "mid_block.attentions[0]", "mid_block.resnets[1]"]
    for b in (0, 1):
        names += [n for j in range(3) for n in (f"up_blocks[{b}].resnets[{j}]", f"up_blocks[{b}].attentions[{j}]")]
        names.append(f"up_blocks[{b}].upsamplers[0]")
    names += [f"up_blocks[2].resnets[{j}]" for j in range(3)] + ["conv_out"]
    return names


def dit_layers(joint: int = 12, single: int = 0, embed: str = "pos_embed") -> list[str]:
    """An SD3-like (``pos_embed`` + joint blocks) or FLUX-like (``x_embedder`` + joint + single blocks) list."""
    return ([embed] + [f"transformer_blocks[{i}]" for i in range(joint)]
            + [f"single_transformer_blocks[{i}]" for i in range(single)])


def synthetic_summary(layers, seed: int = 0, spatial: int = 32) -> pd.DataFrame:
    """A ``layer_summary/{model}.csv`` table over ``layers`` (accuracy as a fraction, ratios, norms)."""
    rng = np.random.default_rng(seed)
    n = len(layers)
    d = pd.DataFrame({"layer_index": np.arange(n), "layer": list(layers), "spatial": spatial})
    for g in (8, 16, 32, 64):
        d[f"acc_{g}x{g}"] = rng.uniform(0.05, 0.6, n)
    d["corner_ratio"], d["border_ratio"] = rng.uniform(0.7, 1.8, n), rng.uniform(0.7, 1.8, n)
    d["rel_norm_mean"], d["rel_norm_source"] = rng.uniform(0.8, 3.5, n), "paper"
    return d


def model_line(ax, model: str, quantity: str):
    return line(ax, f"_{model} {quantity}")


def test_transformer_layer_names_get_labels():
    assert (layer_block("pos_embed"), layer_type("pos_embed")) == ("in", "embed")
    assert (layer_block("x_embedder"), layer_type("x_embedder")) == ("in", "embed")
    assert (layer_block("transformer_blocks[3]"), layer_type("transformer_blocks[3]")) == ("tb3", "block")
    assert (layer_block("single_transformer_blocks[0]"), layer_type("single_transformer_blocks[0]")) == ("stb0",
                                                                                                        "block")
    assert layer_type("transformer_blocks[3].attn") == "attn" and layer_block("transformer_blocks[3].attn") == "tb3"
    assert ll.layer_segments("single_transformer_blocks[10]") == [("single_transformer_blocks", [10])]
    assert [ll.layer_label(n) for n in dit_layers(2, 1, "x_embedder")] == ["embed", "tb0", "tb1", "stb0"]
    # a DiT's axis groups its blocks by stream: in | joint | single
    assert block_spans(dit_layers(4, 3, "x_embedder")) == [("in", 0, 0), ("joint", 1, 4), ("single", 5, 7)]
    assert block_boundaries(dit_layers(12)) == [1]
    assert cm.model_family(dit_layers(12)) == "DiT" and cm.model_family(sdxl_layers()) == "U-Net"
    assert cm.model_family(["conv_in", "conv_out"]) == ""


def test_sdxl_list_matches_the_unet_layout():
    assert len(sdxl_layers()) == 34 and len(set(sdxl_layers())) == 34
    assert [b for b, _, _ in block_spans(sdxl_layers())] == ["in", "dn0", "dn1", "dn2", "mid", "up0", "up1", "up2",
                                                           "out"]


@pytest.mark.parametrize("layers, blocks", [
    (dit_layers(12), ["in", "joint"]),
    (dit_layers(4, 8, "x_embedder"), ["in", "joint", "single"]),
    (sdxl_layers(), ["in", "dn0", "dn1", "dn2", "mid", "up0", "up1", "up2", "out"]),
])
def test_single_model_figure_of_other_families(tmp_path, layers, blocks):
    t = cm.tables_from_summary(synthetic_summary(layers))
    png, svg = plot_quantitative(t["position_probe"], t["token_group_similarity"], t["anomaly_rel_norm"],
                                 tmp_path / "q", "m")
    check_written(png, svg)
    fig = quantitative_figure(t["position_probe"], t["token_group_similarity"], t["anomaly_rel_norm"], "m")
    bottom = fig.axes[2]
    assert [x.get_text() for x in bottom.get_xticklabels(minor=True) if x.get_text()] == blocks
    assert [x.get_text() for x in bottom.get_xticklabels() if x.get_text()] == [ll.layer_label(n) for n in layers]
    np.testing.assert_array_equal(line(fig.axes[0], "8×8").get_xdata(), np.arange(len(layers)))


def test_relative_depth():
    np.testing.assert_allclose(cm.relative_depth(["a", "b", "c", "d", "e"]), [0, 0.25, 0.5, 0.75, 1])
    assert cm.relative_depth(["a"]).tolist() == [0.0] and cm.relative_depth([]).size == 0
    assert cm.relative_depth(PAPER_LAYERS)[18] == pytest.approx(18 / 44)


@pytest.fixture(scope="module")
def families():
    """layer_summary tables of an SD-1.5 (45 layers), SDXL (34), SD3-like (13) and FLUX-like (1 + 6 + 12) model;
    the SD3-like model has accuracy 0.9 at its middle layer (position 6 of 13), above every other value."""
    lists = {"sd15": list(PAPER_LAYERS), "sdxl": sdxl_layers(), "sd3": dit_layers(12),
             "flux": dit_layers(6, 12, "x_embedder")}
    summaries = {m: synthetic_summary(names, seed=i) for i, (m, names) in enumerate(lists.items())}
    summaries["sd3"].loc[6, "acc_8x8"] = 0.9
    return lists, summaries


def test_cross_model_relative_depth_axis(tmp_path, families):
    lists, summaries = families
    by_model = {m: cm.tables_from_summary(s) for m, s in summaries.items()}
    png, svg = plot_cross_model(by_model, tmp_path / "cross_families")
    check_written(png, svg)
    texts = svg_texts(svg)
    for t in (cm.RELATIVE_XLABEL, "sd15 (U-Net, 45 layers)", "sdxl (U-Net, 34 layers)", "sd3 (DiT, 13 layers)",
              "flux (DiT, 19 layers)", "U-Net mid_block", "8×8", "native", "0", "0.25", "0.5", "0.75", "1"):
        assert t in texts, t
    assert "layers:" not in texts and "blocks:" not in texts

    fig = cross_model_figure(by_model)
    ax_acc, ax_sim, ax_norm = fig.axes[:3]
    assert ax_norm.get_xlabel() == cm.RELATIVE_XLABEL
    assert ax_norm.get_xticks().tolist() == [0, 0.25, 0.5, 0.75, 1]
    for m, names in lists.items():
        s = summaries[m]
        n_sim = len(names) - ("conv_out" in names)  # conv_out left out of the similarity panel
        for ax, quantity, n in ((ax_acc, "8×8", len(names)), (ax_acc, "native", len(names)),
                                (ax_norm, "norm", len(names)), (ax_sim, "corner", n_sim)):
            x = model_line(ax, m, quantity).get_xdata()
            assert len(x) == n, (m, quantity)
            assert x[0] == 0.0 and np.all(np.diff(x) > 0), (m, quantity)  # first layer at 0, in layer order
        x8 = model_line(ax_acc, m, "8×8").get_xdata()
        assert x8[-1] == 1.0
        np.testing.assert_allclose(x8, cm.relative_depth(names))
        np.testing.assert_allclose(model_line(ax_acc, m, "8×8").get_ydata(), 100 * s["acc_8x8"].to_numpy())
        np.testing.assert_allclose(model_line(ax_norm, m, "norm").get_ydata(), s["rel_norm_mean"].to_numpy())
        assert model_line(ax_acc, m, "8×8").get_marker() == "o"  # lines with small markers
    # the planted value: the middle of 13 layers is at x = 0.5
    sd3 = model_line(ax_acc, "sd3", "8×8")
    k = int(np.argmax(sd3.get_ydata()))
    assert sd3.get_ydata()[k] == pytest.approx(90.0) and sd3.get_xdata()[k] == 0.5
    # the U-Nets' mid_block (first mid_block layer) in the model's colour, in every panel
    colors = {m: tuple(model_line(ax_acc, m, "8×8").get_color()) for m in lists}
    for ax in (ax_acc, ax_sim, ax_norm):
        mids = {tuple(ln.get_color()): ln.get_xdata()[0] for ln in ax.get_lines() if ln.get_label() == "_mid_block"}
        assert mids == pytest.approx({colors["sd15"]: 18 / 44, colors["sdxl"]: 13 / 33})


def test_cross_model_shared_layer_list_keeps_the_layer_axis(families):
    lists, summaries = families
    by_model = {m: cm.tables_from_summary(summaries[m]) for m in ("sdxl",)}
    by_model["sdxl-turbo"] = cm.tables_from_summary(synthetic_summary(sdxl_layers(), seed=7))
    fig = cross_model_figure(by_model)
    bottom = fig.axes[2]
    assert bottom.get_xlabel() == "" and "layers:" in [t.get_text() for t in fig.texts]
    np.testing.assert_array_equal(model_line(fig.axes[0], "sdxl", "8×8").get_xdata(), np.arange(34))
    assert not [ln for ln in fig.axes[0].get_lines() if ln.get_label() == "_mid_block"]
    # a model without any table does not force the relative axis either
    by_model["empty"] = {}
    assert cross_model_figure(by_model).axes[2].get_xlabel() == ""
