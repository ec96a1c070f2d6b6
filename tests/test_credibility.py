"""Per-layer credibility scores.

(a) Synthetic tables with planted effects: every score equals its hand computation (fixed 8x8 position grid,
    corner effect net of the crop control and signed, anomalies as prevalence x severity from one source).
(b) The authors' published numbers for sd15, sd21 and sdturbo: the orderings a reader of the paper expects.
"""
from __future__ import annotations

import math
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO, shared_reference
from diffaudit.analyses.credibility import (CREDIBILITY_COLUMNS, DESCRIPTIONS, FORMULA, anomaly_scores,
                                            choose_source, corner_scores, credibility, position_scores)

LAYERS = [(0, "conv_in", 4, 64), (19, "mid_block.attentions[0]", 32, 8), (30, "up_blocks[1].upsamplers[0]", 16, 32),
          (50, "tiny", 8, 4), (51, "single", 8, 1)]
SAFE_BELOW = yaml.safe_load((REPO / "params.yaml").read_text())["credibility"]["safe_below"]


def probe_table(acc_final: dict[int, dict[int, float]], seeds=(1, 2), model="m") -> pd.DataFrame:
    """acc_final[layer_index][granularity] = final-epoch per_axis accuracy; epoch 1 rows hold a decoy 0.5 and the
    joint metric a decoy 0.0."""
    rows = []
    for idx, name, c, n in LAYERS:
        if idx not in acc_final:
            continue
        for seed in seeds:
            for g, acc in acc_final[idx].items():
                rows.append((model, idx, name, c, n, 1, g, "per_axis", seed, 0.5))
                rows.append((model, idx, name, c, n, 2, g, "per_axis", seed, acc))
                rows.append((model, idx, name, c, n, 2, g, "joint", seed, 0.0))
    return pd.DataFrame(rows, columns=["model", "layer_index", "layer", "channels", "spatial", "epoch",
                                       "granularity", "metric", "seed", "accuracy"])


def sim_table(ratios: dict[int, float | tuple[float, float]], model="m") -> pd.DataFrame:
    """ratios[layer_index] = corner_ratio, or (corner_ratio, other_ratio); other_ratio defaults to 1."""
    rows = []
    for idx, name, c, n in LAYERS:
        if idx in ratios:
            r = ratios[idx] if isinstance(ratios[idx], tuple) else (ratios[idx], 1.0)
            rows.append((model, idx, name, c, n, r[0], 1.0, r[1]))
    return pd.DataFrame(rows, columns=["model", "layer_index", "layer", "channels", "spatial", "corner_ratio",
                                       "border_ratio", "other_ratio"])


def anom_table(rel: dict[int, list[tuple]], model="m", prevalence: dict[str, tuple[int, int]] | None = None):
    """rel[layer_index] = [(source, rel_norm_mean, n_anomalies), ...]; prevalence[source] = (n_images,
    n_images_with_anomalies) adds the two count columns (omitted: a table without them)."""
    rows = [(model, idx, name, c, n, src, r, 0.1, k) for idx, name, c, n in LAYERS for src, r, k in rel.get(idx, [])]
    df = pd.DataFrame(rows, columns=["model", "layer_index", "layer", "channels", "spatial", "label_source",
                                     "rel_norm_mean", "rel_norm_std", "n_anomalies"])
    if prevalence is not None:
        df["n_images"] = [prevalence[s][0] for s in df["label_source"]]
        df["n_images_with_anomalies"] = [prevalence[s][1] for s in df["label_source"]]
    return df


def chan_table(ratios: dict[int, list[float]], model="m") -> pd.DataFrame:
    rows = [(model, idx, name, c, n, ch, r, 100.0, 0.5, 10) for idx, name, c, n in LAYERS
            for ch, r in enumerate(ratios.get(idx, []))]
    return pd.DataFrame(rows, columns=["model", "layer_index", "layer", "channels", "spatial", "channel",
                                       "median_abs_ratio", "max_abs", "frac_images_outlier", "n_images"])


def by_index(df: pd.DataFrame, col: str) -> dict[int, float]:
    return dict(zip(df["layer_index"], df[col]))


# ---------------------------------------------------------------------------------------------
# (a) planted effects, computed by hand
# ---------------------------------------------------------------------------------------------

def test_position_is_judged_at_the_fixed_8x8_grid():
    probe = probe_table({
        0: {8: 0.5, 16: 0.3, 32: 0.1, 64: 1 / 64},   # 64-res: chance at its native grid, half-way at 8x8
        19: {8: 1.0, 16: 1.0},                       # 8-res: perfect
        30: {8: 1 / 8, 16: 0.9, 32: 0.9, 64: 0.9},   # the finer grids do not count: chance at 8x8 -> 0
        50: {8: 0.625, 16: 0.625},                   # 4-res: granularity 8 = native, chance 1/4
    })
    out = position_scores(probe)
    s = by_index(out, "position_score")
    assert s[0] == pytest.approx((0.5 - 1 / 8) / (1 - 1 / 8))  # 3/7, although the native-grid gain is 0
    assert s[19] == pytest.approx(1.0)
    assert s[30] == pytest.approx(0.0, abs=1e-12)
    assert s[50] == pytest.approx((0.625 - 1 / 4) / (1 - 1 / 4))  # 0.5
    assert by_index(out, "position_acc_8x8") == {0: pytest.approx(0.5), 19: pytest.approx(1.0),
                                                 30: pytest.approx(1 / 8), 50: pytest.approx(0.625)}


def test_position_final_epoch_seed_mean_clip_and_undefined():
    # seeds averaged at the final epoch: seed 1 perfect, seed 2 at chance -> half the gain
    p = pd.concat([probe_table({19: {8: 1.0}}, seeds=(1,)), probe_table({19: {8: 1 / 8}}, seeds=(2,))])
    assert by_index(position_scores(p), "position_score")[19] == pytest.approx(0.5)
    # below chance clipped to 0
    assert by_index(position_scores(probe_table({0: {8: 0.05}})), "position_score")[0] == 0.0
    # no granularity 8 measured, or a 1x1 map (chance 1): undefined
    s = by_index(position_scores(probe_table({0: {16: 0.9, 64: 0.9}, 51: {8: 1.0}})), "position_score")
    assert 0 not in s or np.isnan(s[0])
    assert np.isnan(s[51])


def test_corner_effect_net_of_the_control_and_signed():
    out = corner_scores(sim_table({0: (2.0, 1.0), 19: (2.0, 2.0), 30: (1.0, 2.0), 50: (math.sqrt(2), 1.0)}))
    e, s = by_index(out, "corner_effect"), by_index(out, "corner_score")
    assert e == {0: pytest.approx(1.0), 19: pytest.approx(0.0), 30: pytest.approx(-1.0), 50: pytest.approx(0.5)}
    # a global shift seen by the interior too is no corner effect; corners LESS alike than the control: no hazard
    assert s == {0: pytest.approx(1.0), 19: pytest.approx(0.0), 30: 0.0, 50: pytest.approx(0.5)}
    assert by_index(corner_scores(sim_table({0: (8.0, 1.0)})), "corner_score")[0] == 1.0
    # the same corner ratio is a hazard only against a control that moved less
    assert by_index(corner_scores(sim_table({0: (1.5, 0.75)})), "corner_effect")[0] == pytest.approx(1.0)
    # undefined log-ratios: non-positive or NaN ratio on either side
    s = by_index(corner_scores(sim_table({0: (-0.3, 1.0), 19: (1.5, 0.0), 30: (float("nan"), 1.0)})),
                 "corner_score")
    assert all(np.isnan(v) for v in s.values())
    # several rows of one layer: mean in log2 space (log2 4 = 2, log2 1 = 0 -> 1)
    two = pd.concat([sim_table({0: (4.0, 1.0)}), sim_table({0: (1.0, 1.0)})])
    assert by_index(corner_scores(two), "corner_effect")[0] == pytest.approx(1.0)


def test_anomaly_prevalence_times_severity_from_one_source():
    rel = {0: [("paper", 4.0, 40), ("auto", 9.0, 80)],      # severity clip(log2 4) = 1
           19: [("paper", 0.8, 40), ("auto", 9.0, 80)],     # below the average token: severity 0
           30: [("paper", math.sqrt(2), 40), ("auto", 1.0, 80)]}  # severity 0.5
    prev = {"paper": (100, 30), "auto": (100, 90)}
    out = anomaly_scores(anom_table(rel, prevalence=prev))
    assert set(out["anomaly_source"]) == {"paper"}  # the hand labels win; auto's larger numbers are not mixed in
    assert list(out["anomaly_prevalence"]) == [pytest.approx(0.3)] * 3
    assert by_index(out, "anomaly_score") == {0: pytest.approx(0.3), 19: 0.0, 30: pytest.approx(0.15)}
    assert by_index(out, "anomaly_rel_norm")[30] == pytest.approx(math.sqrt(2))
    # without paper labels: auto (90 % of the images)
    no_paper = {k: [r for r in v if r[0] != "paper"] for k, v in rel.items()}
    out = anomaly_scores(anom_table(no_paper, prevalence=prev))
    assert set(out["anomaly_source"]) == {"auto"}
    assert by_index(out, "anomaly_score") == {0: pytest.approx(0.9), 19: pytest.approx(0.9), 30: 0.0}
    # rarer anomalies of the same strength score proportionally lower
    rare = anomaly_scores(anom_table(no_paper, prevalence={"auto": (100, 9)}))
    assert by_index(rare, "anomaly_score")[0] == pytest.approx(0.09)


def test_anomaly_source_choice_unknown_prevalence_and_none_found():
    assert choose_source(["user:b.npy", "auto", "paper"]) == "paper"
    assert choose_source(["user:b.npy", "auto"]) == "auto"
    assert choose_source(["user:b.npy", "user:a.npy"]) == "user:b.npy"
    assert choose_source([]) is None
    # a table without the per-image counts: prevalence unknown (NaN), scored as the worst case 1
    out = anomaly_scores(anom_table({0: [("user:x.npy", 2 ** 0.75, 5)]}))
    assert out.loc[0, "anomaly_source"] == "user:x.npy" and np.isnan(out.loc[0, "anomaly_prevalence"])
    assert out.loc[0, "anomaly_score"] == pytest.approx(0.75)
    # a source that found nothing (no labelled image): score 0 at every layer, not NaN
    none = anomaly_scores(anom_table({0: [("auto", float("nan"), 0)], 30: [("auto", float("nan"), 0)]},
                                     prevalence={"auto": (100, 0)}))
    assert by_index(none, "anomaly_score") == {0: 0.0, 30: 0.0}


def test_channels_are_informative_only():
    anom = anom_table({19: [("paper", 1.0, 10)]}, prevalence={"paper": (10, 10)})
    out = credibility(None, None, anom, chan_table({19: [12.0, 400.0]}), model="m")
    assert out.loc[0, "channel_max_ratio"] == pytest.approx(400.0)
    assert out.loc[0, "anomaly_score"] == 0.0 and out.loc[0, "hazard"] == 0.0
    assert pd.isna(out.loc[0, "safe"]) and out.loc[0, "missing_axes"] == "position;corner"


def test_credibility_full_table_hazard_axis_and_safe():
    out = credibility(probe_table({0: {8: 1 / 8}, 19: {8: 1 / 8 + 0.2 * 7 / 8}, 30: {8: 1 / 8}}),
                      sim_table({0: (2 ** 0.1, 1.0), 19: (1.0, 1.0), 30: (0.5, 1.0)}),
                      anom_table({0: [("paper", 1.0, 5)], 19: [("paper", 1.0, 5)], 30: [("paper", 4.0, 5)]},
                                 prevalence={"paper": (10, 6)}),
                      chan_table({}), model="m")
    assert list(out.columns) == CREDIBILITY_COLUMNS
    assert list(out["layer_index"]) == [0, 19, 30]
    assert list(out["channels"]) == [4, 32, 16] and list(out["spatial"]) == [64, 8, 32]
    h = by_index(out, "hazard")
    assert h[0] == pytest.approx(0.1) and h[19] == pytest.approx(0.2) and h[30] == pytest.approx(0.6)
    assert list(out["hazard_axis"]) == ["corner", "position", "anomaly"]
    assert list(out["safe"]) == [True, True, False] and list(out["missing_axes"]) == ["", "", ""]
    assert by_index(out, "corner_score")[30] == 0.0  # corners half as alike as the control: no hazard
    chance = probe_table({0: {8: 1 / 8}, 19: {8: 1 / 8}, 30: {8: 1 / 8}})
    strict = credibility(chance, sim_table({0: 1.0, 19: 2 ** 0.2, 30: 1.0}),
                         anom_table({i: [("paper", 1.0, 5)] for i in (0, 19, 30)}, prevalence={"paper": (10, 6)}),
                         model="m", safe_threshold=0.1)
    assert list(strict["safe"]) == [True, False, True]
    assert strict["safe"].dtype == "boolean"
    # without the anomaly axis there is no verdict, even where a measured axis is over the threshold
    partial = credibility(chance, sim_table({0: 1.0, 19: 2 ** 0.2, 30: 1.0}), None, model="m",
                          safe_threshold=0.1)
    assert partial["safe"].isna().all() and list(partial["missing_axes"]) == ["anomaly"] * 3


def test_missing_tables_and_layers_give_nan():
    empty = credibility(None, pd.DataFrame(), None, None)
    assert list(empty.columns) == CREDIBILITY_COLUMNS and len(empty) == 0
    out = credibility(probe_table({0: {8: 1.0, 64: 1.0}}), pd.DataFrame(),
                      anom_table({30: [("paper", 4.0, 3)]}, prevalence={"paper": (4, 2)}), None, model="m")
    assert list(out["layer_index"]) == [0, 30]
    row0, row30 = out.iloc[0], out.iloc[1]
    assert row0["position_score"] == pytest.approx(1.0)
    assert np.isnan(row0["corner_score"]) and np.isnan(row0["anomaly_score"])
    assert np.isnan(row30["position_score"]) and np.isnan(row30["corner_score"])
    assert row30["anomaly_score"] == pytest.approx(0.5) and row30["hazard"] == pytest.approx(0.5)
    assert row30["hazard_axis"] == "anomaly"
    assert list(out["missing_axes"]) == ["corner;anomaly", "position;corner"] and out["safe"].isna().all()
    # a layer whose only evidence is an undefined corner ratio: hazard NaN, no axis, no verdict
    out = credibility(None, sim_table({19: float("nan")}), None, model="m")
    assert np.isnan(out.loc[0, "hazard"]) and out.loc[0, "hazard_axis"] == "" and pd.isna(out.loc[0, "safe"])
    assert out.loc[0, "missing_axes"] == "position;corner;anomaly"


def test_model_filter_and_label():
    sim = pd.concat([sim_table({0: 2.0}, model="a"), sim_table({0: 1.0}, model="b")])
    out = credibility(None, sim, None, model="b")
    assert list(out["model"]) == ["b"] and out.loc[0, "corner_score"] == pytest.approx(0.0)
    both = credibility(None, sim, None)
    assert list(both["model"]) == ["a", "b"] and list(both["corner_score"]) == [pytest.approx(1.0), 0.0]
    # a single-model table is relabelled with the given name
    out = credibility(None, sim_table({0: 2.0}, model="sd15"), None, model="SD-1.5")
    assert list(out["model"]) == ["SD-1.5"]
    # anomaly sources are chosen per model
    an = pd.concat([anom_table({0: [("paper", 4.0, 1)]}, model="a", prevalence={"paper": (10, 5)}),
                    anom_table({0: [("auto", 4.0, 1)]}, model="b", prevalence={"auto": (10, 1)})])
    both = credibility(None, None, an)
    assert list(both["anomaly_source"]) == ["paper", "auto"]
    assert list(both["anomaly_score"]) == [pytest.approx(0.5), pytest.approx(0.1)]


def test_formulas_documented():
    assert "log2" in FORMULA and "chance" in FORMULA and "prevalence" in FORMULA
    assert DESCRIPTIONS["formula"] == FORMULA
    assert set(CREDIBILITY_COLUMNS[5:]) <= set(DESCRIPTIONS)
    import diffaudit.analyses.credibility as cred
    for name in ("position_score", "corner_effect", "anomaly_score", "prevalence", "other_ratio", "1 / min(8, n)"):
        assert name in cred.__doc__, name
    doc = (REPO / "docs" / "credibility.md").read_text()
    caption = (REPO / "workflow" / "report" / "credibility.rst").read_text()
    for text in (doc, caption):
        for phrase in ("position_score", "corner_score", "anomaly_score", "other_ratio", "prevalence", "safe_below",
                       "log2"):
            assert phrase in text, phrase
    assert "1/8" in caption and "8x8" in caption


# ---------------------------------------------------------------------------------------------
# (b) the authors' published numbers
# ---------------------------------------------------------------------------------------------

PAPER = shared_reference() / "paper-data"
needs_paper = pytest.mark.skipif(not PAPER.is_dir(), reason="published reference files not available")
MODELS = ("sd15", "sd21", "sdturbo")


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict[str, pd.DataFrame]:
    """model -> credibility table computed from the authors' files (parsed by diffaudit.paper_files from a cache
    folder holding them, so nothing is downloaded), with the prevalence of their hand labels."""
    if not PAPER.is_dir():
        pytest.skip("published reference files not available")
    from diffaudit import paper_files as ref

    cache = tmp_path_factory.mktemp("paper")
    for f in PAPER.iterdir():
        shutil.copyfile(f, cache / f.name)
    summary = pd.read_csv(shared_reference() / "anomaly_labels_summary.csv").set_index("model")
    out = {}
    for m in MODELS:
        t = ref.paper_tables(m, cache)
        labels = np.load(cache / f"high_norm_anomalies_{m}.npy", allow_pickle=False)
        with_labels = int(np.unique(labels[:, 0]).size)
        assert with_labels == summary.loc[m, "n_images_with_label"]
        an = t["anomaly_rel_norm"].assign(n_images=int(summary.loc[m, "n_images"]),
                                          n_images_with_anomalies=with_labels)
        out[m] = credibility(t["position_probe"], t["token_group_similarity"], an, model=m,
                             safe_threshold=SAFE_BELOW).set_index("layer")
    return out


def _block(df: pd.DataFrame, *prefixes: str) -> pd.DataFrame:
    return df[df.index.str.startswith(prefixes)]


LOWER = ("down_blocks[1]", "down_blocks[2]", "down_blocks[3]", "mid_block")
UP1_DEEP = ["up_blocks[1].attentions[1]", "up_blocks[1].resnets[2]", "up_blocks[1].attentions[2]",
            "up_blocks[1].upsamplers[0]"]
LABELLED = "up_blocks[1].upsamplers[0]"


@needs_paper
@pytest.mark.parametrize("model", MODELS)
def test_paper_position_flags_the_lower_blocks(published, model):
    d = published[model]
    # the probe accuracy used is the published final-epoch 8x8 accuracy
    ref_acc = pd.read_csv(shared_reference() / "position_probe.csv")
    ref_acc = ref_acc[ref_acc["model"] == model].set_index("layer")["acc_8x8"]
    np.testing.assert_allclose(d["position_acc_8x8"], ref_acc.reindex(d.index), atol=1e-6)
    # every layer of the lower blocks is flagged on position (sd15: min 0.43 at down_blocks[1].attentions[1])
    lower = _block(d, *LOWER)
    assert len(lower) == 15 and (lower["position_score"] >= SAFE_BELOW).all()
    # position is most decodable near the bottleneck: above the first and the last block
    bottleneck = _block(d, "down_blocks[3]", "mid_block")["position_score"].mean()
    assert bottleneck > 0.8
    assert bottleneck > _block(d, "down_blocks[0]")["position_score"].mean() + 0.5
    assert bottleneck > _block(d, "up_blocks[3]")["position_score"].mean() + 0.3


@needs_paper
@pytest.mark.parametrize("model", MODELS)
def test_paper_upper_layers_unsafe_at_8x8_are_not_safe(published, model):
    d = published[model]
    ref_acc = pd.read_csv(shared_reference() / "position_probe.csv")
    ref_acc = ref_acc[ref_acc["model"] == model].set_index("layer")
    up3 = ["up_blocks[3].resnets[0]", "up_blocks[3].attentions[0]", "up_blocks[3].resnets[1]",
           "up_blocks[3].attentions[1]", "up_blocks[3].resnets[2]"]
    # at their native 64x64 grid these layers look harmless (gain over chance 1/64 below the threshold) ...
    native = (ref_acc.loc[up3, "acc_64x64"] - 1 / 64) / (1 - 1 / 64)
    assert (native < SAFE_BELOW).all()
    # ... but they tell the image's eighths apart well above chance: flagged, not safe
    assert (d.loc[up3, "position_score"] >= SAFE_BELOW).all() and not d.loc[up3, "safe"].any()
    # in general: no layer whose 8x8 position score reaches the threshold is called safe
    assert not d.loc[d["position_score"] >= SAFE_BELOW, "safe"].any()
    # the few safe layers are at the ends of the U-Net (at 0.25: conv_in, down_blocks[0].resnets[0],
    # up_blocks[3].attentions[2], conv_out in all three models), none in the middle blocks
    safe = d.index[d["safe"].fillna(False).astype(bool)]
    assert 0 < len(safe) <= 6
    assert safe.str.startswith(("conv_in", "conv_out", "down_blocks[0]", "up_blocks[3]")).all(), list(safe)


@needs_paper
def test_paper_anomalies_flag_up_blocks_1_in_sd15_and_sdturbo(published):
    for m in MODELS:
        assert set(published[m]["anomaly_source"]) == {"paper"}
    # the second half of up_blocks[1] carries the anomalies (relative norm >= 2.5 in sd15) in a share of the
    # images above the threshold: sd15 29 %, sdturbo 88 %
    for m in ("sd15", "sdturbo"):
        assert (published[m].loc[UP1_DEEP, "anomaly_score"] >= SAFE_BELOW).all(), m
    # sd21's anomalies are rare (15 % of the images) and weak (1.5x at the labelled layer): never flagged
    assert published["sd21"]["anomaly_score"].max() < SAFE_BELOW
    # the down path and the bottleneck carry none (relative norms about 1)
    for m in MODELS:
        assert (_block(published[m], "down_blocks", "mid_block")["anomaly_score"] < 0.05).all(), m


@needs_paper
def test_paper_anomaly_prevalence_orders_the_models(published):
    at = {m: published[m].loc[LABELLED] for m in MODELS}
    assert at["sdturbo"]["anomaly_prevalence"] == pytest.approx(438 / 500)
    assert at["sd15"]["anomaly_prevalence"] == pytest.approx(144 / 500)
    assert at["sd21"]["anomaly_prevalence"] == pytest.approx(76 / 500)
    # sd15's anomalies are larger than sdturbo's, but sdturbo has them in three times as many images
    assert at["sd15"]["anomaly_rel_norm"] > at["sdturbo"]["anomaly_rel_norm"]
    assert at["sdturbo"]["anomaly_score"] > at["sd15"]["anomaly_score"] > at["sd21"]["anomaly_score"]
    assert at["sdturbo"]["anomaly_score"] > 2 * at["sd15"]["anomaly_score"]


@needs_paper
@pytest.mark.parametrize("model", MODELS)
def test_paper_corner_effect_is_net_of_the_control_and_signed(published, model):
    d = published[model]
    sim = pd.read_csv(shared_reference() / "token_group_similarity.csv")
    sim = sim[sim["model"] == model].set_index("layer").reindex(d.index)
    ok = (sim["corner_ratio"] > 0) & (sim["other_ratio"] > 0)
    np.testing.assert_allclose(d.loc[ok, "corner_effect"],
                               np.log2(sim.loc[ok, "corner_ratio"] / sim.loc[ok, "other_ratio"]), atol=1e-5)
    assert d.loc[~ok, "corner_score"].isna().all()  # conv_out: negative similarities, no log-ratio
    # corners less alike than the control never count
    below = ok & (sim["corner_ratio"] < sim["other_ratio"])
    assert below.sum() >= 3
    assert (d.loc[below, "corner_effect"] < 0).all() and (d.loc[below, "corner_score"] == 0).all()
    # the corner effect lives in the down path, not in the last block
    assert _block(d, "down_blocks[1]")["corner_score"].mean() > _block(d, "up_blocks[3]")["corner_score"].mean() + 0.3


@needs_paper
def test_paper_corner_examples_where_sign_and_control_decide(published):
    # sd15 up_blocks[2].upsamplers[0]: corners at 0.75x their similarity, interior unchanged (1.01x):
    # |log2 0.75| = 0.42 would be a hazard if the sign were ignored; net effect -0.43 -> 0
    row = published["sd15"].loc["up_blocks[2].upsamplers[0]"]
    assert row["corner_effect"] < -SAFE_BELOW and row["corner_score"] == 0
    # sd21 up_blocks[1].attentions[2]: corners 1.49x, but the interior 1.30x too: the crop's global shift.
    # Raw log2 1.49 = 0.58 would be flagged; net of the control 0.20 is not
    row = published["sd21"].loc["up_blocks[1].attentions[2]"]
    assert row["corner_effect"] < SAFE_BELOW < math.log2(1.49)
    # sd15 down_blocks[3].resnets[1]: the interior loses similarity (0.72x) while the corners gain (1.73x):
    # the net effect exceeds the raw ratio's
    row = published["sd15"].loc["down_blocks[3].resnets[1]"]
    assert row["corner_effect"] > math.log2(1.73) + 0.4
