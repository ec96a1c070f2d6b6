"""Per-layer credibility scores: planted probe accuracies, corner ratios, anomaly norms, missing tables."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from diffaudit.analyses.credibility import (CREDIBILITY_COLUMNS, DESCRIPTIONS, FORMULA, anomaly_scores,
                                            corner_scores, credibility, position_scores)

LAYERS = [(0, "conv_in", 4, 64), (19, "mid_block.attentions[0]", 32, 8), (30, "up_blocks[1].upsamplers[0]", 16, 32)]


def probe_table(acc_final: dict[int, dict[int, float]], seeds=(1, 2), model="m") -> pd.DataFrame:
    """acc_final[layer_index][granularity] = final-epoch per_axis accuracy; epoch 1 rows hold a decoy 0.5."""
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


def sim_table(ratios: dict[int, float], other: float = 1.0, model="m") -> pd.DataFrame:
    rows = [(model, idx, name, c, n, ratios[idx], 1.0, other) for idx, name, c, n in LAYERS if idx in ratios]
    return pd.DataFrame(rows, columns=["model", "layer_index", "layer", "channels", "spatial", "corner_ratio",
                                       "border_ratio", "other_ratio"])


def anom_table(rel: dict[int, list[tuple[str, float, int]]], model="m") -> pd.DataFrame:
    rows = [(model, idx, name, c, n, src, r, 0.1, k) for idx, name, c, n in LAYERS for src, r, k in rel.get(idx, [])]
    return pd.DataFrame(rows, columns=["model", "layer_index", "layer", "channels", "spatial", "label_source",
                                       "rel_norm_mean", "rel_norm_std", "n_anomalies"])


def chan_table(ratios: dict[int, list[float]], model="m") -> pd.DataFrame:
    rows = [(model, idx, name, c, n, ch, r, 100.0, 0.5, 10) for idx, name, c, n in LAYERS
            for ch, r in enumerate(ratios.get(idx, []))]
    return pd.DataFrame(rows, columns=["model", "layer_index", "layer", "channels", "spatial", "channel",
                                       "median_abs_ratio", "max_abs", "frac_images_outlier", "n_images"])


def by_index(df: pd.DataFrame, col: str) -> dict[int, float]:
    return dict(zip(df["layer_index"], df[col]))


def test_position_perfect_is_one_chance_is_zero_native_granularity():
    probe = probe_table({
        0: {8: 1.0, 16: 1.0, 32: 1.0, 64: 1.0},          # perfect at the native 64 -> 1
        19: {8: 1 / 8, 16: 1 / 8},                        # chance at native 8 (16 > spatial ignored) -> 0
        30: {8: 1.0, 16: 1.0, 32: 0.5, 64: 0.9},          # native 32: (0.5 - 1/32) / (1 - 1/32)
    })
    s = by_index(position_scores(probe), "position_score")
    assert s[0] == pytest.approx(1.0)
    assert s[19] == pytest.approx(0.0, abs=1e-12)
    assert s[30] == pytest.approx((0.5 - 1 / 32) / (1 - 1 / 32))


def test_position_largest_granularity_below_spatial_and_seed_mean():
    probe = probe_table({30: {8: 0.75, 16: 0.5}})  # no 32: largest <= 32 is 16, chance 1/16
    s = by_index(position_scores(probe), "position_score")
    assert s[30] == pytest.approx((0.5 - 1 / 16) / (1 - 1 / 16))
    # seeds averaged: seed 1 perfect, seed 2 at chance -> half the gain
    p = probe_table({19: {8: 1.0}}, seeds=(1,))
    p2 = probe_table({19: {8: 1 / 8}}, seeds=(2,))
    s = by_index(position_scores(pd.concat([p, p2])), "position_score")
    assert s[19] == pytest.approx(0.5)


def test_position_below_chance_clipped():
    s = by_index(position_scores(probe_table({19: {8: 0.05}})), "position_score")
    assert s[19] == 0.0


def test_corner_ratio_two_one_half_nan():
    s = by_index(corner_scores(sim_table({0: 2.0, 19: 1.0, 30: 0.5})), "corner_score")
    assert s == {0: pytest.approx(1.0), 19: pytest.approx(0.0), 30: pytest.approx(1.0)}
    s = by_index(corner_scores(sim_table({0: math.sqrt(2), 19: -0.3, 30: float("nan")})), "corner_score")
    assert s[0] == pytest.approx(0.5)
    assert np.isnan(s[19]) and np.isnan(s[30])
    assert by_index(corner_scores(sim_table({0: 8.0})), "corner_score")[0] == 1.0


def test_corner_control_divides_by_other_ratio():
    sim = sim_table({0: 2.0}, other=2.0)
    assert by_index(corner_scores(sim), "corner_score")[0] == pytest.approx(1.0)
    assert by_index(corner_scores(sim, control=True), "corner_score")[0] == pytest.approx(0.0)


def test_anomaly_rel_norm_and_channels():
    anom = anom_table({0: [("paper", 4.0, 10), ("auto", 1.5, 3)],   # max over sources -> 4 -> 1
                       19: [("paper", 1.0, 10)],                       # 1 -> 0
                       30: [("paper", 2.0, 10), ("auto", 9.0, 0)]})    # n=0 source ignored -> 2 -> 0.5
    s = by_index(anomaly_scores(anom), "anomaly_score")
    assert s == {0: pytest.approx(1.0), 19: pytest.approx(0.0), 30: pytest.approx(0.5)}
    # a massive channel of 40x the median channel (= 4 x the 10x threshold) dominates the relative norm of 1
    s = by_index(anomaly_scores(anom, chan_table({19: [12.0, 40.0]})), "anomaly_score")
    assert s[19] == pytest.approx(1.0)
    s = by_index(anomaly_scores(anom_table({}), chan_table({19: [20.0]})), "anomaly_score")
    assert s[19] == pytest.approx(0.5)


def test_credibility_full_table_hazard_and_safe():
    out = credibility(probe_table({0: {64: 1 / 64}, 19: {8: 1 / 8}, 30: {32: 1 / 32}}),
                      sim_table({0: 1.0, 19: 2 ** 0.2, 30: 1.0}),
                      anom_table({0: [("paper", 1.0, 5)], 19: [("paper", 1.0, 5)], 30: [("paper", 2 ** 1.2, 5)]}),
                      chan_table({}), model="m")
    assert list(out.columns) == CREDIBILITY_COLUMNS
    assert list(out["layer_index"]) == [0, 19, 30]
    assert list(out["channels"]) == [4, 32, 16] and list(out["spatial"]) == [64, 8, 32]
    h = by_index(out, "hazard")
    assert h[0] == pytest.approx(0.0) and h[19] == pytest.approx(0.2) and h[30] == pytest.approx(0.6)
    assert list(out["safe"]) == [True, True, False]
    strict = credibility(None, sim_table({0: 1.0, 19: 2 ** 0.2, 30: 1.0}), None, model="m", safe_threshold=0.1)
    assert list(strict["safe"]) == [True, False, True]
    assert strict["safe"].dtype == bool


def test_missing_tables_and_layers_give_nan():
    empty = credibility(None, pd.DataFrame(), None, None)
    assert list(empty.columns) == CREDIBILITY_COLUMNS and len(empty) == 0
    out = credibility(probe_table({0: {64: 1.0}}), pd.DataFrame(), anom_table({30: [("paper", 4.0, 3)]}), None,
                      model="m")
    assert list(out["layer_index"]) == [0, 30]
    row0, row30 = out.iloc[0], out.iloc[1]
    assert row0["position_score"] == pytest.approx(1.0)
    assert np.isnan(row0["corner_score"]) and np.isnan(row0["anomaly_score"])
    assert np.isnan(row30["position_score"]) and np.isnan(row30["corner_score"])
    assert row30["anomaly_score"] == pytest.approx(1.0) and row30["hazard"] == pytest.approx(1.0)
    # a layer whose only evidence is an undefined corner ratio: hazard NaN, not safe
    out = credibility(None, sim_table({19: float("nan")}), None, model="m")
    assert np.isnan(out.loc[0, "hazard"]) and not out.loc[0, "safe"]


def test_model_filter_and_label():
    sim = pd.concat([sim_table({0: 2.0}, model="a"), sim_table({0: 1.0}, model="b")])
    out = credibility(None, sim, None, model="b")
    assert list(out["model"]) == ["b"] and out.loc[0, "corner_score"] == pytest.approx(0.0)
    both = credibility(None, sim, None)
    assert list(both["model"]) == ["a", "b"] and list(both["corner_score"]) == [pytest.approx(1.0), 0.0]
    # a single-model table is relabelled with the given name
    out = credibility(None, sim_table({0: 2.0}, model="sd15"), None, model="SD-1.5")
    assert list(out["model"]) == ["SD-1.5"]


def test_formula_documented():
    assert "log2" in FORMULA and "chance" in FORMULA and DESCRIPTIONS["formula"] == FORMULA
    import diffaudit.analyses.credibility as cred
    assert "position_score" in cred.__doc__ and "anomaly_score" in cred.__doc__
