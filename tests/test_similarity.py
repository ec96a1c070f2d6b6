"""Token-group similarity: group-sum algorithm vs brute force, count quirk vs published numbers, store API.

The brute-force reference is written here, independently of the module under test: plain numpy token x token
cosine matrices per image, the groups as explicit token lists, the counts from the method's definition."""
from __future__ import annotations


import numpy as np
import pandas as pd
import pytest

from diffaudit.analyses.similarity import (
    COLUMNS,
    GROUPS,
    GroupSimilarityAccumulator,
    group_similarity_matrix,
    group_sums,
    pair_counts,
    similarity_from_sums,
    token_group_similarity,
)
from conftest import shared_reference
from diffaudit.store import ReprStore, StoreWriter

REFERENCE = shared_reference()


# ---------------------------------------------------------------------------------------------
# brute-force reference (plain numpy; shares nothing with diffaudit.analyses.similarity)
# ---------------------------------------------------------------------------------------------

def _ref_groups(m: int) -> list[np.ndarray]:
    """Flat token indices on an m x m grid: the 4 corners, the 4 edge strips without corners, the interior."""
    corner, border, other = [], [], []
    for r in range(m):
        for c in range(m):
            edges = (r in (0, m - 1)) + (c in (0, m - 1))
            (corner if edges == 2 else border if edges == 1 else other).append(r * m + c)
    return [np.array(g) for g in (corner, border, other)]


def _ref_cosines(maps) -> np.ndarray:
    """(N, C, s, s) -> (N, s*s, s*s) float64 token x token cosine matrices; a zero token has cosine 0 with all."""
    x = np.asarray(maps, dtype=np.float64)
    tokens = x.reshape(x.shape[0], x.shape[1], -1).transpose(0, 2, 1)  # (N, T, C)
    norm = np.sqrt((tokens ** 2).sum(-1, keepdims=True))
    unit = tokens / np.maximum(norm, 1e-12)
    return unit @ unit.transpose(0, 2, 1)


def brute_force_group_similarity(maps, count_quirk: bool = True, n: int | None = None) -> np.ndarray:
    """3x3 R[i, j] = (sum of cos over ordered token pairs of groups i x j, all images - self) / (pairs - self).

    Corrected counts (``count_quirk=False``): exactly the off-diagonal pairs of the m-grid, the self pairs' actual
    cosines removed. The authors' counts (``count_quirk=True``): pair and self counts of the groups on the full
    n-grid (n = m + 2 unless given), self cosines taken as 1.
    """
    sim = _ref_cosines(maps)
    nimg, m = sim.shape[0], int(round(np.sqrt(sim.shape[1])))
    groups = _ref_groups(m)
    size = (m + 2 if n is None else int(n)) if count_quirk else m
    k = [len(g) for g in _ref_groups(size)] if count_quirk else [len(g) for g in groups]
    r = np.full((3, 3), np.nan)
    for i, gi in enumerate(groups):
        for j, gj in enumerate(groups):
            total = sim[:, gi][:, :, gj].sum()
            count = k[i] * k[j] * nimg
            if i != j:
                self_count, subtract = 0, 0.0
            elif count_quirk:
                self_count = subtract = k[i] * nimg
            else:
                self_count, subtract = k[i] * nimg, sim[:, gi, gi].sum()
            if count != self_count:
                r[i, j] = (total - subtract) / (count - self_count)
    return r


def brute_force_token_group_similarity(full_maps, crop_maps, count_quirk: bool = True) -> dict[str, np.ndarray]:
    """R of the cropped image's maps and of the full image's maps with the outer token ring removed."""
    n = np.asarray(full_maps).shape[-1]
    assert np.asarray(crop_maps).shape[-1] == n - 2
    return {"cropped_image": brute_force_group_similarity(crop_maps, count_quirk, n),
            "full_image_ring_removed": brute_force_group_similarity(np.asarray(full_maps)[..., 1:-1, 1:-1],
                                                                    count_quirk, n)}


def test_reference_groups_and_counts():
    assert [len(g) for g in _ref_groups(6)] == [4, 16, 16]
    assert list(_ref_groups(3)[0]) == [0, 2, 6, 8] and list(_ref_groups(3)[2]) == [4]
    # one image of identical tokens: every cosine is 1, so R = 1 wherever pairs exist (corrected counts)
    x = np.ones((1, 3, 5, 5))
    np.testing.assert_allclose(brute_force_group_similarity(x, count_quirk=False), 1.0)


@pytest.mark.parametrize("count_quirk", [True, False])
def test_module_brute_force_matches_the_reference(count_quirk):
    """The module's own brute force (used by its benchmarks) agrees with the independent reference."""
    from diffaudit.analyses import similarity as sim

    rng = np.random.default_rng(21)
    full = (rng.normal(size=(3, 6, 8, 8)) + 0.3).astype(np.float32)
    crop = (rng.normal(size=(3, 6, 6, 6)) + 0.3).astype(np.float32)
    np.testing.assert_allclose(sim.brute_force_group_similarity(crop, count_quirk),
                               brute_force_group_similarity(crop, count_quirk), atol=1e-6)
    ours, ref = (sim.brute_force_token_group_similarity(full, crop, count_quirk),
                 brute_force_token_group_similarity(full, crop, count_quirk))
    for k in ref:
        np.testing.assert_allclose(ours[k], ref[k], atol=1e-6)


def _fast_matrix(x, count_quirk, n=None):
    acc = GroupSimilarityAccumulator()
    for i in range(0, len(x), 2):  # several updates: checks the streaming accumulation too
        acc.update(x[i:i + 2])
    return acc.matrix(count_quirk, n)


# ---------------------------------------------------------------------------------------------
# group sums == brute force
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("count_quirk", [True, False])
@pytest.mark.parametrize("m,channels,offset", [(3, 5, 0.0), (4, 7, 0.5), (6, 16, 0.2), (9, 12, 1.0)])
def test_group_sums_equal_brute_force(count_quirk, m, channels, offset):
    rng = np.random.default_rng(m * 100 + channels)
    x = (rng.normal(size=(5, channels, m, m)) + offset).astype(np.float32)
    fast = _fast_matrix(x, count_quirk)
    brute = brute_force_group_similarity(x, count_quirk)
    assert fast.shape == (3, 3)
    np.testing.assert_allclose(fast, brute, rtol=0, atol=1e-6)
    np.testing.assert_allclose(fast, fast.T, atol=1e-12)


@pytest.mark.parametrize("count_quirk", [True, False])
def test_zero_norm_token_matches_brute_force(count_quirk):
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(4, 8, 6, 6)) + 0.5).astype(np.float32)
    x[1, :, 0, 0] = 0.0  # a corner token
    x[2, :, 0, 3] = 0.0  # a border token
    x[3, :, 2, 2] = 0.0  # an interior token
    np.testing.assert_allclose(_fast_matrix(x, count_quirk), brute_force_group_similarity(x, count_quirk),
                               rtol=0, atol=1e-6)
    gs = group_sums(x)
    np.testing.assert_allclose(gs["self"][0], gs["sizes"])  # all tokens non-zero -> |u|^2 = 1
    np.testing.assert_allclose(gs["self"][1], gs["sizes"] - [1, 0, 0])


def test_group_sums_values():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 4, 5, 5)).astype(np.float32)
    gs = group_sums(x)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(gs["corner"], u[:, :, [0, 0, -1, -1], [0, -1, 0, -1]].sum(-1), atol=1e-6)
    border = u[:, :, 0, 1:-1].sum(-1) + u[:, :, -1, 1:-1].sum(-1) + u[:, :, 1:-1, 0].sum(-1) + u[:, :, 1:-1, -1].sum(-1)
    np.testing.assert_allclose(gs["border"], border, atol=1e-6)
    np.testing.assert_allclose(gs["other"], u[:, :, 1:-1, 1:-1].sum((-1, -2)), atol=1e-6)
    assert list(gs["sizes"]) == [4, 12, 9]


def test_quirk_counts():
    # m = 6 (n = 8): true sizes 4, 4(n-4)=16, (n-4)^2=16; the quirk's sizes 4, 4(n-2)=24, (n-2)^2=36
    count, self_count = pair_counts(6, 10, count_quirk=True)
    assert list(self_count) == [40, 240, 360]
    assert count[1, 1] == 24 * 24 * 10 and count[0, 2] == 4 * 36 * 10
    count, self_count = pair_counts(6, 10, count_quirk=False)
    assert list(self_count) == [40, 160, 160]
    assert count[1, 1] == 16 * 16 * 10


# ---------------------------------------------------------------------------------------------
# planted vs neutral data
# ---------------------------------------------------------------------------------------------

def _ratios(full, crop, count_quirk=True):
    n = full.shape[-1]
    rc = _fast_matrix(crop, count_quirk, n)
    rf = _fast_matrix(full[..., 1:-1, 1:-1], count_quirk, n)
    return np.diag(rc) / np.diag(rf)


@pytest.mark.parametrize("count_quirk", [True, False])
def test_planted_corner_similarity(count_quirk):
    rng = np.random.default_rng(11)
    nimg, c, n = 12, 32, 10
    mu = rng.normal(size=(c, 1, 1))
    full = (mu + rng.normal(size=(nimg, c, n, n))).astype(np.float32)
    crop = full[..., 1:-1, 1:-1].copy()
    # neutral: the same content on both sides -> every ratio is 1
    np.testing.assert_allclose(_ratios(full, crop, count_quirk), 1.0, atol=1e-9)
    # planted: a shared vector added to the four corner tokens of the crop map only
    shared = 3.0 * rng.normal(size=c)
    for r, cc in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
        crop[:, :, r, cc] += shared
    corner, border, other = _ratios(full, crop, count_quirk)
    assert corner > 1.5
    np.testing.assert_allclose([border, other], 1.0, atol=1e-9)


def test_iid_noise_gives_ratio_one():
    rng = np.random.default_rng(5)
    nimg, c, n = 40, 64, 12
    mu = rng.normal(size=(c, 1, 1))
    full = (mu + rng.normal(size=(nimg, c, n, n))).astype(np.float32)
    crop = (mu + rng.normal(size=(nimg, c, n - 2, n - 2))).astype(np.float32)
    ratios = _ratios(full, crop, count_quirk=False)
    np.testing.assert_allclose(ratios, 1.0, atol=0.03)


# ---------------------------------------------------------------------------------------------
# count quirk vs the published numbers
# ---------------------------------------------------------------------------------------------

def _corrected_from_published(r_quirk: float, n: int, g: int) -> float:
    """Published paper-mode R[g, g] -> corrected R[g, g] (self-cosines assumed 1, as in the reference)."""
    m = n - 2
    count_q, self_q = pair_counts(m, 1, count_quirk=True)
    pair_sum = r_quirk * (count_q[g, g] - self_q[g]) + self_q[g]  # per-image pair sum incl. diagonal
    count_c, self_c = pair_counts(m, 1, count_quirk=False)
    g_mat = np.zeros((3, 3))
    g_mat[g, g] = pair_sum
    return similarity_from_sums(g_mat, self_c, 1, m, count_quirk=False)[g, g]


@pytest.mark.skipif(not (REFERENCE / "token_group_similarity.csv").exists(), reason="reference CSVs not available")
def test_count_quirk_reproduces_published_correction():
    sims = pd.read_csv(REFERENCE / "token_group_similarity.csv")
    corr = pd.read_csv(REFERENCE / "token_group_border_count_correction.csv")
    d = sims.merge(corr, on=["model", "layer_index", "layer", "spatial"])
    d = d[d.model == "sd15"]
    assert len(d) == 45

    def recompute(row, crop, full, g=1, da=0.0, db=0.0):
        n = int(row.spatial)
        return (_corrected_from_published(row[crop] + da, n, g) / _corrected_from_published(row[full] + db, n, g))

    cols = ("border_sim_cropped_image", "border_sim_full_image_ring_removed")
    for _, row in d.iterrows():
        got = recompute(row, *cols)
        # the raw values are published with 6 decimals: bound the propagated rounding error
        rounding = max(abs(recompute(row, *cols, da=a, db=b) - got) for a in (-5e-7, 5e-7) for b in (-5e-7, 5e-7))
        tol = 1e-4 if row.plotted else 1e-4 + rounding  # conv_out: raw values ~1e-3, rounding dominates
        assert abs(got - row.border_ratio_corrected) <= tol, (row.layer, got, row.border_ratio_corrected)
        # and the paper (quirk) ratio is just the ratio of the published raw values
        assert abs(row[cols[0]] / row[cols[1]] - row.border_ratio_code) <= 1e-4 + rounding

    # the formula is discriminating: without the quirk (count on m) nothing changes, which misses the 8x8 layers
    small = d[d.spatial == 8]
    unchanged = (small.border_sim_cropped_image / small.border_sim_full_image_ring_removed
                 - small.border_ratio_corrected).abs()
    assert unchanged.max() > 1e-3


# ---------------------------------------------------------------------------------------------
# stores end to end
# ---------------------------------------------------------------------------------------------

L8, L16 = "down_blocks[3].resnets[0]", "up_blocks[0].upsamplers[0]"


def _write(path, arrays: dict[str, np.ndarray], n_images: int, shard: int = 3):
    ids = [f"img{i}" for i in range(n_images)]
    w = StoreWriter(path, layers=list(arrays), image_ids=ids, labels=list(range(n_images)),
                    config={"test": str(path)}, shard_images=shard, layer_indices=[16, 23][:len(arrays)])
    for s in range(0, n_images, shard):
        w.write_batch(s, {k: v[s:s + shard] for k, v in arrays.items()})
    w.finalize()
    return ReprStore(path)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sim")
    rng = np.random.default_rng(0)
    nimg = 7
    full8 = (rng.normal(size=(nimg, 12, 8, 8)) + 0.4).astype(np.float16)
    full16 = (rng.normal(size=(nimg, 6, 16, 16)) + 0.4).astype(np.float16)
    crop6 = (rng.normal(size=(nimg, 12, 6, 6)) + 0.4)
    crop6[:, :, [0, 0, -1, -1], [0, -1, 0, -1]] += 2.0 * rng.normal(size=(12, 1))[None]  # planted corners
    crop14 = rng.normal(size=(nimg, 6, 14, 14)) + 0.4
    full = _write(tmp / "full.zarr", {L8: full8, L16: full16}, nimg)
    c16 = _write(tmp / "crop16.zarr", {L8: crop6.astype(np.float16)}, nimg)
    c8 = _write(tmp / "crop8.zarr", {L16: crop14.astype(np.float16)}, nimg)
    return full, {16: c16, 8: c8}


@pytest.mark.parametrize("mode", ["paper", "corrected"])
def test_end_to_end_matches_brute_force(stores, mode):
    full, crops = stores
    df = token_group_similarity(full, crops, mode=mode, image_size=128, chunk_images=4, model_name="toy")
    assert tuple(df.columns) == COLUMNS + ("corner_ratio_ci_low", "corner_ratio_ci_high", "border_ratio_ci_low",
                                           "border_ratio_ci_high")
    assert list(df.layer) == [L8, L16] and list(df.spatial) == [8, 16]
    assert list(df.layer_index) == [16, 23] and list(df.channels) == [12, 6] and set(df.model) == {"toy"}
    for row in df.itertuples():
        t = 128 // row.spatial
        brute = brute_force_token_group_similarity(full.array(row.layer)[:].astype(np.float32),
                                                   crops[t].array(row.layer)[:].astype(np.float32),
                                                   count_quirk=(mode == "paper"))
        for gi, g in enumerate(GROUPS):
            rc = brute["cropped_image"][gi, gi]
            rf = brute["full_image_ring_removed"][gi, gi]
            assert getattr(row, f"{g}_sim_cropped_image") == pytest.approx(rc, abs=1e-6)
            assert getattr(row, f"{g}_sim_full_image_ring_removed") == pytest.approx(rf, abs=1e-6)
            assert getattr(row, f"{g}_ratio") == pytest.approx(rc / rf, rel=1e-5)
    assert df.corner_ratio.iloc[0] > 1.5  # the planted corners of the 8x8 layer's crop store


def test_full_matrices_and_modes(stores):
    full, crops = stores
    paper = group_similarity_matrix(full, crops[16], L8, count_quirk=True, chunk_images=2)
    fixed = group_similarity_matrix(full, crops[16], L8, count_quirk=False, chunk_images=5)
    assert set(paper) == {"cropped_image", "full_image_ring_removed"}
    for k in paper:
        assert paper[k].shape == (3, 3)
        np.testing.assert_allclose(paper[k][0, 0], fixed[k][0, 0], atol=1e-12)  # corner unaffected
        assert abs(paper[k][1, 1] - fixed[k][1, 1]) > 1e-3  # border affected at n = 8


def test_crop_lookup_and_errors(stores):
    full, crops = stores
    # default image_size=512: the 8x8 layer uses crop64, the 16x16 layer crop32; a callable works too
    by_512 = {64: crops[16], 32: crops[8]}
    a = token_group_similarity(full, by_512.__getitem__, chunk_images=3)
    b = token_group_similarity(full, crops, image_size=128, chunk_images=3)
    pd.testing.assert_frame_equal(a, b)
    with pytest.raises(KeyError, match="crop32"):
        token_group_similarity(full, {64: crops[16]}, layers=[L16])
    with pytest.raises(FileNotFoundError, match="crop32"):
        token_group_similarity(full, lambda t: {64: crops[16]}[t], layers=[L16])
    with pytest.raises(KeyError, match="crop64"):  # the crop store lacks the layer
        token_group_similarity(full, {64: crops[8]}, layers=[L8])
    with pytest.raises(ValueError, match="mode"):
        token_group_similarity(full, crops, mode="exact", image_size=128)


# ---------------------------------------------------------------------------------------------
# bootstrap intervals over images
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("count_quirk", [True, False])
def test_per_image_terms_sum_to_the_pooled_diagonal(count_quirk):
    """The bootstrap's per-image numerators and denominators are an exact split of R_ii over images."""
    rng = np.random.default_rng(4)
    x = (rng.normal(size=(7, 6, 8, 8)) + 0.3).astype(np.float32)
    x[2, :, 0, 0] = 0.0  # a zero token: its self-cosine is 0 (corrected mode subtracts the actual diagonal)
    acc = GroupSimilarityAccumulator(ring=True)
    for i in range(0, 7, 3):
        acc.update(x[i:i + 3])
    num, den = acc.per_image_diagonal(count_quirk, 8)
    assert num.shape == den.shape == (7, 3)
    r = acc.matrix(count_quirk, 8)
    np.testing.assert_allclose(num.sum(axis=0) / den.sum(axis=0), np.diag(r), rtol=1e-12)


def _pair_stores(tmp, nimg: int, corner: float, seed: int = 0):
    """Full 10x10 maps and their crop = the ring-removed content, plus (``corner``) one vector shared by all
    images on the crop's four corner tokens: an edge artifact of the corners only."""
    rng = np.random.default_rng(seed)
    c, n = 16, 10
    full = rng.normal(size=(c, 1, 1)) + rng.normal(size=(nimg, c, n, n))
    crop = full[..., 1:-1, 1:-1].copy()
    shared = rng.normal(size=c)
    for r, cc in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
        crop[:, :, r, cc] += corner * (shared + 0.5 * rng.normal(size=(nimg, c)))
    return (_write(tmp / f"full{nimg}.zarr", {L8: full.astype(np.float16)}, nimg),
            {8: _write(tmp / f"crop{nimg}.zarr", {L8: crop.astype(np.float16)}, nimg)})


@pytest.mark.parametrize("mode", ["paper", "corrected"])
def test_planted_corner_artifact_interval_excludes_one(tmp_path, mode):
    from diffaudit.analyses.bootstrap import Bootstrap

    full, crops = _pair_stores(tmp_path, 30, corner=1.5)
    row = token_group_similarity(full, crops, mode=mode, image_size=80, chunk_images=4,
                                 bootstrap=Bootstrap(n_resamples=400)).iloc[0]
    assert row.corner_ratio > 1.25
    assert 1.0 < row.corner_ratio_ci_low <= row.corner_ratio <= row.corner_ratio_ci_high
    # the border tokens are the same on both sides: their ratio is 1 in every resample (float32 group sums)
    assert row.border_ratio_ci_low == pytest.approx(1.0, abs=1e-6) and row.border_ratio_ci_high == pytest.approx(
        1.0, abs=1e-6)


def test_similarity_interval_shrinks_with_images_and_is_reproducible(tmp_path):
    from diffaudit.analyses.bootstrap import Bootstrap

    boot = Bootstrap(n_resamples=400, seed=3)
    widths = {}
    for nimg in (12, 120):
        full, crops = _pair_stores(tmp_path, nimg, corner=0.4, seed=nimg)
        df = token_group_similarity(full, crops, image_size=80, chunk_images=8, bootstrap=boot)
        pd.testing.assert_frame_equal(df, token_group_similarity(full, crops, image_size=80, chunk_images=5,
                                                                 bootstrap=boot))  # chunking changes nothing
        widths[nimg] = float(df.corner_ratio_ci_high.iloc[0] - df.corner_ratio_ci_low.iloc[0])
    assert widths[120] > 0 and widths[12] > 2 * widths[120]


def test_task_takes_the_image_size_from_the_store(tmp_path, stores):
    from diffaudit.errors import UserError
    from diffaudit.pipeline.token_group_similarity import image_size

    full, _ = stores
    with pytest.raises(UserError, match="image_size"):
        image_size(full)  # the test stores record none
    w = StoreWriter(tmp_path / "sized.zarr", layers=[L8], image_ids=["a"], labels=None, config={"image_size": 384},
                    attrs={"image_size": 384}, layer_indices=[0])
    w.write_batch(0, {L8: np.zeros((1, 2, 6, 6), np.float16)})
    w.finalize()
    assert image_size(ReprStore(tmp_path / "sized.zarr")) == 384
