"""Per-layer credibility scores.

(a) Synthetic tables with planted effects: every score equals its hand computation (fixed 8x8 position grid,
    corner effect net of the crop control and signed, anomalies as prevalence x severity from one source).
(a') The inputs: the independent-noise experiment's probe where there is one, corrected-mode similarity and
    relative norms in paper mode (a planted case where the modes disagree), each named in the table; the corner
    control's bias (the crop moves the interior one token closer to the edge), measured on a planted edge effect.
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
# (a') the inputs: independent noise, corrected modes, the corner control's bias
# ---------------------------------------------------------------------------------------------

def _summary(acc: dict[int, float], own_index: bool = False) -> pd.DataFrame:
    """A run summary (diffaudit.analyses.comparison.run_summary's columns) with acc_8x8 per layer_index;
    ``own_index``: numbered 0, 1, ... as in an experiment's store that holds only these layers."""
    from diffaudit.tables import RUN_SUMMARY_COLUMNS

    rows = [{"layer_index": idx, "layer": name, "spatial": n, "acc_8x8": acc[idx]} for idx, name, c, n in LAYERS
            if idx in acc]
    if own_index:
        for k, row in enumerate(rows):
            row["layer_index"] = k
    return pd.DataFrame(rows).reindex(columns=RUN_SUMMARY_COLUMNS)


def test_independent_noise_experiment_is_found_by_its_only_cause():
    from diffaudit.experiments import baseline_noise, independent_noise_experiment

    assert baseline_noise({"mode": "paper"}) == "shared" and baseline_noise({"mode": "corrected"}) == "independent"
    exps = {"t200": {"timestep": 200}, "two": {"noise": "independent", "seed": 1},
            "shared": {"noise": "shared"}, "ind": {"noise": "independent", "layers": ["conv_in"], "crops": False}}
    assert independent_noise_experiment(exps) == "ind"  # scope keys allowed, a second cause is not
    assert independent_noise_experiment({k: v for k, v in exps.items() if k != "ind"}) is None
    assert independent_noise_experiment({}) is None and independent_noise_experiment(None) is None


def _write_tables(d, probe=None, sim=None, sim_corrected=None, anom=None, anom_corrected=None, runs=None):
    d.mkdir(parents=True, exist_ok=True)
    for name, t in (("position_probe", probe), ("token_group_similarity", sim),
                    ("token_group_similarity_corrected", sim_corrected), ("anomaly_rel_norm", anom),
                    ("anomaly_rel_norm_corrected", anom_corrected)):
        if t is not None:
            t.to_csv(d / f"{name}.csv", index=False)
    paths = {}
    for run, t in (runs or {}).items():
        paths[run] = d / "summaries" / f"{run}.csv"
        paths[run].parent.mkdir(exist_ok=True)
        t.to_csv(paths[run], index=False)
    return paths


def _task_cfg(mode="paper", experiments=None):
    return {"credibility": {"safe_below": SAFE_BELOW}, "extraction": {"mode": mode}, "experiments": experiments or {}}


def test_position_reads_the_independent_noise_experiment_and_names_it(tmp_path):
    from diffaudit.pipeline.credibility import run

    # the shared-noise baseline places every token (the probe can read the shared noise tensor); with one noise
    # tensor per image layer 0 is at chance; the experiment extracted only layers 0 and 30
    probe = probe_table({0: {8: 1.0}, 19: {8: 1.0}, 30: {8: 1.0}})
    runs = {"baseline": _summary({0: 1.0, 19: 1.0, 30: 1.0}),
            "ind": _summary({0: 1 / 8, 30: 1 / 8 + 0.5 * 7 / 8}, own_index=True)}  # its store: layers 0 and 1
    paths = _write_tables(tmp_path, probe=probe, runs=runs)
    exps = {"t200": {"timestep": 200}, "ind": {"noise": "independent", "layers": ["conv_in", "x"]}}
    out = pd.read_csv(run(_task_cfg("paper", exps), "m", tmp_path, tmp_path / "c.csv", run_summaries=paths),
                      keep_default_na=False)
    assert list(out["layer_index"]) == [0, 19, 30]  # one row per layer, at the baseline's layer_index
    s = by_index(out, "position_score")
    assert float(s[0]) == pytest.approx(0.0) and float(s[30]) == pytest.approx(0.5) and float(s[19]) == 1.0
    assert by_index(out, "position_input") == {0: "experiment ind (independent noise)",
                                               19: "baseline probe (shared noise)",
                                               30: "experiment ind (independent noise)"}
    # no such experiment: the baseline's shared-noise probe, and the table says so
    out = pd.read_csv(run(_task_cfg("paper", {"t200": {"timestep": 200}}), "m", tmp_path, tmp_path / "c.csv",
                          run_summaries=paths), keep_default_na=False)
    assert set(out["position_input"]) == {"baseline probe (shared noise)"} and (out["position_score"] == 1).all()
    # a corrected-mode baseline already draws one noise tensor per image: its own probe
    out = pd.read_csv(run(_task_cfg("corrected", exps), "m", tmp_path, tmp_path / "c.csv", run_summaries=paths),
                      keep_default_na=False)
    assert set(out["position_input"]) == {"baseline probe (independent noise)"}


def _quirk_stores(tmp, nimg=6, c=24, n=8, seed=0):
    """Stores of one 8x8 layer (64 px images, 8 px tokens) whose crop makes the interior tokens more alike (a
    vector shared by the interior of every crop) and the corners far more alike (another one): at n = 8 the
    paper mode's pair counts (interior counted on the 8-grid, 36 tokens, instead of 16) inflate the interior's
    ratio, and with it the control."""
    from diffaudit.store import StoreWriter

    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(c, 3)))
    full = rng.normal(size=(nimg, c, n, n)) / np.sqrt(c) + 0.4 * q[:, 0][None, :, None, None]
    crop = full[..., 1:-1, 1:-1].copy()
    crop[:, :, 1:-1, 1:-1] += 0.3 * q[:, 1][None, :, None, None]
    for r, cc in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
        crop[:, :, r, cc] += 0.4 * q[:, 2][None, :]
    layer, ids = "down_blocks[3].resnets[0]", [f"img{i}" for i in range(nimg)]
    rep = tmp / "representations"
    for name, x in (("full", full), ("crop8", crop)):
        w = StoreWriter(rep / f"{name}.zarr", layers=[layer], image_ids=ids, labels=list(range(nimg)),
                        config={"image_size": 64}, attrs={"image_size": 64}, layer_indices=[16])
        w.write_batch(0, {layer: x.astype(np.float16)})
        w.finalize()
    return rep


def test_paper_mode_quirk_the_score_follows_the_corrected_similarity(tmp_path):
    from diffaudit.analyses.similarity import token_group_similarity
    from diffaudit.pipeline import token_group_similarity as task
    from diffaudit.pipeline.credibility import run
    from diffaudit.store import open_model_stores
    from diffaudit.tables import write_csv

    rep = _quirk_stores(tmp_path)
    cfg = {"similarity": {"mode": "paper", "chunk_images": 4}, "bootstrap": {"n_resamples": 50, "level": 0.9,
                                                                             "seed": 0}}
    task.run(cfg, "m", [rep], tmp_path / "token_group_similarity.csv",
             corrected_csv=tmp_path / "token_group_similarity_corrected.csv")
    paper = pd.read_csv(tmp_path / "token_group_similarity.csv")
    corrected = pd.read_csv(tmp_path / "token_group_similarity_corrected.csv")
    # the paper-format table is the one the paper mode writes alone; the twin is the corrected mode's, same pass
    from diffaudit.analyses.bootstrap import Bootstrap

    full, crops = open_model_stores([rep])
    for mode, table in (("paper", paper), ("corrected", corrected)):
        alone = token_group_similarity(full, crops, mode=mode, image_size=64, chunk_images=4, model_name="m",
                                       bootstrap=Bootstrap(50, 0.9, 0))
        pd.testing.assert_frame_equal(table, pd.read_csv(write_csv(alone, tmp_path / f"alone_{mode}.csv")))
    # the corners are the same in both modes, the interior (the control) is not
    assert paper.corner_ratio[0] == pytest.approx(corrected.corner_ratio[0], rel=1e-9)
    assert paper.other_ratio[0] > corrected.other_ratio[0] + 0.1
    effect = {m: math.log2(t.corner_ratio[0] / t.other_ratio[0]) for m, t in (("paper", paper),
                                                                              ("corrected", corrected))}
    assert effect["paper"] < SAFE_BELOW < effect["corrected"]  # the quirk alone would call the corners harmless
    out = pd.read_csv(run(_task_cfg(), "m", tmp_path, tmp_path / "c.csv"), keep_default_na=False)
    assert out.corner_effect[0] == pytest.approx(effect["corrected"], abs=1e-5)  # 6 significant digits in the csv
    assert out.corner_score[0] >= SAFE_BELOW and out.similarity_mode[0] == "corrected"


def test_paper_mode_quirk_the_score_follows_the_corrected_relative_norm(tmp_path):
    from diffaudit.analyses.anomalies import relative_norms, relative_norms_modes
    from diffaudit.pipeline.credibility import run
    from diffaudit.store import ReprStore, StoreWriter

    # one 4x4 layer, also the reference layer: a labelled 2x2 patch at norm 2.5 x the other 12 tokens:
    # corrected 2.5; the paper mode's mean includes the patch itself: 2.5 / (22 / 16) = 1.82
    nimg, c, n = 4, 3, 4
    x = np.zeros((nimg, c, n, n), np.float32)
    x[:, 0] = 1.0
    x[:, 0, :2, :2] = 2.5
    w = StoreWriter(tmp_path / "full.zarr", layers=["conv_in"], image_ids=list("abcd"), labels=None, config={},
                    layer_indices=[0])
    w.write_batch(0, {"conv_in": x})
    w.finalize()
    store = ReprStore(tmp_path / "full.zarr")
    labels = np.array([[0, 0, 0], [2, 0, 0]])
    both = relative_norms_modes(store, labels, ("paper", "corrected"), ref_layer="conv_in")
    for mode in ("paper", "corrected"):  # one pass, the same tables as alone
        pd.testing.assert_frame_equal(both[mode], relative_norms(store, labels, mode=mode, ref_layer="conv_in"))
    assert both["corrected"].rel_norm_mean[0] == pytest.approx(2.5)
    assert both["paper"].rel_norm_mean[0] == pytest.approx(2.5 * 16 / 22)
    # a planted case where the modes disagree on the score: paper 1.6 x (severity 0.68), corrected 2.2 x (1)
    paper = anom_table({0: [("paper", 1.6, 5)]}, prevalence={"paper": (10, 5)})
    corrected = anom_table({0: [("paper", 2.2, 5)]}, prevalence={"paper": (10, 5)})
    _write_tables(tmp_path, anom=paper, anom_corrected=corrected)
    out = pd.read_csv(run(_task_cfg(), "m", tmp_path, tmp_path / "c.csv"), keep_default_na=False)
    assert out.anomaly_score[0] == pytest.approx(0.5) and out.anomaly_rel_norm[0] == pytest.approx(2.2)
    assert out.anomaly_mode[0] == "corrected" and out.similarity_mode[0] == "" and out.position_input[0] == ""


def _edge_distance(s: int) -> np.ndarray:
    i = np.arange(s)
    d = np.minimum(i, s - 1 - i)
    return np.minimum(d[:, None], d[None, :])


def planted_edge_ratios(n: int, profile, nimg: int = 4, c: int = 128, base: float = 1 / 3, seed: int = 0):
    """(corner_ratio, other_ratio) in corrected mode for maps whose tokens are content (random, the same in the
    full image and the crop) + ``base`` x a mean direction (content cosine ~0.1) + ``profile(d)`` x an edge
    direction, d = the token's distance to the nearest edge of ITS map. Nothing else changes with the crop, so an
    unbiased control would have other_ratio = 1."""
    from diffaudit.analyses.similarity import GroupSimilarityAccumulator, ratio_columns

    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(c, 2)))
    content = rng.normal(size=(nimg, c, n, n)) / np.sqrt(c) + base * q[:, 0][None, :, None, None]
    edge = q[:, 1][None, :, None, None]
    full = content + profile(_edge_distance(n))[None, None] * edge
    crop = content[..., 1:-1, 1:-1] + profile(_edge_distance(n - 2))[None, None] * edge
    acc_crop, acc_full = GroupSimilarityAccumulator(), GroupSimilarityAccumulator(ring=True)
    acc_crop.update(crop.astype(np.float32))
    acc_full.update(full.astype(np.float32))
    r = ratio_columns(acc_crop.matrix(False, n), acc_full.matrix(False, n))
    return r["corner_ratio"], r["other_ratio"]


GRIDS = (8, 16, 32, 64)


def test_corner_control_bias_of_the_one_token_move_towards_the_edge():
    """The crop removes one ring of tokens: every interior token is one token closer to the edge in the crop
    than in the full image. An edge effect confined to the outermost token leaves the control unbiased; one
    that reaches into the interior (here: halving per token from the edge) raises other_ratio, so the corner
    effect net of the control is biased DOWN by log2(other_ratio). The sizes are those of docs/credibility.md."""
    for n in GRIDS:
        corner, other = planted_edge_ratios(n, lambda d: 1.0 * (d == 0))
        assert other == pytest.approx(1.0, abs=1e-6)  # the interior never reaches distance 0: no bias
        assert corner_scores(sim_table({0: (corner, other)})).corner_score[0] == 1.0
    bias = {}
    for n in GRIDS:
        corner, other = planted_edge_ratios(n, lambda d: 0.5 ** d)
        bias[n] = -math.log2(other)
        assert math.log2(corner) > 0.9  # the corners' own change: ~1.9-2.2x as alike at the corner
    # the bias is negative (corner effect underestimated) and shrinks with the grid: the interior's outer ring
    # is a smaller share of its pairs
    assert bias[8] < bias[16] < bias[32] < bias[64] < 0
    assert bias[8] == pytest.approx(-0.75, abs=0.05) and bias[16] == pytest.approx(-0.35, abs=0.04)
    assert bias[32] == pytest.approx(-0.09, abs=0.02) and bias[64] == pytest.approx(-0.016, abs=0.006)
    assert bias[16] < -SAFE_BELOW < bias[32]  # larger than the threshold itself at the 8x8 and 16x16 grids


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
    from diffaudit.analyses.similarity import corrected_from_paper

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
        # the authors published paper-mode tables only: the similarity is converted to corrected mode exactly
        # from its raw values (corrected_from_paper); the relative norms stay paper mode (the per-label norms that
        # a conversion needs are not published), and the probe is their shared-noise run
        out[m] = credibility(t["position_probe"], corrected_from_paper(t["token_group_similarity"]), an, model=m,
                             safe_threshold=SAFE_BELOW, position_input="published probe (shared noise)",
                             similarity_mode="corrected", anomaly_mode="paper").set_index("layer")
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
    from diffaudit.analyses.similarity import corrected_from_paper

    d = published[model]
    assert set(d["similarity_mode"]) == {"corrected"} and set(d["anomaly_mode"]) == {"paper"}
    paper = pd.read_csv(shared_reference() / "token_group_similarity.csv")
    paper = paper[paper["model"] == model].reset_index(drop=True)
    sim = corrected_from_paper(paper).set_index("layer").reindex(d.index)
    # the conversion reproduces the published count correction (conv_out, not plotted: rounding dominates)
    fix = pd.read_csv(shared_reference() / "token_group_border_count_correction.csv")
    fix = fix[fix["model"] == model].set_index("layer").reindex(d.index)
    plotted = paper.set_index("layer").reindex(d.index)["plotted"].astype(bool)
    for g in ("border", "other"):
        np.testing.assert_allclose(sim.loc[plotted, f"{g}_ratio"], fix.loc[plotted, f"{g}_ratio_corrected"],
                                   atol=1e-4)
    ok = (sim["corner_ratio"] > 0) & (sim["other_ratio"] > 0)
    # (the csv rounds the raw values to 6 decimals; the fixture converts the authors' files)
    np.testing.assert_allclose(d.loc[ok, "corner_effect"],
                               np.log2(sim.loc[ok, "corner_ratio"] / sim.loc[ok, "other_ratio"]), atol=1e-4)
    # the corners are the same in both modes; the control differs, most at the 8x8 layers (n - 2 = 6: the paper
    # mode counts the interior's 16 tokens as 36)
    paper = paper.set_index("layer").reindex(d.index)
    np.testing.assert_allclose(sim.loc[ok, "corner_ratio"], paper.loc[ok, "corner_ratio"], rtol=1e-4)
    # (in log2 units up to 0.24 at sd15's, 0.20 at sdturbo's and 0.04 at sd21's 8x8 layers)
    shift = (d.loc[ok, "corner_effect"] - np.log2(paper.loc[ok, "corner_ratio"] / paper.loc[ok, "other_ratio"])).abs()
    spatial = d.loc[ok, "spatial"]
    assert shift[spatial == 8].max() > 0.03 and shift[spatial >= 32].max() < 1e-3
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
    # sd15 down_blocks[3].resnets[1]: the interior loses similarity (0.85x in corrected mode; 0.72x with the
    # paper mode's count quirk, net effect 1.26) while the corners gain (1.73x): the net effect (1.02) exceeds
    # the raw ratio's
    row = published["sd15"].loc["down_blocks[3].resnets[1]"]
    assert math.log2(1.73) + 0.2 < row["corner_effect"] < 1.1
