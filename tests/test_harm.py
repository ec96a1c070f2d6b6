"""Harm metrics and mitigations on planted features (diffaudit.harm): a planted positional component makes matches
follow the position and the position mitigations remove it; planted hub tokens attract matches and inpainting
removes them; an image matched with itself is matched exactly."""
from __future__ import annotations

import numpy as np
import pytest

from diffaudit.analyses.bootstrap import Bootstrap
from diffaudit.harm import matching
from diffaudit.harm.mitigations import MITIGATIONS, MitigationSettings, fit_mitigation
from diffaudit.store import ReprStore, StoreView, StoreWriter

C, N = 32, 16


def smooth_content(rng, n_img: int, c: int = C, n: int = N, cell: int = 4) -> np.ndarray:
    """Per-image content that varies smoothly over the map (a coarse random field, upsampled): neighbours alike."""
    coarse = rng.standard_normal((n_img, c, n // cell, n // cell))
    return coarse.repeat(cell, axis=2).repeat(cell, axis=3) + 0.1 * rng.standard_normal((n_img, c, n, n))


def position_code(rng, c: int = C, n: int = N, dims: int = 6) -> np.ndarray:
    """A fixed per-position feature living in ``dims`` channel directions (C, n, n)."""
    basis = np.linalg.qr(rng.standard_normal((c, dims)))[0]  # (C, dims)
    coef = rng.standard_normal((dims, n, n))
    return np.einsum("cd,dhw->chw", basis, coef)


def flip_metrics(src: np.ndarray, tgt: np.ndarray, mit=None) -> dict[str, float]:
    """pck and position_following of horizontally flipped pairs (src[i] <-> tgt[i]), pooled over pairs."""
    n = src.shape[-1]
    rows, cols = np.divmod(np.arange(n * n), n)
    target = np.stack([rows, n - 1 - cols], axis=1)
    sums = {m: [0.0, 0.0] for m in matching.METRICS}
    for s, t in zip(src, tgt):
        if mit is not None:
            s, t = mit.apply(s[None])[0], mit.apply(t[None])[0]
        tokens = np.arange(n * n)
        match = matching.nearest_tokens(matching.tokens_of(s), matching.tokens_of(t))
        for m, (num, den) in matching.pair_terms(tokens, match, target, n, None).items():
            sums[m][0] += num.sum()
            sums[m][1] += den.sum()
    return {m: num / den if den else float("nan") for m, (num, den) in sums.items()}


def chunks_of(x: np.ndarray, size: int = 5):
    return lambda: (x[i:i + size].astype(np.float32) for i in range(0, len(x), size))


@pytest.fixture(scope="module")
def planted():
    rng = np.random.default_rng(0)
    code = 8.0 * position_code(rng)
    fit = smooth_content(rng, 30, cell=1) + code
    content = smooth_content(rng, 8, cell=1)
    src = content + code
    tgt = content[..., ::-1] + code  # the content mirrored, the position code where it was
    return fit.astype(np.float32), src.astype(np.float32), tgt.astype(np.float32)


def test_matching_an_image_with_itself_is_exact():
    x = np.random.default_rng(1).standard_normal((C, N, N)).astype(np.float32)
    tok = matching.tokens_of(x)
    match = matching.nearest_tokens(tok, tok, block_bytes=4 * N * N * 7)  # several blocks of 7 rows
    rows, cols = np.divmod(np.arange(N * N), N)
    terms = matching.pair_terms(np.arange(N * N), match, np.stack([rows, cols], 1), N, None)
    assert terms["pck"][0].mean() == 1.0
    assert terms["position_following"][1].sum() == 0  # no token moved: nothing to follow


def test_planted_position_code_is_followed_and_the_position_mitigations_remove_it(planted):
    fit, src, tgt = planted
    none = flip_metrics(src, tgt)
    assert none["position_following"] > 0.8 and none["pck"] < 0.3
    for name in ("position_mean", "position_subspace", "all"):
        mit = fit_mitigation(name, chunks_of(fit), MitigationSettings(subspace_k=6))
        assert mit.active
        got = flip_metrics(src, tgt, mit)
        assert got["pck"] > 0.9, (name, got)
        assert got["position_following"] < 0.15, (name, got)
    # a mitigation that has nothing to act on says so (no outlier channel here)
    ch = fit_mitigation("channel_mean", chunks_of(fit))
    assert not ch.active and "nothing to act on" in ch.acts_on


def test_position_subspace_removes_only_the_position_directions(planted):
    fit, src, _ = planted
    mit = fit_mitigation("position_subspace", chunks_of(fit), MitigationSettings(subspace_k=6))
    out = mit.apply(src)
    basis = mit.steps[0].basis
    assert np.abs(np.einsum("ck,bchw->bkhw", basis, out)).max() < 1e-3  # nothing left along the removed directions
    kept = src - np.einsum("ck,bkhw->bchw", basis, np.einsum("ck,bchw->bkhw", basis, src))
    np.testing.assert_allclose(out, kept, atol=1e-4)


def hub_pair(rng, n_img: int = 6, blocks=((2, 2), (10, 6))):
    """Sources and unrelated targets sharing a common direction v; each target has high-norm 2x2 blocks along v."""
    v = np.zeros(C, np.float32)
    v[0] = 1.0
    src = smooth_content(rng, n_img) + 1.5 * v[None, :, None, None]
    tgt = smooth_content(rng, n_img) + 1.5 * v[None, :, None, None]
    for by, bx in blocks:
        tgt[:, :, by:by + 2, bx:bx + 2] = 25.0 * v[None, :, None, None]
    return src.astype(np.float32), tgt.astype(np.float32)


def hub_ratio(src, tgt, mit=None, threshold: float = 2.0) -> float:
    from diffaudit.analyses.anomalies import flagged_tokens, token_norms

    hits = expected = 0.0
    n = src.shape[-1]
    for s, t in zip(src, tgt):
        flagged = flagged_tokens(token_norms(t[None]), threshold)[0].reshape(-1)
        if mit is not None:
            s, t = mit.apply(s[None])[0], mit.apply(t[None])[0]
        match = matching.nearest_tokens(matching.tokens_of(s), matching.tokens_of(t))
        num, den = matching.pair_terms(np.arange(n * n), match, np.zeros((n * n, 2), int), n, flagged)["hub_ratio"]
        hits, expected = hits + num.sum(), expected + den.sum()
    return hits / expected


def test_planted_hubs_attract_matches_and_inpainting_removes_them():
    rng = np.random.default_rng(2)
    src, tgt = hub_pair(rng)
    assert hub_ratio(src, tgt) > 5
    mit = fit_mitigation("anomaly_inpaint", chunks_of(src))
    after = hub_ratio(src, tgt, mit)
    assert 0.3 < after < 2.0, after
    assert mit.active and mit.steps[0].replaced == 6 * 2 * 4


def test_channel_mean_sets_outlier_channels_to_their_fit_mean():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((10, C, N, N)).astype(np.float32)
    x[:, 5, 3, 3] += 200.0  # channel 5 an outlier in every image
    x[:1, 9, 0, 0] += 200.0  # channel 9 in one image only: not a channel of the layer
    mit = fit_mitigation("channel_mean", chunks_of(x))
    assert mit.active and mit.steps[0].channels.tolist() == [5]
    out = mit.apply(x[:2])
    assert np.allclose(out[:, 5], x[:, 5].mean(), atol=1e-4)
    np.testing.assert_array_equal(out[:, 9], x[:2, 9])


def test_every_mitigation_fits_and_keeps_shapes():
    x = np.random.default_rng(4).standard_normal((6, 8, 4, 4)).astype(np.float32)
    for name in MITIGATIONS:
        mit = fit_mitigation(name, chunks_of(x))
        assert mit.apply(x).shape == x.shape
    one = np.ones((3, 8, 1, 1), np.float32)
    for name in ("position_mean", "position_subspace"):
        mit = fit_mitigation(name, chunks_of(one))
        assert not mit.active and "nothing to act on" in mit.acts_on
        np.testing.assert_array_equal(mit.apply(one), one)
    with pytest.raises(ValueError, match="unknown mitigation"):
        fit_mitigation("blur", chunks_of(x))


def test_store_view_subsets_and_transforms(tmp_path):
    x = np.arange(6 * 2 * 3 * 3, dtype=np.float32).reshape(6, 2, 3, 3)
    w = StoreWriter(tmp_path / "s.zarr", layers=["a"], image_ids=[f"i{i}" for i in range(6)], labels=list(range(6)),
                    config={}, dtype="float32")
    w.write_batch(0, {"a": x})
    w.finalize()
    view = StoreView(ReprStore(tmp_path / "s.zarr"), [4, 1, 2, 3], transform=lambda layer, a: a + 1)
    assert view.n_images == 4 and view.shape("a") == (4, 2, 3, 3) and view.labels.tolist() == [4, 1, 2, 3]
    got = np.concatenate([c for _, c in view.iter_chunks("a", chunk_images=3)])
    np.testing.assert_array_equal(got, x[[4, 1, 2, 3]] + 1)


def test_pooled_interval_over_pairs_and_tokens():
    from diffaudit.harm.evaluate import _Terms

    t = _Terms()
    boot = Bootstrap(200, 0.95, 0)
    ones = np.ones(4)
    for k in range(5):
        t.add("flip", "none", {"pck": (np.array([1, 1, 0, k % 2], float), ones)}, per_token=False)
    t.add("stereo", "none", {"pck": (np.array([1, 0, 1, 1, 0, 1], float), np.ones(6))}, per_token=True)
    rows = {r["task"]: r for r in t.rows({}, boot, {"flip": "images", "stereo": "tokens"}, {})}
    assert rows["flip"]["n"] == 5 and rows["flip"]["value"] == pytest.approx(12 / 20)
    assert rows["stereo"]["n"] == 6 and rows["stereo"]["value"] == pytest.approx(4 / 6)
    assert rows["flip"]["ci_low"] <= rows["flip"]["value"] <= rows["flip"]["ci_high"]


def test_class_probe_reads_the_class_from_separable_features_only():
    from diffaudit.harm.evaluate import class_probe

    rng = np.random.default_rng(5)
    centres = 3 * rng.standard_normal((4, C))
    y_tr, y_te = np.repeat(np.arange(4), 5), np.repeat(np.arange(4), 3)
    x_tr = centres[y_tr] + rng.standard_normal((20, C))
    x_te = centres[y_te] + rng.standard_normal((12, C))
    assert class_probe(x_tr, y_tr, x_te, y_te).mean() == 1.0
    # features without the class: about chance (1/4)
    noise = class_probe(rng.standard_normal((20, C)), y_tr, rng.standard_normal((400, C)), np.resize(y_te, 400))
    assert noise.mean() < 0.4
    # a test class absent from the training images counts as wrong
    assert class_probe(x_tr, y_tr, x_te[:1], np.array([9])).tolist() == [0.0]


def test_credibility_validation_finds_a_planted_rank_correlation():
    import pandas as pd

    from diffaudit.harm.validation import spearman, validate

    rng = np.random.default_rng(6)
    layers = [f"l{i}" for i in range(20)]
    pos = np.linspace(0, 1, 20)
    cred = pd.DataFrame({"layer": layers, "position_score": pos, "corner_score": 0.0,
                         "anomaly_score": rng.random(20), "hazard": pos})
    rows = []
    for layer, p in zip(layers, pos):
        rows += [{"layer": layer, "task": "flip", "mitigation": "none", "metric": "position_following",
                  "value": p ** 2 + 0.01 * rng.random()},
                 {"layer": layer, "task": "flip", "mitigation": "none", "metric": "pck", "value": 1 - p},
                 {"layer": layer, "task": "flip", "mitigation": "position_mean", "metric": "pck", "value": 0.5}]
    out = validate(cred, pd.DataFrame(rows), Bootstrap(200, 0.95, 0)).set_index(["axis", "harm_metric"])
    r = out.loc[("position", "position_following")]
    assert r["spearman"] > 0.95 and r["ci_low"] > 0.8 and r["n_layers"] == 20
    assert out.loc[("position", "mismatch"), "spearman"] == pytest.approx(1.0)  # mismatch = 1 - pck
    corner = out.loc[("corner", "position_following")]
    assert np.isnan(corner["spearman"]) and "same on every layer" in corner["note"]
    assert abs(out.loc[("anomaly", "position_following"), "spearman"]) < 0.6
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_switched_off_the_harm_jobs_make_nothing_and_say_so(tmp_path, caplog):
    """harm.enabled false (the paper's params.yaml): the same jobs run (Snakemake's and DVC's agree) but make no
    pair, extract nothing and write empty tables, a summary and a figure that says so."""
    import logging

    import pandas as pd

    from diffaudit.config import load_config
    from diffaudit.pipeline import dataset, extract_harm, harm, harm_figure, harm_pairs

    cfg = load_config("params.yaml")
    assert cfg["harm"]["enabled"] is False
    cfg["dataset"].update(source="demo", n_images=4, size=64)
    dataset.run(cfg, tmp_path / "dataset")
    harm_pairs.run(cfg, tmp_path / "dataset", tmp_path / "pairs")
    assert not list((tmp_path / "pairs" / "images").glob("*.png"))
    with caplog.at_level(logging.INFO):
        out = extract_harm.run(cfg, "mini", tmp_path / "pairs", tmp_path / "rep")
        harm.run(cfg, "mini", [tmp_path / "nowhere"], tmp_path / "pairs", out, tmp_path / "harm.csv",
                 tmp_path / "mitigations.csv", summary_json=tmp_path / "summary.json")
    assert out.is_dir() and not list(out.iterdir())
    assert pd.read_csv(tmp_path / "harm.csv").empty and pd.read_csv(tmp_path / "mitigations.csv").empty
    assert sum("harm.enabled is false" in r.getMessage() for r in caplog.records) == 2
    harm_figure.run("mini", tmp_path / "harm.csv", tmp_path / "harm_mini.png")
    assert (tmp_path / "harm_mini.png").stat().st_size > 1000


def test_a_mitigations_difference_to_none_is_paired():
    from diffaudit.harm.evaluate import _Terms

    t = _Terms()
    boot = Bootstrap(300, 0.95, 0)
    rng = np.random.default_rng(7)
    ones = np.ones(10)
    for _ in range(12):  # per pair: none's hits vary a lot between pairs, the mitigation adds 2 hits to each
        k = rng.integers(0, 7)
        base = (np.arange(10) < k).astype(float)
        better = (np.arange(10) < k + 2).astype(float)
        t.add("flip", "none", {"pck": (base, ones)}, per_token=False)
        t.add("flip", "position_mean", {"pck": (better, ones)}, per_token=False)
    rows = {r["mitigation"]: r for r in t.rows({}, boot, {"flip": "images"}, {})}
    m = rows["position_mean"]
    assert m["diff"] == pytest.approx(0.2)
    assert m["diff_ci_low"] == pytest.approx(0.2) and m["diff_ci_high"] == pytest.approx(0.2)  # paired: no spread
    assert m["ci_high"] - m["ci_low"] > 0.1  # while each value's own interval is wide
    assert np.isnan(rows["none"]["diff"])
