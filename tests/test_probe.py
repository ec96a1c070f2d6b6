"""Positional linear probe on synthetic stores (planted position codes, noise, exact replay)."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from diffaudit.analyses.probe import (PROBE_COLUMNS, SUMMARY_COLUMNS, SUMMARY_KEYS, SUMMARY_VALUES, TABLE_COLUMNS,
                                      accuracy_at_granularity, chance_level, class_mix, probe_splits, run_probe,
                                      summarize_probe)
from diffaudit.store import ReprStore, StoreWriter


def make_store(path, data: dict[str, np.ndarray], labels=None) -> ReprStore:
    layers = list(data)
    n = next(iter(data.values())).shape[0]
    w = StoreWriter(path, layers=layers, image_ids=[f"img{i}" for i in range(n)], labels=labels,
                    config={"test": str(path)}, layer_indices=list(range(len(layers))))
    w.write_batch(0, data)
    w.finalize()
    return ReprStore(path)


def position_code_layer(rng, n_img: int, c: int, n: int, strength: float, rows_only: bool = False) -> np.ndarray:
    """Random features plus a fixed random vector per position (or per row only)."""
    code = rng.standard_normal((n, n, c))
    if rows_only:
        code = np.repeat(code[:, :1], n, axis=1)
    x = rng.standard_normal((n_img, n, n, c)) + strength * code[None]
    return x.transpose(0, 3, 1, 2).astype(np.float16)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    n_img = 40
    data = {
        "code": position_code_layer(rng, n_img, 96, 8, 1.5),
        "rows": position_code_layer(rng, n_img, 32, 8, 1.5, rows_only=True),
        "noise": rng.standard_normal((n_img, 32, 8, 8)).astype(np.float16),
    }
    return make_store(tmp_path_factory.mktemp("probe") / "full.zarr", data)


FAST = dict(epochs=4, batch_size=64, lr=0.01, granularities=(2, 4, 8), device="cpu")


def acc(df, layer, metric, g, epoch=None):
    sel = df[(df.layer == layer) & (df.metric == metric) & (df.granularity == g)]
    sel = sel[sel.epoch == (epoch or sel.epoch.max())]
    return float(sel.accuracy.mean())


# -- metric arithmetic ---------------------------------------------------------------------------

def test_accuracy_at_granularity_by_hand():
    n = 8
    pred = [[0, 0], [3, 7], [4, 2]]
    label = [[1, 0], [3, 6], [7, 2]]
    # native: axis hits (F,T), (T,F), (F,T) -> 3/6 per axis; no token has both right
    assert accuracy_at_granularity(pred, label, n, 8) == pytest.approx(0.5)
    assert accuracy_at_granularity(pred, label, n, 8, joint=True) == pytest.approx(0.0)
    # g=4: bins i//2 -> (0,0|0,0) (1,3|1,3) (2,1|3,1): 5/6 per axis, 2/3 joint
    assert accuracy_at_granularity(pred, label, n, 4) == pytest.approx(5 / 6)
    assert accuracy_at_granularity(pred, label, n, 4, joint=True) == pytest.approx(2 / 3)
    # g=2: bins i//4 -> all right
    assert accuracy_at_granularity(pred, label, n, 2) == pytest.approx(1.0)
    assert accuracy_at_granularity(pred, label, n, 2, joint=True) == pytest.approx(1.0)
    # g >= n is injective: equals native accuracy
    assert accuracy_at_granularity(pred, label, n, 64) == pytest.approx(0.5)
    # a non-power-of-two grid: n=6, g=4 bins (i*4)//6 = [0,0,1,2,2,3]
    assert accuracy_at_granularity([[1, 4]], [[0, 3]], 6, 4) == pytest.approx(1.0)
    assert accuracy_at_granularity([[2, 5]], [[1, 4]], 6, 4) == pytest.approx(0.0)
    assert chance_level(8, 64) == pytest.approx(1 / 8) and chance_level(64, 8, joint=True) == pytest.approx(1 / 64)
    with pytest.raises(ValueError):
        accuracy_at_granularity([[1, 2, 3]], [[1, 2, 3]], 8, 8)


# -- signal and no signal ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def paper_df(store):
    return run_probe(store, mode="paper", model_name="syn", **FAST)


def test_output_format(paper_df, store):
    assert list(paper_df.columns) == TABLE_COLUMNS
    assert TABLE_COLUMNS[:len(PROBE_COLUMNS)] == PROBE_COLUMNS  # new columns only appended
    assert set(paper_df.metric) == {"per_axis", "joint"}
    assert sorted(paper_df.epoch.unique()) == [1, 2, 3, 4]
    assert len(paper_df) == 3 * 4 * 3 * 2
    assert (paper_df.seed == 42).all() and (paper_df.model == "syn").all()
    row = paper_df[paper_df.layer == "rows"].iloc[0]
    assert (row.layer_index, row.channels, row.spatial) == (1, 32, 8)


def test_planted_position_code_is_found(paper_df):
    assert acc(paper_df, "code", "per_axis", 8) > 0.9
    assert acc(paper_df, "code", "joint", 8) > 0.85


def test_noise_is_near_chance(paper_df):
    for g in (2, 4, 8):
        assert acc(paper_df, "noise", "per_axis", g) < 2 * chance_level(8, g)
        assert acc(paper_df, "noise", "joint", g) < 2 * chance_level(8, g, joint=True)


def test_per_axis_and_joint_differ_for_row_only_code(paper_df):
    # rows perfectly decodable, columns at chance: per axis ~ (1 + 1/8)/2, joint ~ 1/8
    per_axis = acc(paper_df, "rows", "per_axis", 8)
    joint = acc(paper_df, "rows", "joint", 8)
    assert 0.45 < per_axis < 0.7
    assert joint < 0.25
    assert (paper_df.query("metric == 'joint'").accuracy.to_numpy()
            <= paper_df.query("metric == 'per_axis'").accuracy.to_numpy() + 1e-9).all()
    # coarser grid is never harder than a finer one for the same predictions
    assert acc(paper_df, "rows", "per_axis", 2) >= per_axis


# -- paper-mode replay --------------------------------------------------------------------------

def test_paper_mode_is_deterministic(store, paper_df):
    again = run_probe(store, mode="paper", model_name="syn", **FAST)
    pd.testing.assert_frame_equal(paper_df, again)


def authors_loop(reps: dict[str, np.ndarray], layers, *, epochs, batch_size, lr, sizes, seed=42, train_frac=0.8):
    """A direct transcription of the method description (the authors' loop), all in memory."""
    torch.manual_seed(seed)
    torch.cuda.manual_seed(seed)
    results = {}
    for layer in layers:
        r = torch.from_numpy(reps[layer])  # (N, C, H, W) float16
        _, c, w, h = r.shape
        probe = torch.nn.Linear(c, w + h)
        opt = torch.optim.Adam(probe.parameters(), lr=lr)
        x = r.permute(0, 2, 3, 1).flatten(0, 2)
        lab = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(h), indexing="ij"), dim=-1)
        y = lab[None].expand(r.shape[0], w, h, 2).flatten(0, 2)
        num_train = int(train_frac * r.shape[0]) * w * h
        x_train, y_train, x_test, y_test = x[:num_train], y[:num_train], x[num_train:], y[num_train:]
        acc_layer = []
        for _ in range(epochs):
            perm = torch.randperm(len(x_train))
            for i in range(0, len(x_train), batch_size):
                idx = perm[i:i + batch_size]
                preds = probe(x_train[idx].float()).view(-1, w, 2)
                loss = F.cross_entropy(preds, y_train[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                pred = probe(x_test.float()).view(-1, w, 2).argmax(dim=1)
            acc_layer.append([((pred * g) // w == (y_test * g) // w).float().mean().item() for g in sizes])
        results[layer] = np.array(acc_layer)
    return results


def test_paper_mode_replays_authors_loop(tmp_path):
    rng = np.random.default_rng(5)
    reps = {"a": position_code_layer(rng, 10, 6, 4, 0.7), "b": rng.standard_normal((10, 5, 2, 2)).astype(np.float16)}
    store = make_store(tmp_path / "tiny.zarr", reps)
    kw = dict(epochs=3, batch_size=7, lr=0.01)
    sizes = (1, 2, 4)
    df = run_probe(store, layers=["a", "b"], mode="paper", granularities=sizes, device="cpu", **kw)
    ref = authors_loop(reps, ["a", "b"], sizes=sizes, **kw)
    for layer in ("a", "b"):
        got = (df[(df.layer == layer) & (df.metric == "per_axis")]
               .pivot(index="epoch", columns="granularity", values="accuracy").loc[:, list(sizes)].to_numpy())
        np.testing.assert_array_equal(got, ref[layer])
    # the paper RNG stream runs across layers: a different order changes layer b's numbers
    ref_ba = authors_loop(reps, ["b", "a"], sizes=sizes, **kw)
    df_ba = run_probe(store, layers=["b", "a"], mode="paper", granularities=sizes, device="cpu", **kw)
    got_ba = (df_ba[(df_ba.layer == "a") & (df_ba.metric == "per_axis")]
              .pivot(index="epoch", columns="granularity", values="accuracy").loc[:, list(sizes)].to_numpy())
    np.testing.assert_array_equal(got_ba, ref_ba["a"])


# -- corrected mode -----------------------------------------------------------------------------

def test_corrected_mode_seeds_and_layer_independence(store):
    kw = dict(FAST, epochs=2)
    both = run_probe(store, layers=["noise", "code"], mode="corrected", seeds=(1, 2), **kw)
    alone = run_probe(store, layers=["code"], mode="corrected", seeds=(1, 2), **kw)
    assert sorted(both.seed.unique()) == [1, 2]
    pd.testing.assert_frame_equal(both[both.layer == "code"].reset_index(drop=True), alone)
    # different seeds use different splits and inits: numbers differ
    s1 = alone[alone.seed == 1].accuracy.to_numpy()
    s2 = alone[alone.seed == 2].accuracy.to_numpy()
    assert not np.array_equal(s1, s2)
    assert acc(alone, "code", "per_axis", 8) > 0.8
    summ = summarize_probe(alone)
    assert {"accuracy", "accuracy_sd", "n_seeds"} <= set(summ.columns)
    assert (summ.n_seeds == 2).all() and len(summ) == len(alone) // 2
    one = summ[(summ.epoch == 2) & (summ.granularity == 8) & (summ.metric == "joint")].iloc[0]
    vals = alone[(alone.epoch == 2) & (alone.granularity == 8) & (alone.metric == "joint")].accuracy
    assert one.accuracy == pytest.approx(vals.mean()) and one.accuracy_sd == pytest.approx(vals.std(ddof=1))


def test_errors(tmp_path, store):
    rng = np.random.default_rng(1)
    rect = make_store(tmp_path / "rect.zarr", {"r": rng.standard_normal((4, 3, 4, 8)).astype(np.float16)})
    with pytest.raises(ValueError, match="square"):
        run_probe(rect, device="cpu")
    with pytest.raises(ValueError, match="mode"):
        run_probe(store, mode="bogus")
    with pytest.raises(ValueError, match="train_frac"):
        run_probe(store, train_frac=1.0, device="cpu")
    with pytest.raises(KeyError):
        run_probe(store, layers=["missing"], device="cpu")


# -- the test set's class mix -------------------------------------------------------------------

def test_class_mix_format():
    assert class_mix([4, 4, 4]) == (1, "4:3")
    assert class_mix([1, 0, 1, 4], class_names=[235, 242, 282, 717, 980]) == (3, "235:1;242:2;980:1")
    assert class_mix([2, -1, -1], class_names={2: "volcano"}) == (1, "volcano:1;unlabelled:2")
    assert class_mix([-1, -1]) == (None, "unlabelled")


@pytest.fixture(scope="module")
def class_ordered(tmp_path_factory):
    """Ten images of 5 classes in class order (2 each), like imagenet_subset read from a local ILSVRC tree."""
    rng = np.random.default_rng(3)
    data = {"code": position_code_layer(rng, 10, 16, 4, 1.5)}
    root = tmp_path_factory.mktemp("mix")
    labels = np.repeat(np.arange(5), 2)
    return {"ordered": make_store(root / "ordered.zarr", data, labels=labels),
            "unlabelled": make_store(root / "unlabelled.zarr", data)}


TINY = dict(epochs=1, batch_size=64, lr=0.01, granularities=(4,), device="cpu")
NAMES = [235, 242, 282, 717, 980]


def test_paper_split_of_class_ordered_set_warns_and_records_one_class(class_ordered, caplog):
    with caplog.at_level(logging.WARNING, logger="diffaudit.analyses.probe"):
        df = run_probe(class_ordered["ordered"], mode="paper", model_name="syn", class_names=NAMES, **TINY)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "\n" not in warned[0]
    assert "single class, 980" in warned[0] and "probe.mode: corrected" in warned[0]
    summ = summarize_probe(df)
    assert list(summ.columns) == SUMMARY_COLUMNS
    assert (summ.test_images == 2).all() and (summ.test_classes == 1).all()
    assert (summ.test_class_mix == "980:2").all()
    # the same from the settings alone, without training
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diffaudit.analyses.probe"):
        sp = probe_splits(class_ordered["ordered"], mode="paper")
    assert sp.to_dict("records") == [{"seed": 42, "test_images": 2, "test_classes": 1, "test_class_mix": "4:2"}]
    assert len(caplog.records) == 1


def test_corrected_split_mixes_the_classes(class_ordered, caplog):
    with caplog.at_level(logging.WARNING, logger="diffaudit.analyses.probe"):
        df = run_probe(class_ordered["ordered"], mode="corrected", seeds=(0, 1), train_frac=0.6,
                       class_names=NAMES, **TINY)
    assert not caplog.records
    splits = pd.DataFrame(df.attrs["probe_splits"])
    assert list(splits.seed) == [0, 1] and (splits.test_images == 4).all() and (splits.test_classes >= 2).all()
    summ = summarize_probe(df)
    row = summ.iloc[0]
    assert row.n_seeds == 2 and row.test_images == 4 and row.test_classes == splits.test_classes.min()
    mixes = row.test_class_mix.split(" | ")
    assert [m.rsplit(" (seed ", 1)[1] for m in mixes] == ["0)", "1)"]
    assert mixes[0].rsplit(" (seed", 1)[0] == splits.test_class_mix[0]
    assert sum(int(part.rsplit(":", 1)[1]) for part in splits.test_class_mix[0].split(";")) == 4
    assert summ.test_class_mix.nunique() == 1  # a property of the split: the same for every layer and metric


def test_unlabelled_set_records_unlabelled_and_does_not_warn(class_ordered, caplog):
    with caplog.at_level(logging.WARNING, logger="diffaudit.analyses.probe"):
        summ = summarize_probe(run_probe(class_ordered["unlabelled"], mode="paper", **TINY))
    assert not caplog.records
    assert (summ.test_class_mix == "unlabelled").all() and summ.test_classes.isna().all()
    assert (summ.test_images == 2).all()


def test_summary_without_split_information_has_empty_split_columns(paper_df):
    bare = paper_df.copy()
    bare.attrs.clear()
    summ = summarize_probe(bare)
    assert list(summ.columns) == SUMMARY_COLUMNS
    assert SUMMARY_COLUMNS[:len(SUMMARY_KEYS) + len(SUMMARY_VALUES)] == [*SUMMARY_KEYS, *SUMMARY_VALUES]
    assert summ.test_images.isna().all() and summ.test_class_mix.isna().all()
    assert list(summarize_probe(paper_df.iloc[:0]).columns) == SUMMARY_COLUMNS


def test_training_on_a_token_subset_reads_only_those_tokens_and_matches_the_full_read(store, monkeypatch):
    """run_probe(train_tokens=k) holds only the tokens it uses; the accuracies equal those of the same token choice
    trained from the whole layer in memory (the same training tokens, the same test tokens)."""
    from diffaudit.analyses import probe as P

    layer = "code"
    kw = dict(layers=[layer], mode="corrected", seeds=(42,), granularities=(8,), train_tokens=16, lr=0.05)
    sub = run_probe(store, **kw)
    held = {}
    real_subset = P._layer_token_subset

    def subset(st, la, dev, used, chunk_images=20):
        x, row_of = real_subset(st, la, dev, used, chunk_images)
        held["rows"] = x.shape[0]
        return x, row_of

    monkeypatch.setattr(P, "_layer_token_subset", subset)
    run_probe(store, **kw)
    n_img, _, n, _ = store.shape(layer)
    n_train = int(0.8 * n_img)
    assert held["rows"] == n_train * 16 + (n_img - n_train) * n * n  # 16 tokens per training image, all of the test
    monkeypatch.setattr(P, "_layer_token_subset",  # the whole layer in memory, the same token choice
                        lambda st, la, dev, used, chunk_images=20: (P._layer_tokens(st, la, dev, chunk_images), None))
    full = run_probe(store, **kw)
    pd.testing.assert_frame_equal(sub.reset_index(drop=True), full.reset_index(drop=True))
    assert sub["accuracy"].max() > 0.5  # the planted code is found from 16 tokens an image
