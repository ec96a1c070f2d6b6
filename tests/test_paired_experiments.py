"""Paired experiment comparisons (diffaudit.analyses.paired): per-image aggregates of both runs, the same
bootstrap resamples on both sides, differences with paired intervals; the anomalies compared at the baseline's
label positions. Tiny synthetic stores with planted signals."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from diffaudit.analyses.bootstrap import Bootstrap
from diffaudit.analyses.comparison import compare
from diffaudit.analyses.paired import paired_differences, per_image_frame
from diffaudit.analyses.probe import run_probe
from diffaudit.config import load_config
from diffaudit.pipeline import anomalies as anomalies_task
from diffaudit.pipeline import run_summary as summary_task
from diffaudit.store import ReprStore, StoreWriter
from diffaudit.tables import EXPERIMENT_COMPARISON_COLUMNS

REF = "up_blocks[1].upsamplers[0]"
N_IMG, C = 16, 8
BOOT = Bootstrap(n_resamples=400, level=0.95, seed=0)


def write_store(rep_dir, data: dict[str, np.ndarray], image_size: int = 512) -> ReprStore:
    n = next(iter(data.values())).shape[0]
    # ids of digits with leading zeros, as the datasets name images: they must stay strings through the CSVs
    w = StoreWriter(rep_dir / "full.zarr", layers=list(data), image_ids=[f"{i:06d}" for i in range(n)], labels=None,
                    config={"p": str(rep_dir)}, layer_indices=list(range(len(data))),
                    attrs={"image_size": image_size})
    w.write_batch(0, {k: v.astype(np.float16) for k, v in data.items()})
    w.finalize()
    return ReprStore(rep_dir / "full.zarr")


def anomaly_layers(rng, planted: bool) -> dict[str, np.ndarray]:
    """Tokens of norm ~1 on a 32x32 (the labelled layer) and a 16x16 map; with ``planted`` a 2x2 patch of 6x the
    norm in every even image (one token at 16x16)."""
    out = {}
    for layer, h in ((REF, 32), ("up_blocks[1].resnets[0]", 16)):
        x = rng.standard_normal((N_IMG, C, h, h))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        if planted:
            k = max(1, 2 * h // 32)
            for img in range(0, N_IMG, 2):
                r0 = (4 + 2 * (img % 5)) * h // 32
                x[img, :, r0:r0 + k, r0:r0 + k] *= 6.0
        out[layer] = x
    return out


def config(**bootstrap):
    cfg = load_config("params.yaml")
    cfg["anomalies"] = {**cfg["anomalies"], "labels": ["auto"], "ref_layer": REF}
    cfg["bootstrap"] = {"n_resamples": 400, "level": 0.95, "seed": 0, **bootstrap}
    return cfg


def run_anomalies(cfg, root, name, data, base_labels=None, image_size=512):
    rep = root / name / "representations"
    rep.mkdir(parents=True)
    write_store(rep, data, image_size)
    out = root / name
    anomalies_task.run(cfg, "m", [rep], out / "anomaly_rel_norm.csv", out / "anomaly_detector.json",
                       labels_csv=out / "anomaly_labels.csv", per_image_csv=out / "anomaly_rel_norm_per_image.csv",
                       baseline_labels_csv=base_labels)
    return out


def summarize(cfg, out, base=None):
    """The run's summary through the run_summary task (probe and similarity tables left empty)."""
    empty = out / "empty.csv"
    empty.write_text("")
    dst = out / "summary.csv"
    summary_task.run(cfg, empty, empty, out / "anomaly_rel_norm.csv", dst,
                     per_image=[out / "anomaly_rel_norm_per_image.csv"],
                     base_per_image=None if base is None else [base / "anomaly_rel_norm_per_image.csv"])
    return pd.read_csv(dst)


def test_an_experiment_that_removes_the_planted_anomalies_is_compared_at_the_baseline_labels(tmp_path):
    cfg = config()
    rng = np.random.default_rng(0)
    clean = anomaly_layers(rng, planted=False)
    planted = {k: v.copy() for k, v in clean.items()}
    for layer, x in anomaly_layers(np.random.default_rng(0), planted=True).items():
        planted[layer] = x  # the same tokens, with the patches
    base = run_anomalies(cfg, tmp_path, "baseline", planted)
    exp = run_anomalies(cfg, tmp_path, "exp", clean, base_labels=base / "anomaly_labels.csv")
    labels = pd.read_csv(base / "anomaly_labels.csv")
    assert len(labels) == N_IMG // 2 and set(labels["label_source"]) == {"auto"}  # the detector found the plants
    table = pd.read_csv(exp / "anomaly_rel_norm.csv")
    assert set(table["label_source"]) == {"auto", "baseline:auto"}
    b, e = summarize(cfg, base), summarize(cfg, exp, base)
    assert b["rel_norm_diff"].isna().all() and (b["rel_norm_source"] == "auto").all()
    # the experiment at the baseline's labels: about 1 instead of about 6; its own detector finds nothing
    assert (e["rel_norm_source"] == "baseline:auto").all() and (e["own_rel_norm_source"] == "auto").all()
    assert e["own_rel_norm_mean"].isna().all() and (e["rel_norm_mean"] < 1.5).all()
    assert (e["rel_norm_diff"] < -3).all() and (e["rel_norm_diff_ci_high"] < 0).all(), e
    assert np.allclose(e["rel_norm_diff"], e["rel_norm_mean"] - b["rel_norm_mean"], atol=1e-4)
    assert (e["rel_norm_diff_ci_low"] <= e["rel_norm_diff"]).all()
    # experiments.csv: the baseline's diffs are empty, the schema is the one of diffaudit.tables
    out = compare("m", {"baseline": b, "exp": e}, {"exp": {"padding_mode": "circular"}})
    assert list(out.columns) == EXPERIMENT_COMPARISON_COLUMNS
    assert out.loc[out["experiment"] == "baseline", "rel_norm_diff"].isna().all()


def test_another_resolution_is_not_paired_and_says_why(tmp_path):
    cfg = config()
    data = anomaly_layers(np.random.default_rng(1), planted=True)
    base = run_anomalies(cfg, tmp_path, "baseline", data)
    exp = run_anomalies(cfg, tmp_path, "exp", data, base_labels=base / "anomaly_labels.csv", image_size=256)
    assert set(pd.read_csv(exp / "anomaly_rel_norm.csv")["label_source"]) == {"auto"}  # no baseline:* rows
    why = json.loads((exp / "anomaly_detector.json").read_text())["baseline_labels"]
    assert why["used"] is False and "256 px" in why["reason"] and "512 px" in why["reason"]
    e = summarize(cfg, exp, base)
    assert e["rel_norm_diff"].isna().all() and (e["rel_norm_source"] == "auto").all()  # its own labels, named
    assert e["diff_note"].str.contains("not paired: extracted at 256 px, the baseline at 512 px").all()


# ---------------------------------------------------------------------------------------------
# probe and corner ratio
# ---------------------------------------------------------------------------------------------

def probe_frame(rep_dir, layer_data, mode="corrected"):
    store = write_store(rep_dir, layer_data)
    records: list = []
    run_probe(store, mode=mode, epochs=3, batch_size=64, lr=0.01, granularities=(8,), seeds=(1, 2), device="cpu",
              image_records=records)
    return per_image_frame(records, store.image_ids, 512)


@pytest.fixture(scope="module")
def probe_runs(tmp_path_factory):
    """The same random features with a planted position code (baseline), again in a store with one layer more, and
    without the code (experiment)."""
    rng = np.random.default_rng(0)
    n, c, n_img = 8, 64, 30
    noise = rng.standard_normal((n_img, c, n, n))
    code = rng.standard_normal((c, n, n))
    root = tmp_path_factory.mktemp("paired_probe")
    (root / "b").mkdir(), (root / "e").mkdir(), (root / "b2").mkdir()
    base = probe_frame(root / "b", {"L": noise + 2.0 * code[None]})
    again = probe_frame(root / "b2", {"X": noise[:, ::-1], "L": noise + 2.0 * code[None]})  # one layer more
    exp = probe_frame(root / "e", {"L": noise})
    return base, again, exp


def test_identical_runs_differ_by_zero_with_a_degenerate_interval(probe_runs):
    base, again, _ = probe_runs
    # corrected mode: a run with another layer list fits the same probe for the same layer and seed
    again = again[again["layer"] == "L"].reset_index(drop=True)
    pd.testing.assert_frame_equal(base, again)
    d = paired_differences(base, again, ["L"], BOOT)
    row = d.iloc[0]
    assert (row["acc_8x8_diff"], row["acc_8x8_diff_ci_low"], row["acc_8x8_diff_ci_high"]) == (0.0, 0.0, 0.0)
    assert row["interior_acc_8x8_diff"] == 0.0 and row["interior_acc_8x8_diff_ci_high"] == 0.0
    assert "corner_ratio: no cropped variants" in row["diff_note"]


def test_a_planted_position_code_removed_gives_a_negative_accuracy_difference(probe_runs):
    base, _, exp = probe_runs
    row = paired_differences(base, exp, ["L"], BOOT).iloc[0]
    assert row["acc_8x8_diff"] < -0.3 and row["acc_8x8_diff_ci_high"] < 0, row
    # the estimate is the difference of the seed means of the per-image accuracies
    acc = {k: f[f["quantity"] == "acc_8x8"].groupby("seed")["num"].mean().mean() for k, f in (("b", base),
                                                                                              ("e", exp))}
    assert row["acc_8x8_diff"] == pytest.approx(acc["e"] - acc["b"])
    # and the other way round: the sign follows the runs
    assert paired_differences(exp, base, ["L"], BOOT).iloc[0]["acc_8x8_diff_ci_low"] > 0
    # an experiment without the layer is not paired, and says so
    assert paired_differences(base, exp.assign(layer="M"), ["M"], BOOT).iloc[0]["diff_note"] == \
        "not paired: the baseline has no such layer"


def corner_frame(rng, crop_corner: float, n: int = 40) -> pd.DataFrame:
    """Per-image corner terms: R_crop = crop_corner on average, R_full = 0.5, with image-level noise."""
    den = np.full(n, 12.0)
    recs = [{"layer": "L", "spatial": 8, "quantity": "corner_sim_cropped_image", "images": np.arange(n),
             "num": den * (crop_corner + 0.05 * rng.standard_normal(n)), "den": den},
            {"layer": "L", "spatial": 8, "quantity": "corner_sim_full_image_ring_removed", "images": np.arange(n),
             "num": den * (0.5 + 0.05 * rng.standard_normal(n)), "den": den}]
    return per_image_frame(recs, [f"img{i}" for i in range(n)], 512)


def test_a_planted_corner_difference_has_the_right_sign():
    base = corner_frame(np.random.default_rng(0), 0.9)  # ratio ~1.8
    exp = corner_frame(np.random.default_rng(0), 0.5)  # the same image noise, ratio ~1.0
    row = paired_differences(base, exp, ["L"], BOOT).iloc[0]
    ratio = {k: (f.iloc[:40]["num"].sum() / f.iloc[:40]["den"].sum()) / (f.iloc[40:]["num"].sum()
                                                                           / f.iloc[40:]["den"].sum())
             for k, f in (("b", base), ("e", exp))}
    assert row["corner_ratio_diff"] == pytest.approx(ratio["e"] - ratio["b"])
    assert row["corner_ratio_diff"] < -0.6 and row["corner_ratio_diff_ci_high"] < 0
    # pairing narrows the interval: the noise the runs share per image cancels, so it is narrower than the two
    # runs' own intervals together
    def own_width(f):
        lo, hi = BOOT.interval(BOOT.ratio_resamples(f.iloc[:40]["num"], f.iloc[:40]["den"])
                               / BOOT.ratio_resamples(f.iloc[40:]["num"], f.iloc[40:]["den"]))
        return hi - lo

    width = row["corner_ratio_diff_ci_high"] - row["corner_ratio_diff_ci_low"]
    assert width < 0.5 * (own_width(base) + own_width(exp))
    # other images are refused
    other = exp.assign(image_id=exp["image_id"] + "x")
    assert "corner_ratio: other images" in paired_differences(base, other, ["L"], BOOT).iloc[0]["diff_note"]


def test_another_resolution_refuses_every_difference():
    base = corner_frame(np.random.default_rng(0), 0.9)
    exp = corner_frame(np.random.default_rng(0), 0.5).assign(image_size=256)
    row = paired_differences(base, exp, ["L"], BOOT).iloc[0]
    assert np.isnan(row[["acc_8x8_diff", "corner_ratio_diff", "rel_norm_diff"]].to_numpy(float)).all()
    assert row["diff_note"] == "not paired: extracted at 256 px, the baseline at 512 px (other grids)"


def test_one_labelled_image_gives_the_difference_but_no_interval():
    """The baseline's labels all lie in one image: every defined resample holds that image, so the percentile
    interval would collapse to the estimate and 'exclude 0' for any difference; it is left empty instead."""
    n = 10
    den = np.zeros(n)
    den[3] = 2.0

    def frame(value):
        rec = {"layer": "L", "spatial": 8, "quantity": "rel_norm", "images": np.arange(n), "num": den * value,
               "den": den}
        return per_image_frame([{**rec, "label_source": src} for src in ("auto",)], [f"{i:06d}" for i in range(n)],
                               512)

    base, exp = frame(4.0), frame(1.5).assign(label_source="baseline:auto")
    row = paired_differences(base, exp, ["L"], BOOT, "auto", "baseline:auto").iloc[0]
    assert row["rel_norm_diff"] == pytest.approx(-2.5)
    assert np.isnan(row["rel_norm_diff_ci_low"]) and np.isnan(row["rel_norm_diff_ci_high"])
    assert "rel_norm_mean: 1 labelled image, no interval" in row["diff_note"]
    # two labelled images: an interval
    den[5] = 1.0
    row = paired_differences(frame(4.0), frame(1.5).assign(label_source="baseline:auto"), ["L"], BOOT, "auto",
                             "baseline:auto").iloc[0]
    assert row["rel_norm_diff_ci_high"] == pytest.approx(-2.5) and "rel_norm_mean" not in row["diff_note"]
