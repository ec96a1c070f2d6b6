"""Harm-task pairs (diffaudit.harm.pairs): the written images are the promised transforms, the token ground truth
agrees with the pixels, and the stereo disparity really maps the left image onto the right one."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from diffaudit.datasets import DatasetError, build_demo, load_index
from diffaudit.harm import pairs as P

SIZE = 64


@pytest.fixture(scope="module")
def run_dataset(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("run") / "dataset", n_images=4, size=SIZE)


def _img(root, index, k) -> np.ndarray:
    return np.asarray(Image.open(root / index["file"].iloc[k]), dtype=np.float64)


def _tokens(img: np.ndarray, grid: int) -> np.ndarray:
    """Mean colour of each token, (grid*grid, 3) in row-major order."""
    t = img.shape[0] // grid
    return img.reshape(grid, t, grid, t, -1).mean(axis=(1, 3)).reshape(grid * grid, -1)


def _sample_right(right: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """``right`` at rows ``ys`` and fractional columns ``xs``, linearly interpolated along x."""
    x0 = np.floor(xs).astype(int)
    x1 = np.minimum(x0 + 1, right.shape[1] - 1)
    f = (xs - x0)[:, None]
    return right[ys, x0] * (1 - f) + right[ys, x1] * f


def test_flip_and_shift_images_and_tables(run_dataset, tmp_path):
    out = P.build_pairs(run_dataset, tmp_path / "pairs", tasks=("shift", "flip"), images=[2, 0], shift=0.25)
    s = P.shift_pixels(0.25, SIZE)
    assert s == 16
    df, disparity = P.load_pairs(out)
    assert disparity is None and not (out / P.DISPARITY_FILE).exists()
    run_index, index = load_index(run_dataset), load_index(out)
    assert list(df["pair"]) == list(range(len(df))) and list(df["task"]) == ["flip", "flip", "shift", "shift"]
    written = set(df["target_index"]) | set(df.loc[df.task == "shift", "source_index"])
    assert len(index) == 6 and written == set(range(6))
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["config"]["tasks"] == ["flip", "shift"] and meta["config"]["shift_px"] == s
    assert meta["config"]["images"] == [2, 0] and meta["size"] == SIZE
    for _, row in df.iterrows():
        src_row = run_index.iloc[int(row.source_index)] if row.source_store == "base" else None
        tgt = _img(out, index, int(row.target_index))
        if row.task == "flip":
            assert row.source_store == "base" and row.shift_px == 0
            assert row.source_image == src_row["id"]
            assert index["source"].iloc[row.target_index] == f"flip:{row.source_image}"
            assert index["label"].iloc[row.target_index] == src_row["label"]
            src = _img(run_dataset, run_index, int(row.source_index))
            np.testing.assert_array_equal(tgt, src[:, ::-1])
            assert not np.array_equal(tgt, src)
        else:
            assert row.source_store == "pairs" and row.shift_px == s
            assert index["source"].iloc[row.source_index] == f"shiftA:{row.source_image}"
            assert index["source"].iloc[row.target_index] == f"shiftB:{row.source_image}"
            orig = run_index.loc[run_index["id"] == row.source_image].iloc[0]
            assert index["label"].iloc[row.target_index] == orig["label"]
            a = _img(out, index, int(row.source_index))
            # B (y, x) is A (y + s, x + s) wherever both exist, and not A (y, x)
            np.testing.assert_array_equal(tgt[: SIZE - s, : SIZE - s], a[s:, s:])
            assert np.abs(tgt - a).mean() > 5
            # A is the original image enlarged by (SIZE + s) / SIZE: close to it after resizing back
            orig_img = _img(run_dataset, run_index, int(orig.name))
            back = np.asarray(Image.fromarray(a.astype(np.uint8)).resize(
                (SIZE - s * SIZE // (SIZE + s),) * 2, Image.Resampling.BICUBIC), dtype=np.float64)
            assert np.abs(back - orig_img[: back.shape[0], : back.shape[1]]).mean() < 20
            for grid in (4, 8, 16, 32):
                target, valid, note = P.ground_truth(row.to_dict(), grid, SIZE)
                k = s // (SIZE // grid)
                assert note == "" and valid.sum() == (grid - k) ** 2
                ta, tb = _tokens(a, grid), _tokens(tgt, grid)
                flat = target[valid, 0] * grid + target[valid, 1]
                np.testing.assert_allclose(ta[valid], tb[flat])  # the mapped tokens hold the same pixels
                assert (target[~valid] == -1).all()
                if k:  # the identity is not the answer
                    assert np.abs(ta[valid] - tb[np.flatnonzero(valid)]).mean() > 1
            target, valid, note = P.ground_truth(row, 8, SIZE)  # a pandas row works too
            assert valid.any()
    flip_row = df[df.task == "flip"].iloc[0]
    src = _img(run_dataset, run_index, int(flip_row.source_index))
    tgt = _img(out, index, int(flip_row.target_index))
    for grid in (4, 8, 16):
        target, valid, note = P.ground_truth(flip_row, grid, SIZE)
        assert valid.all() and note == ""
        np.testing.assert_allclose(_tokens(src, grid), _tokens(tgt, grid)[target[:, 0] * grid + target[:, 1]])


def test_shift_not_a_whole_number_of_tokens():
    row = {"task": "shift", "shift_px": 12}
    for grid in (4, 8):  # 16 and 8 px tokens
        target, valid, note = P.ground_truth(row, grid, SIZE)
        assert not valid.any() and (target == -1).all() and "not a whole number" in note
    target, valid, note = P.ground_truth(row, 16, SIZE)  # 4 px tokens: 3 tokens
    assert note == "" and valid.sum() == 13 ** 2
    assert tuple(target[3 * 16 + 5]) == (0, 2) and not valid[2 * 16 + 5]
    assert target.dtype == np.int64 and target.shape == (256, 2) and valid.dtype == bool


@pytest.mark.parametrize("size", [128, 256])
def test_stereo_disparity_reprojects_left_onto_right(tmp_path, size):
    run = build_demo(tmp_path / "run", n_images=1, size=size)
    out = P.build_pairs(run, tmp_path / "pairs", tasks=["stereo"], images=[])
    df, d = P.load_pairs(out)
    index = load_index(out)
    assert list(df["task"]) == ["stereo"] and df["source_image"].iloc[0] == ""
    assert list(index["source"]) == ["stereo:left", "stereo:right"] and list(index["label"]) == [-1, -1]
    assert d.dtype == np.float32 and d.shape == (size, size)
    meta = json.loads((out / "dataset.json").read_text())["config"]["stereo"]
    import hashlib
    assert meta["disparity_sha256"] == hashlib.sha256((out / P.DISPARITY_FILE).read_bytes()).hexdigest()
    assert "Motorcycle" in meta["pair"] and meta["scikit-image"]
    left, right = _img(out, index, 0), _img(out, index, 1)
    ok = np.isfinite(d)
    assert ok.mean() > 0.7
    ys, xs = np.nonzero(ok)
    xt = xs - d[ok].astype(np.float64)
    assert xt.min() >= 0 and xt.max() < size

    def err(x):
        keep = (x >= 0) & (x < size)
        return np.abs(_sample_right(right, np.clip(x, 0, size - 1), ys) - left[ys, xs])[keep].mean()

    good, zero, wrong = err(xt), err(xs.astype(np.float64)), err(xs + d[ok].astype(np.float64))
    assert good < 12 and zero > 2 * good and wrong > 2 * good, (good, zero, wrong)


def test_stereo_tokens(tmp_path):
    size = 256
    run = build_demo(tmp_path / "run", n_images=1, size=size)
    df, d = P.load_pairs(P.build_pairs(run, tmp_path / "pairs", tasks="stereo", images=[]))
    index = load_index(tmp_path / "pairs")
    left, right = _img(tmp_path / "pairs", index, 0), _img(tmp_path / "pairs", index, 1)
    row = df.iloc[0]
    with pytest.raises(ValueError, match="disparity"):
        P.ground_truth(row, 8, size)
    for grid in (8, 16, 32):
        target, valid, note = P.ground_truth(row, grid, size, d)
        assert note == "" and valid.mean() > 0.6
        assert (target[valid] >= 0).all() and (target[valid] < grid).all()
        assert (target[valid, 0] == np.flatnonzero(valid) // grid).all()  # same row: the pair is rectified
        assert (target[~valid] == -1).all()
        # the matched right tokens look more like their left tokens than the tokens at the same place do
        tl, tr = _tokens(left, grid), _tokens(right, grid)
        matched = np.abs(tl[valid] - tr[target[valid, 0] * grid + target[valid, 1]]).mean()
        same = np.abs(tl[valid] - tr[np.flatnonzero(valid)]).mean()
        assert matched < 0.8 * same, (grid, matched, same)
    blank = np.full_like(d, np.nan)
    target, valid, note = P.ground_truth(row, 8, size, blank)
    assert not valid.any() and "valid disparity" in note


def test_stereo_token_rule_on_a_planted_disparity():
    size, grid = 32, 4  # 8 px tokens
    d = np.full((size, size), 8.0, dtype=np.float32)  # one token to the left
    d[:8, 16:24] = np.nan  # token (0, 2): nothing valid -> invalid
    d[:4, 24:32] = np.nan  # token (0, 3): exactly half valid -> valid
    d[:5, 8:16] = np.nan  # token (0, 1): 24 of 64 valid -> invalid
    d[8:16, 16:24] = 20.0  # token (1, 2): mean x - d = 19.5 - 20 = -0.5 -> column -1 -> invalid
    d[16:24, 24:32] = np.linspace(12.0, 20.0, 8, dtype=np.float32)  # mean x - d = 27.5 - 16 = 11.5 -> column 1
    target, valid, note = P.ground_truth({"task": "stereo"}, grid, size, d)
    want = {(0, 0): None, (3, 0): None, (0, 1): None, (0, 2): None, (0, 3): (0, 2), (1, 2): None,
            (2, 3): (2, 1), (3, 2): (3, 1), (1, 1): (1, 0)}
    for (y, x), t in want.items():
        if t is None:
            assert not valid[y * grid + x] and tuple(target[y * grid + x]) == (-1, -1), (y, x)
        else:
            assert valid[y * grid + x] and tuple(target[y * grid + x]) == t, (y, x)
    assert note == "" and valid.sum() == 16 - 4 - 3  # column 0 maps outside the image
    with pytest.raises(ValueError, match="expected"):
        P.ground_truth({"task": "stereo"}, grid, size, d[:16])


def test_errors_leave_nothing_behind(run_dataset, tmp_path, monkeypatch):
    out = tmp_path / "pairs"
    bad = [dict(tasks=("flip", "warp"), images=[0]), dict(images=[0, 4]), dict(images=[-1]),
           dict(tasks=("flip",), images=[]), dict(tasks=("shift",), images=[0], shift=0.0),
           dict(tasks=("shift",), images=[0], shift=1.0), dict(images=[1, 1])]
    for kwargs in bad:
        with pytest.raises(DatasetError) as err:
            P.build_pairs(run_dataset, out, **kwargs)
        assert "\n" not in str(err.value)
        assert not out.exists() and not out.with_name("pairs.tmp").exists()
    with pytest.raises(DatasetError, match="unknown harm task"):
        P.ground_truth({"task": "warp", "shift_px": 0}, 4, SIZE)
    # a build that fails midway keeps the previous complete directory and removes its temporary one
    P.build_pairs(run_dataset, out, tasks=("flip",), images=[0])
    before = sorted(p.name for p in out.rglob("*"))

    def boom(size):
        raise DatasetError("stereo pair unavailable")

    monkeypatch.setattr(P, "_stereo_pair", boom)
    with pytest.raises(DatasetError, match="stereo pair unavailable"):
        P.build_pairs(run_dataset, out, images=[1, 2])
    assert sorted(p.name for p in out.rglob("*")) == before and not out.with_name("pairs.tmp").exists()
    assert list(pd.read_csv(out / P.PAIRS_TABLE)["task"]) == ["flip"]
