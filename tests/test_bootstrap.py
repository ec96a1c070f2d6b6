"""Percentile bootstrap over images: the shared helper against a plain loop, its coverage, and the probe's
intervals (planted position codes)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from diffaudit.analyses.bootstrap import Bootstrap
from diffaudit.analyses.probe import run_probe, summarize_probe
from test_probe import make_store, position_code_layer


def loop_indices(boot: Bootstrap, n: int) -> np.ndarray:
    """The resampled image indices, drawn as the method says (one row per resample)."""
    return np.random.default_rng(boot.seed).integers(0, n, size=(boot.n_resamples, n))


def loop_interval(boot: Bootstrap, stats) -> tuple[float, float]:
    q = np.quantile(np.asarray(stats, float), [(1 - boot.level) / 2, (1 + boot.level) / 2])
    return float(q[0]), float(q[1])


# -- the helper ----------------------------------------------------------------------------------

def test_weights_are_the_multiplicities_of_seeded_draws():
    boot = Bootstrap(n_resamples=50, seed=7)
    w = boot.weights(13)
    idx = loop_indices(boot, 13)
    assert w.shape == (50, 13) and (w.sum(axis=1) == 13).all()
    np.testing.assert_array_equal(w, np.stack([np.bincount(r, minlength=13) for r in idx]))
    assert boot.weights(13) is w and not w.flags.writeable  # cached, shared read-only
    assert not np.array_equal(Bootstrap(n_resamples=50, seed=8).weights(13), w)


def test_mean_and_ratio_intervals_equal_a_plain_loop():
    rng = np.random.default_rng(0)
    boot = Bootstrap(n_resamples=300, level=0.9, seed=3)
    values = rng.gamma(2.0, size=25)
    num, den = rng.normal(5, 1, size=25), rng.integers(1, 4, size=25).astype(float)
    idx = loop_indices(boot, 25)
    lo, hi = boot.mean_interval(values)
    assert (float(lo), float(hi)) == pytest.approx(loop_interval(boot, [values[i].mean() for i in idx]), rel=1e-12)
    lo, hi = boot.ratio_interval(num, den)
    assert (float(lo), float(hi)) == pytest.approx(
        loop_interval(boot, [num[i].sum() / den[i].sum() for i in idx]), rel=1e-12)
    # several statistics at once: one interval per column, the same as one at a time
    two = np.stack([values, 2 * values + 1], axis=1)
    lo2, hi2 = boot.mean_interval(two)
    assert lo2.shape == hi2.shape == (2,)
    np.testing.assert_allclose([lo2[0], hi2[0]], boot.mean_interval(values), rtol=1e-12)
    np.testing.assert_allclose([lo2[1], hi2[1]], 2 * np.array(boot.mean_interval(values)) + 1, rtol=1e-12)


def test_subset_means_resample_the_pool_jointly():
    rng = np.random.default_rng(1)
    boot = Bootstrap(n_resamples=200, seed=5)
    pool = 12
    a_pos, b_pos = np.array([0, 2, 3, 7, 9]), np.array([1, 2, 5, 7, 11])  # two seeds sharing images 2 and 7
    a, b = rng.uniform(size=5), rng.uniform(size=5)
    got = boot.subset_mean_resamples(pool, [(a_pos, a), (b_pos, b)])
    want = []
    for i in loop_indices(boot, pool):
        ma = [a[list(a_pos).index(j)] for j in i if j in a_pos]
        mb = [b[list(b_pos).index(j)] for j in i if j in b_pos]
        want.append((np.mean(ma) if ma else np.nan) + (np.mean(mb) if mb else np.nan))
    np.testing.assert_allclose(got, np.array(want) / 2, rtol=1e-12)
    # one subset over the whole pool is the plain mean
    v = rng.uniform(size=pool)
    np.testing.assert_allclose(boot.subset_mean_resamples(pool, [(np.arange(pool), v)]), boot.mean_resamples(v))


def test_interval_leaves_out_undefined_resamples():
    boot = Bootstrap(n_resamples=4, level=0.5)
    lo, hi = boot.interval(np.array([[1.0, np.nan], [2.0, np.nan], [np.nan, np.nan], [3.0, np.inf]]))
    assert (lo[0], hi[0]) == pytest.approx((1.5, 2.5)) and np.isnan(lo[1]) and np.isnan(hi[1])


@pytest.mark.parametrize("bad", [dict(n_resamples=0), dict(level=1.0), dict(level=0.0), dict(seed=-1)])
def test_invalid_settings(bad):
    with pytest.raises(ValueError):
        Bootstrap(**bad)


def test_from_config():
    assert Bootstrap.from_config({"n_resamples": 20, "level": 0.9, "seed": 4}) == Bootstrap(20, 0.9, 4)


def test_coverage_of_the_mean_is_near_the_level():
    """Many samples of 60 values from a known distribution: the 90 % interval covers the true mean ~90 % of
    the time (a wrong quantile or resampling scheme lands far off)."""
    rng = np.random.default_rng(2)
    boot = Bootstrap(n_resamples=400, level=0.9, seed=1)
    hits = []
    for _ in range(300):
        x = rng.exponential(1.0, size=60)
        lo, hi = boot.mean_interval(x)
        hits.append(lo <= 1.0 <= hi)
    assert 0.83 <= np.mean(hits) <= 0.95


# -- the probe's intervals -------------------------------------------------------------------------

FAST = dict(epochs=3, batch_size=64, lr=0.01, granularities=(4, 8), device="cpu")


def probe_store(tmp_path, n_img: int, seed: int = 0):
    """A weak planted code (per-image accuracy well inside (0, 1), so the interval has a width)."""
    rng = np.random.default_rng(seed)
    return make_store(tmp_path / f"weak{n_img}.zarr", {"code": position_code_layer(rng, n_img, 24, 8, 0.35)})


def final(df, metric="per_axis", g=8):
    sel = df[(df.metric == metric) & (df.granularity == g)]
    return sel[sel.epoch == sel.epoch.max()].iloc[0]


@pytest.fixture(scope="module")
def weak(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("boot")
    boot = Bootstrap(n_resamples=500, seed=0)
    return {n: run_probe(probe_store(tmp, n), mode="paper", bootstrap=boot, **FAST) for n in (40, 400)}


def test_probe_interval_contains_the_accuracy_and_shrinks_with_more_images(weak):
    for df in weak.values():
        assert (df.ci_low <= df.accuracy + 1e-12).all() and (df.accuracy <= df.ci_high + 1e-12).all()
    small, large = final(weak[40]), final(weak[400])
    assert 0.2 < small.accuracy < 0.9 and 0.2 < large.accuracy < 0.9  # the code is found, not perfectly
    w_small, w_large = small.ci_high - small.ci_low, large.ci_high - large.ci_low
    assert w_large > 0 and w_small > 2 * w_large  # 8 vs 80 test images: ~sqrt(10) narrower


def test_probe_interval_is_the_bootstrap_of_per_image_accuracies(tmp_path):
    """With one test image every resample is that image: the interval collapses onto the accuracy."""
    store = probe_store(tmp_path, 5)
    df = run_probe(store, mode="paper", bootstrap=Bootstrap(n_resamples=50), **FAST)
    np.testing.assert_allclose(df.ci_low, df.accuracy, atol=1e-6)
    np.testing.assert_allclose(df.ci_high, df.accuracy, atol=1e-6)


def test_probe_interval_is_reproducible_for_a_seed(tmp_path, weak):
    store = probe_store(tmp_path, 40)
    again = run_probe(store, mode="paper", bootstrap=Bootstrap(n_resamples=500, seed=0), **FAST)
    pd.testing.assert_frame_equal(again, weak[40])
    other = run_probe(store, mode="paper", bootstrap=Bootstrap(n_resamples=500, seed=1), **FAST)
    np.testing.assert_array_equal(other.accuracy, weak[40].accuracy)  # the bootstrap never touches the probe
    assert not np.array_equal(other.ci_low, weak[40].ci_low)


def test_summary_interval_one_seed_is_the_runs_and_several_seeds_pool_the_test_images(tmp_path, weak):
    summ = summarize_probe(weak[40])
    np.testing.assert_array_equal(summ.sort_values(["epoch", "granularity", "metric"]).ci_low,
                                  weak[40].sort_values(["epoch", "granularity", "metric"]).ci_low)
    store = probe_store(tmp_path, 40)
    df = run_probe(store, mode="corrected", seeds=(1, 2, 3), bootstrap=Bootstrap(n_resamples=500), **FAST)
    summ = summarize_probe(df)
    assert (summ.n_seeds == 3).all() and summ[["ci_low", "ci_high"]].notna().all().all()
    assert (summ.ci_low <= summ.accuracy + 1e-12).all() and (summ.accuracy <= summ.ci_high + 1e-12).all()
    # the seed mean is tighter than a single seed's interval (three test sets of 8, 24 images in all at most)
    row = final(summ)
    single = final(df[df.seed == 1])
    assert row.ci_high - row.ci_low < single.ci_high - single.ci_low
    # without run_probe's records (a table read back) several seeds have no seed-mean interval
    bare = df.copy()
    bare.attrs.clear()
    assert summarize_probe(bare)[["ci_low", "ci_high"]].isna().all().all()
    # a subset of the seeds is not the pooled interval of all three: no interval rather than a wrong one
    assert summarize_probe(df[df.seed != 3])[["ci_low", "ci_high"]].isna().all().all()
