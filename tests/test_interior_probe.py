"""Interior probe: the accuracy on tokens away from the border tells a border detector from a positional code."""
from __future__ import annotations

import numpy as np
import pytest

from diffaudit.analyses.probe import chance_level, interior_chance_level, run_probe, summarize_probe
from test_probe import make_store, position_code_layer

N_IMG, C, N, K = 40, 48, 8, 2


def border_only_layer(rng, strength: float = 2.0) -> np.ndarray:
    """A strong fixed code on every token closer than K to the border; the interior tokens are pure noise."""
    code = rng.standard_normal((N, N, C))
    rows, cols = np.meshgrid(np.arange(N), np.arange(N), indexing="ij")
    dist = np.minimum.reduce([rows, cols, N - 1 - rows, N - 1 - cols])
    code[dist >= K] = 0.0
    x = rng.standard_normal((N_IMG, N, N, C)) + strength * code[None]
    return x.transpose(0, 3, 1, 2).astype(np.float16)


@pytest.fixture(scope="module")
def df(tmp_path_factory):
    rng = np.random.default_rng(0)
    data = {"border": border_only_layer(rng), "code": position_code_layer(rng, N_IMG, C, N, 1.5),
            "small": position_code_layer(rng, N_IMG, 8, 4, 1.5)}
    store = make_store(tmp_path_factory.mktemp("interior") / "full.zarr", data)
    return run_probe(store, mode="paper", epochs=5, batch_size=64, lr=0.01, granularities=(8,), device="cpu",
                     interior_k=K)


def value(df, layer, column, metric="per_axis"):
    sel = df[(df.layer == layer) & (df.metric == metric)]
    return float(sel[sel.epoch == sel.epoch.max()][column].iloc[0])


def test_interior_chance_level():
    assert interior_chance_level(8, 8, 2) == pytest.approx(1 / 4)  # rows 2..5, one per bin
    assert interior_chance_level(8, 8, 2, joint=True) == pytest.approx(1 / 16)
    assert interior_chance_level(64, 8, 2) == pytest.approx(1 / 4)  # bins 2..5 of 8 rows each: in bins, not tokens
    assert interior_chance_level(8, 16, 2) == pytest.approx(1 / 4)  # g above n: the native grid
    assert interior_chance_level(16, 4, 1) == pytest.approx(1 / 2)  # bins 1 and 2 of four
    assert np.isnan(interior_chance_level(4, 8, 2)) and np.isnan(interior_chance_level(64, 4, 2))  # G <= 2k


def test_outer_bin_decoder_stays_at_interior_chance_at_a_coarse_grid(tmp_path):
    """A 16 x 16 map evaluated at 4 x 4 (bins of 4 tokens): a code only on the tokens of the outermost bins lets the
    probe place those, but the interior (bins 1..2, counted in bins) gains nothing. Counted in tokens (k = 1 token),
    the interior would include rows 1..3 and 12..14 of the outer bins and the decoder would lift it far above its
    chance."""
    rng = np.random.default_rng(2)
    n, g, k = 16, 4, 1
    code = rng.standard_normal((n, n, C))
    rows, cols = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    outer_bin = np.minimum.reduce([rows, cols, n - 1 - rows, n - 1 - cols]) < n // g
    code[~outer_bin] = 0.0
    x = (rng.standard_normal((N_IMG, n, n, C)) + 2.0 * code[None]).transpose(0, 3, 1, 2).astype(np.float16)
    store = make_store(tmp_path / "outer.zarr", {"outer": x})
    out = run_probe(store, mode="paper", epochs=5, batch_size=64, lr=0.01, granularities=(g,), device="cpu",
                    interior_k=k)
    assert value(out, "outer", "accuracy") > 2 * chance_level(n, g)  # the outer bins are placed by the code
    inner = value(out, "outer", "interior_accuracy")
    assert inner < interior_chance_level(n, g, k) + 0.1  # 1/2 + 0.1
    # counted in tokens the interior would follow the overall accuracy (measured: 0.556 against 0.583)
    assert inner < value(out, "outer", "accuracy") - 0.15


def test_border_only_signal_is_decoded_but_not_in_the_interior(df):
    # 48 of the 64 tokens carry the code: the overall accuracy is far above the map's chance ...
    assert value(df, "border", "accuracy") > 0.7 > 4 * chance_level(N, 8)
    # ... but the interior tokens carry nothing: the interior accuracy stays at the interior's chance
    assert value(df, "border", "interior_accuracy") < interior_chance_level(N, 8, K) + 0.1
    assert value(df, "border", "interior_accuracy", "joint") < interior_chance_level(N, 8, K, joint=True) + 0.06


def test_positional_code_everywhere_is_decoded_in_the_interior_too(df):
    for metric, floor in (("per_axis", 0.7), ("joint", 0.5)):
        inner = value(df, "code", "interior_accuracy", metric)
        assert inner > floor and inner == pytest.approx(value(df, "code", "accuracy", metric), abs=0.1)
        assert inner > 3 * interior_chance_level(N, 8, K, joint=metric == "joint")


def test_too_small_map_has_no_interior(df):
    small = df[df.layer == "small"]
    assert small.interior_accuracy.isna().all() and small.accuracy.notna().all()  # 4 <= 2k
    assert summarize_probe(df)[lambda s: s.layer == "small"].interior_accuracy.isna().all()


def test_k_zero_is_the_whole_map_and_the_summary_averages_seeds(tmp_path):
    rng = np.random.default_rng(1)
    store = make_store(tmp_path / "s.zarr", {"code": position_code_layer(rng, 20, 16, 6, 1.0)})
    kw = dict(epochs=2, batch_size=64, lr=0.01, granularities=(3, 6), device="cpu")
    whole = run_probe(store, mode="paper", interior_k=0, **kw)
    np.testing.assert_array_equal(whole.interior_accuracy, whole.accuracy)
    runs = run_probe(store, mode="corrected", seeds=(0, 1), interior_k=1, **kw)
    summ = summarize_probe(runs)
    by_hand = runs.groupby(["epoch", "granularity", "metric"]).interior_accuracy.mean()
    got = summ.set_index(["epoch", "granularity", "metric"]).interior_accuracy
    np.testing.assert_allclose(got.loc[by_hand.index], by_hand)
    with pytest.raises(ValueError, match="interior_k"):
        run_probe(store, interior_k=-1, **kw)
