"""Qualitative figures on a small synthetic store + dataset: files, similarity maps, anomaly boxes, PCA, fallbacks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffaudit.datasets import build_folder
from diffaudit.figures import qualitative as q
from diffaudit.store import ReprStore, StoreWriter

REF = "up_blocks[1].upsamplers[0]"
MID = "mid_block.attentions[0]"
SIZES = {MID: 8, REF: 32}
N_IMG, C = 5, 16
PLANT = (2, 20, 10)  # (image, x=col, y=row): a 2x2 high-norm patch on the 32x32 grid


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("qual")
    src = root / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N_IMG):
        arr = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        Image.fromarray(arr).resize((128, 128), Image.NEAREST).save(src / f"im_{i}.png")
    dataset = build_folder(src, root / "dataset", size=128)

    data = {}
    for layer, h in SIZES.items():
        x = rng.standard_normal((N_IMG, C, h, h))
        x /= np.linalg.norm(x, axis=1, keepdims=True)  # unit-norm tokens
        x *= rng.uniform(0.9, 1.1, size=(N_IMG, 1, h, h))
        if layer == REF:
            img, px, py = PLANT
            x[img, :, py:py + 2, px:px + 2] *= 6.0
        data[layer] = x.astype(np.float16)
    w = StoreWriter(root / "full.zarr", layers=list(SIZES), image_ids=[f"{i:06d}" for i in range(N_IMG)],
                    labels=None, config={"t": "qual"}, layer_indices=[19, 30],
                    attrs={"image_size": 512, "model": "synthetic", "timestep": 50, "variant": "full"})
    w.write_batch(0, data)
    w.finalize()
    return ReprStore(root / "full.zarr"), dataset, root / "out"


def _check_files(out: q.FigureOutput, stem: Path):
    assert out.png == Path(f"{stem}.png") and out.svg == Path(f"{stem}.svg")
    assert out.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in out.svg.read_bytes()[:2000]
    with Image.open(out.png) as im:
        assert min(im.size) > 300


# ---------------------------------------------------------------------------------------------- helpers

def test_token_similarity_map_self_is_one_and_signs():
    rng = np.random.default_rng(1)
    reps = rng.standard_normal((3, 6, 5, 4)).astype(np.float32)
    sim = q.token_similarity_map(reps, reps[1][:, 2, 3])
    assert sim.shape == (3, 5, 4)
    assert sim[1, 2, 3] == pytest.approx(1.0, abs=1e-6)
    assert np.all(sim <= 1.0) and np.all(sim >= -1.0)
    # brute-force cosine for another token
    v, r = reps[0][:, 4, 1], reps[1][:, 2, 3]
    assert sim[0, 4, 1] == pytest.approx(float(v @ r / np.linalg.norm(v) / np.linalg.norm(r)), abs=1e-5)
    # opposite vector -> -1, zero token -> 0
    reps[2][:, 0, 0] = -reps[1][:, 2, 3]
    reps[2][:, 0, 1] = 0
    sim = q.token_similarity_map(reps[2], reps[1][:, 2, 3])
    assert sim[0, 0] == pytest.approx(-1.0, abs=1e-6) and sim[0, 1] == 0.0


def test_similarity_overlay_colours():
    rgba = q.similarity_overlay(np.array([[0.5, -0.25, 0.0]]))
    assert tuple(rgba[0, 0, :3]) == pytest.approx(q.ORANGE) and rgba[0, 0, 3] == pytest.approx(0.5)
    assert tuple(rgba[0, 1, :3]) == pytest.approx(q.BLUE) and rgba[0, 1, 3] == pytest.approx(0.25)
    assert rgba[0, 2, 3] == 0.0


def test_pca_rgb_range_shape_and_structure():
    rng = np.random.default_rng(2)
    h = w = 6
    rep = rng.standard_normal((8, h, w)).astype(np.float32) * 0.01
    rep[0] += np.arange(w, dtype=np.float32)[None, :] * 10  # dominant direction = column position
    rgb, ratio = q.pca_rgb(rep)
    assert rgb.shape == (h, w, 3)
    assert rgb.min() >= 0.0 and rgb.max() <= 1.0
    assert ratio[0] > 0.99
    pc1 = rgb[..., 0].mean(axis=0)  # sign fixed: channel 0 has the largest loading, positive
    assert np.all(np.diff(pc1) > 0)
    batch, _ = q.pca_rgb(np.stack([rep, rep]))
    assert batch.shape == (2, h, w, 3)


def test_norm_map_and_anomaly_boxes():
    rep = np.ones((4, 3, 3), np.float32)
    rep[:, 1, 2] = 3.0
    nm = q.norm_map(rep)
    assert nm.max() == pytest.approx(1.0) and nm[0, 0] == pytest.approx(1 / 3)
    boxes = q.anomaly_boxes(np.array([[2, 20, 10], [2, 0, 30]]), 32, 8)
    assert boxes == {2: [(2, 5, 1), (7, 0, 1)]}
    assert q.anomaly_boxes(np.array([[0, 4, 6]]), 32, 64) == {0: [(12, 8, 4)]}


def test_sd_downsampling():
    assert q.sd_downsampling("conv_in") == 8
    assert q.sd_downsampling("mid_block.attentions[0]") == 64
    assert q.sd_downsampling(REF) == 16
    assert q.sd_downsampling("up_blocks[1].attentions[0]") == 32
    assert q.sd_downsampling("down_blocks[0].downsamplers[0]") == 16
    assert q.sd_downsampling("up_blocks[0]") == 32
    assert q.sd_downsampling("foo") is None


# ---------------------------------------------------------------------------------------------- figures

def test_token_similarity_figure(setup):
    store, dataset, out = setup
    stem = out / "sim"
    res = q.plot_token_similarity(store, dataset, stem, layer=REF, ref_image=1, ref_token=(3, 7), images=(0, 2))
    _check_files(res, stem)
    assert res.layer == REF and res.note == "" and res.images == [1, 0, 2]
    sim = res.data["similarity"]
    assert sim.shape == (3, 32, 32)
    assert sim[0, 3, 7] == pytest.approx(1.0, abs=1e-3)
    ref = np.asarray(store.array(REF)[1], np.float32)[:, 3, 7]
    np.testing.assert_allclose(sim[2], q.token_similarity_map(np.asarray(store.array(REF)[2], np.float32), ref),
                               atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        q.plot_token_similarity(store, dataset, out / "bad", layer=REF, ref_token=(32, 0))


def test_figures_are_deterministic(setup):
    store, dataset, out = setup
    a = q.plot_pca_rgb(store, dataset, out / "det_a", layer=MID, images=(0, 1))
    b = q.plot_pca_rgb(store, dataset, out / "det_b", layer=MID, images=(0, 1))
    assert a.svg.read_bytes() == b.svg.read_bytes()
    assert a.png.read_bytes() == b.png.read_bytes()


def test_corner_similarity_defaults(setup):
    store, dataset, out = setup
    res = q.plot_corner_similarity(store, dataset, out / "corner")
    _check_files(res, out / "corner")
    assert res.layer == MID and res.data["ref_token"] == (0, 7)
    assert res.data["similarity"][0, 0, 7] == pytest.approx(1.0, abs=1e-3)


def test_norm_maps_detector_marks_planted_patch(setup):
    store, dataset, out = setup
    res = q.plot_norm_maps(store, dataset, out / "norms")
    _check_files(res, out / "norms")
    img, px, py = PLANT
    assert res.data["source"] == "detector"
    assert res.data["all_boxes"] == {img: [(py, px, 2)]}
    assert res.images[0] == img and len(res.images) == 2  # most anomalies first, then one clean image
    assert res.images[1] != img and res.data["boxes"][res.images[1]] == []
    nm = res.data["norms"][0]
    assert nm.max() == pytest.approx(1.0)
    assert nm[py:py + 2, px:px + 2].min() > 3 * np.median(nm)


def test_norm_maps_with_labels_rescaled(setup):
    store, dataset, out = setup
    labels = np.array([[2, 20, 10], [4, 0, 0]])
    res = q.plot_norm_maps(store, dataset, out / "norms_lab", layer=MID, labels=labels, images=(2, 3, 4))
    _check_files(res, out / "norms_lab")
    assert res.data["source"] == "labels"
    assert res.data["boxes"] == {2: [(2, 5, 1)], 3: [], 4: [(0, 0, 1)]}
    with pytest.raises(ValueError, match="odd"):
        q.plot_norm_maps(store, dataset, out / "bad", labels=np.array([[0, 1, 0]]))


def test_pca_figure(setup):
    store, dataset, out = setup
    res = q.plot_pca_rgb(store, dataset, out / "pca", layer=REF, images=(0, 1, 2))
    _check_files(res, out / "pca")
    rgb = res.data["rgb"]
    assert rgb.shape == (3, 32, 32, 3) and rgb.min() >= 0 and rgb.max() <= 1


def test_missing_layer_fallback_and_error(setup):
    store, dataset, out = setup
    # mid_block.resnets[1] is 8x8 at 512 px -> the stored mid_block.attentions[0], said in the title/note
    res = q.plot_token_similarity(store, dataset, out / "fallback", layer="mid_block.resnets[1]", images=(0,))
    assert res.layer == MID and "mid_block.resnets[1] not in store" in res.note
    assert "mid_block.resnets[1] not in store" in res.svg.read_text()
    # 16x16 layer at 512 px: nothing of that resolution is stored
    with pytest.raises(q.LayerNotAvailableError, match="16x16"):
        q.plot_pca_rgb(store, dataset, out / "none", layer="up_blocks[1].attentions[0]")
    with pytest.raises(q.LayerNotAvailableError, match="resolution is unknown"):
        q.plot_pca_rgb(store, dataset, out / "none", layer="not_a_layer")
    assert not (out / "none.png").exists()
