"""Channel-wise massive-activation census on synthetic stores."""
from __future__ import annotations

import numpy as np
import pytest

from diffaudit.analyses.channels import CHANNEL_COLUMNS, channel_outliers, channel_ratios
from diffaudit.store import ReprStore, StoreWriter

N_IMG, C, H = 20, 16, 8
MASSIVE_CH, MASSIVE_IMGS = 5, list(range(3, 11))  # 8 of 20 images -> frac 0.4


def make_store(path, data) -> ReprStore:
    w = StoreWriter(path, layers=list(data), image_ids=[f"i{i}" for i in range(N_IMG)], labels=None,
                    config={"p": str(path)}, layer_indices=[7, 30][:len(data)])
    w.write_batch(0, data)
    w.finalize()
    return ReprStore(path)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    neutral = rng.standard_normal((N_IMG, C, H, H))
    planted = rng.standard_normal((N_IMG, C, H, H))
    planted[MASSIVE_IMGS, MASSIVE_CH] *= 50
    data = {"down_blocks[1].attentions[0]": neutral.astype(np.float16),
            "up_blocks[1].upsamplers[0]": planted.astype(np.float16)}
    return make_store(tmp_path_factory.mktemp("chan") / "s.zarr", data), planted.astype(np.float16)


def test_planted_massive_channel_is_reported(store):
    st, planted = store
    df = channel_outliers(st, model_name="syn", chunk_images=6)
    assert list(df.columns) == CHANNEL_COLUMNS
    assert len(df) == 1  # the neutral layer and the other channels report nothing
    row = df.iloc[0]
    assert (row.layer, row.layer_index, row.channel, row.channels, row.spatial) == \
        ("up_blocks[1].upsamplers[0]", 30, MASSIVE_CH, C, H)
    assert row.frac_images_outlier == pytest.approx(len(MASSIVE_IMGS) / N_IMG)
    assert row.n_images == N_IMG and row.model == "syn"
    m = np.abs(planted.astype(np.float32)).max(axis=(2, 3))
    assert row.max_abs == pytest.approx(m[:, MASSIVE_CH].max())
    ratio = m[:, MASSIVE_CH] / np.median(m, axis=1)
    assert row.median_abs_ratio == pytest.approx(np.median(ratio), rel=1e-5)


def test_neutral_data_reports_nothing(store):
    st, _ = store
    df = channel_outliers(st, layers=["down_blocks[1].attentions[0]"])
    assert df.empty and list(df.columns) == CHANNEL_COLUMNS


def test_threshold_controls_detection(store):
    st, _ = store
    assert channel_outliers(st, ratio_threshold=1000).empty
    # a threshold below 1 flags every channel above the median in some image
    assert len(channel_outliers(st, layers=["down_blocks[1].attentions[0]"], ratio_threshold=0.5)) == C


def test_channel_ratios_zero_map():
    chunk = np.zeros((2, 3, 2, 2), dtype=np.float32)
    chunk[1, 0] = 4.0
    chunk[1, 1] = 2.0
    chunk[1, 2] = -1.0
    m, ratio = channel_ratios(chunk)
    assert np.isnan(ratio[0]).all()  # all-zero image: undefined, never an outlier
    np.testing.assert_allclose(m[1], [4, 2, 1])
    np.testing.assert_allclose(ratio[1], [2, 1, 0.5])
