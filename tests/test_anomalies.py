"""High-norm anomaly analysis on synthetic stores with planted 2x2 patches; label files and their checksums."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from diffaudit.analyses import anomalies as an
from diffaudit.analyses.anomalies import (RELNORM_COLUMNS, LabelFileError, detect_anomalies, load_label_file,
                                          precision_recall, relative_norms)
from conftest import shared_reference
from diffaudit.store import ReprStore, StoreWriter

REF = "up_blocks[1].upsamplers[0]"
SIZES = {"down_blocks[3].resnets[0]": 8, "up_blocks[1].resnets[0]": 16, REF: 32, "up_blocks[2].upsamplers[0]": 64}
N_IMG, C = 20, 4
# (image, x, y, amplitude); image 10 carries two anomalies far apart (distinct tokens even at 8x8)
PLANTED = [(0, 0, 0, 5.0), (2, 30, 30, 3.0), (3, 4, 10, 7.0), (7, 16, 2, 5.0), (8, 6, 28, 4.0), (10, 0, 0, 5.0),
           (10, 30, 30, 6.0), (19, 12, 12, 6.0)]
LABELS = np.array([p[:3] for p in PLANTED], dtype=np.int64)


def patch_geometry(h: int, x: int, y: int) -> tuple[int, int, int]:
    scale = h / 32
    return int(y * scale), int(x * scale), max(1, int(2 * scale))


def build_store(path: Path, *, constant_norm: bool, seed: int = 0) -> ReprStore:
    """Tokens of norm exactly 1 (signed one-hot, exact in float16) or of random norm in [0.8, 1.2];
    planted patches get norm = amplitude x base at the rescaled position in every layer."""
    rng = np.random.default_rng(seed)
    data = {}
    for layer, h in SIZES.items():
        if constant_norm:
            x = np.zeros((N_IMG, h, h, C))
            k = rng.integers(0, C, size=(N_IMG, h, h))
            np.put_along_axis(x, k[..., None], rng.choice([-1.0, 1.0], size=(N_IMG, h, h, 1)), axis=-1)
        else:
            x = rng.standard_normal((N_IMG, h, h, C))
            x *= (rng.uniform(0.8, 1.2, size=(N_IMG, h, h)) / np.linalg.norm(x, axis=-1))[..., None]
        for img, px, py, amp in PLANTED:
            r0, c0, k = patch_geometry(h, px, py)
            x[img, r0:r0 + k, c0:c0 + k] *= amp
        data[layer] = x.transpose(0, 3, 1, 2).astype(np.float16)
    w = StoreWriter(path, layers=list(SIZES), image_ids=[f"i{i}" for i in range(N_IMG)], labels=None,
                    config={"p": str(path)}, layer_indices=[16, 24, 30, 37], attrs={"image_size": 512})
    w.write_batch(0, data)
    w.finalize()
    return ReprStore(path)


@pytest.fixture(scope="module")
def exact_store(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("anom") / "exact.zarr", constant_norm=True)


@pytest.fixture(scope="module")
def noisy_store(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("anom") / "noisy.zarr", constant_norm=False, seed=3)


def expected_rel_norms(h: int, corrected: bool) -> np.ndarray:
    """By hand: every token has norm 1 except the planted patches (k x k tokens of norm = amplitude)."""
    hw = h * h
    out = []
    for img, _, _, amp in PLANTED:
        k = patch_geometry(h, 0, 0)[2]
        patches = [a for (i, _, _, a) in PLANTED if i == img]
        total = sum(k * k * a for a in patches) + (hw - len(patches) * k * k)
        if corrected:
            out.append(amp / ((total - k * k * amp) / (hw - k * k)))
        else:
            out.append(amp / (total / hw))
    return np.array(out)


@pytest.mark.parametrize("mode", ["paper", "corrected"])
def test_relative_norms_match_hand_computation(exact_store, mode):
    df = relative_norms(exact_store, LABELS, mode=mode, model_name="syn", label_source="planted", chunk_images=3)
    assert list(df.columns) == RELNORM_COLUMNS + ["n_images", "n_images_with_anomalies", "rel_norm_ci_low",
                                                  "rel_norm_ci_high"]
    assert (df.n_images == exact_store.n_images).all()
    assert (df.n_images_with_anomalies == len(np.unique(LABELS[:, 0]))).all()
    assert list(df.layer) == list(SIZES) and list(df.layer_index) == [16, 24, 30, 37]
    assert (df.label_source == "planted").all() and (df.model == "syn").all()
    for _, row in df.iterrows():
        exp = expected_rel_norms(row.spatial, corrected=(mode == "corrected"))
        assert row.n_anomalies == len(PLANTED)
        assert row.rel_norm_mean == pytest.approx(exp.mean(), rel=1e-5)
        assert row.rel_norm_std == pytest.approx(exp.std(ddof=0), rel=1e-4)
    if mode == "paper":  # spot value: 32x32, one 2x2 patch of norm 5 -> 5 / ((4*5 + 1020) / 1024)
        r = df[df.layer == REF].iloc[0]
        assert expected_rel_norms(32, False)[0] == pytest.approx(5 / (1040 / 1024))
        assert r.rel_norm_mean > 4


@pytest.mark.parametrize("mode", ["paper", "corrected"])
def test_rel_norm_interval_is_the_bootstrap_over_images(exact_store, mode):
    """An image brings all its labels: the interval equals a plain loop over resampled images."""
    from diffaudit.analyses.bootstrap import Bootstrap

    boot = Bootstrap(n_resamples=300, level=0.9, seed=2)
    df = relative_norms(exact_store, LABELS, mode=mode, chunk_images=4, bootstrap=boot)
    assert (df.rel_norm_ci_low <= df.rel_norm_mean).all() and (df.rel_norm_mean <= df.rel_norm_ci_high).all()
    assert (df.rel_norm_ci_high > df.rel_norm_ci_low).all()
    draws = np.random.default_rng(2).integers(0, N_IMG, size=(300, N_IMG))
    for _, row in df.iterrows():
        exp = expected_rel_norms(row.spatial, corrected=(mode == "corrected"))
        by_image = {i: exp[LABELS[:, 0] == i] for i in np.unique(LABELS[:, 0])}
        means = []
        for d in draws:
            v = np.concatenate([by_image.get(int(i), []) for i in d])
            if v.size:
                means.append(v.mean())
        lo, hi = np.quantile(means, [0.05, 0.95])
        assert (row.rel_norm_ci_low, row.rel_norm_ci_high) == pytest.approx((lo, hi), rel=1e-4)
    same = relative_norms(exact_store, LABELS, mode=mode, chunk_images=7, bootstrap=boot)
    np.testing.assert_array_equal(same.rel_norm_ci_low, df.rel_norm_ci_low)  # reproducible, chunking aside


def test_relative_norms_unlabelled_layer_and_ref_grid(exact_store):
    # no anomalies at all: NaN statistics and intervals, zero count
    df = relative_norms(exact_store, np.zeros((0, 3), dtype=np.int64), layers=[REF])
    assert df.n_anomalies.tolist() == [0] and np.isnan(df.rel_norm_mean.iloc[0])
    assert df[["rel_norm_ci_low", "rel_norm_ci_high"]].isna().all().all()
    # a label outside the store's images is rejected
    with pytest.raises(LabelFileError, match="out of range"):
        relative_norms(exact_store, np.array([[N_IMG, 0, 0]]))
    with pytest.raises(ValueError, match="mode"):
        relative_norms(exact_store, LABELS, mode="bogus")
    assert an.reference_grid(exact_store) == 32
    assert an.reference_grid(exact_store, ref_layer="not_there") == 512 // 16


def test_detector_finds_exactly_the_planted_patches(exact_store, noisy_store):
    for store in (exact_store, noisy_store):
        det = detect_anomalies(store, chunk_images=6)
        assert det.dtype == np.int64 and det.shape[1] == 3
        pr = precision_recall(det, LABELS)
        assert pr["precision"] == 1.0 and pr["recall"] == 1.0 and pr["f1"] == 1.0
        assert pr["n_detected"] == pr["n_reference"] == pr["n_matched"] == len(PLANTED)
        np.testing.assert_array_equal(det, LABELS[np.lexsort((LABELS[:, 2], LABELS[:, 1], LABELS[:, 0]))])
    # a threshold above every planted amplitude finds nothing
    assert detect_anomalies(noisy_store, threshold=50).shape == (0, 3)


def test_precision_recall_arithmetic():
    ref = np.array([[0, 0, 0], [1, 2, 2], [3, 4, 4]])
    det = np.array([[0, 0, 0], [1, 2, 4]])
    pr = precision_recall(det, ref)
    assert (pr["precision"], pr["recall"]) == (0.5, pytest.approx(1 / 3))
    assert pr["f1"] == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    assert pr["n_matched"] == 1
    empty = precision_recall(np.zeros((0, 3)), ref)
    assert np.isnan(empty["precision"]) and empty["recall"] == 0.0


# -- label files --------------------------------------------------------------------------------

def test_load_label_file_validation(tmp_path):
    good = tmp_path / "good.npy"
    np.save(good, LABELS)
    np.testing.assert_array_equal(load_label_file(good, n_images=N_IMG), LABELS)
    cases = {
        "shape.npy": (np.zeros((4, 2), dtype=np.int64), "shape"),
        "float.npy": (LABELS.astype(np.float64), "integer"),
        "odd.npy": (np.array([[0, 3, 2]]), "odd"),
        "range.npy": (np.array([[0, 32, 2]]), "outside"),
        "neg.npy": (np.array([[0, -2, 2]]), "outside"),
        "obj.npy": (np.array([[0, 0, 0]], dtype=object), "numeric"),
    }
    for name, (arr, msg) in cases.items():
        p = tmp_path / name
        np.save(p, arr, allow_pickle=True)
        with pytest.raises(LabelFileError, match=msg) as e:
            load_label_file(p)
        assert name in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(LabelFileError, match="out of range"):
        load_label_file(good, n_images=5)
    txt = tmp_path / "labels.txt"
    txt.write_text("0 0 0\n")
    with pytest.raises(LabelFileError, match=".npy"):
        load_label_file(txt)
    with pytest.raises(LabelFileError, match="does not exist"):
        load_label_file(tmp_path / "missing.npy")


def test_paper_labels_load_from_the_reference_copies():
    ref = shared_reference() / "paper-data"
    if not ref.is_dir():
        pytest.skip("reference label copies not available")
    for model in ("sd15", "sd21", "sdturbo"):
        assert load_label_file(ref / f"high_norm_anomalies_{model}.npy", n_images=500).shape[1] == 3


def test_auto_reference_layer_is_the_one_with_the_strongest_outliers(tmp_path):
    """`ref_layer: auto`: the layer whose largest 2x2 block stands out most against the median token norm; latent-space
    maps with few channels (conv_out's 4) are no candidates even with larger outliers."""
    rng = np.random.default_rng(0)
    shapes = {"plain": (64, 8), "planted": (64, 8), "weak": (64, 8), "conv_out": (4, 8), "odd": (64, 7)}
    data = {}
    for layer, (c, h) in shapes.items():
        x = rng.standard_normal((6, c, h, h))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        if layer in ("planted", "weak", "conv_out", "odd"):
            x[:, :, 2:4, 4:6] *= {"planted": 5.0, "weak": 2.5, "conv_out": 50.0, "odd": 80.0}[layer]
        data[layer] = x.astype(np.float16)
    w = StoreWriter(tmp_path / "s.zarr", layers=list(shapes), image_ids=[f"i{i}" for i in range(6)], labels=None,
                    config={}, layer_indices=list(range(5)), attrs={"image_size": 64})
    w.write_batch(0, data)
    w.finalize()
    store = ReprStore(tmp_path / "s.zarr")
    assert an.strongest_outlier_layer(store) == "planted"
    found = detect_anomalies(store, layer="planted")
    assert {tuple(r[1:]) for r in found} == {(4, 2)} and len(found) == 6
