"""Channel-wise magnitude census: "massive activation" channels (Sun et al. 2024) in U-Net layers.

Sun, Chen, Kolter & Liu (2024), "Massive Activations in Large Language Models", call an activation massive when
its magnitude exceeds 100 and is about 1000x the median magnitude of its hidden state. Diffusion U-Net feature
maps are far less extreme than LLM residual streams, so this census uses a relative rule only, with a lower
default factor (10x); the threshold is a parameter.

Rule, per layer and image: for every channel take ``m_c = max over (y, x) of |activation|``; the image's
reference is ``median_c m_c`` (the median over channels); the channel's ratio is ``m_c / median``, and the channel
is an outlier in that image when ``ratio > ratio_threshold``. Images whose reference is 0 (an all-zero map) have
an undefined ratio and count as "not an outlier".

Reported per layer, for every channel that is an outlier in at least one image:
``median_abs_ratio`` (median over all images of the channel's ratio), ``max_abs`` (largest |activation| of the
channel over all images and positions), ``frac_images_outlier`` (fraction of the N images in which it is an
outlier: consistency across images) and ``n_images`` (N).

Memory: the maps are streamed in chunks of ``chunk_images`` images (O(chunk_images * C * H * W)); besides them
only per-channel summaries are kept: counts and maxima (C values) and the per-image ratios (N x C float32, e.g.
2.5 MB for 500 images x 1280 channels), needed for the exact median. The maps themselves are never held for
more than one chunk.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..store import ReprStore
from ..tables import CHANNEL_COLUMNS


def channel_ratios(chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(b, C, H, W) -> (per-image channel max |act| (b, C), ratio to the median over channels (b, C))."""
    m = np.abs(chunk).max(axis=(2, 3)).astype(np.float32)
    med = np.median(m, axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(med > 0, m / np.where(med > 0, med, 1), np.nan).astype(np.float32)
    return m, ratio


def channel_outliers(store: ReprStore, layers: list[str] | None = None, model_name: str = "",
                     ratio_threshold: float = 10.0, chunk_images: int = 20, progress: bool = False) -> pd.DataFrame:
    """Channels whose per-image max |activation| exceeds ``ratio_threshold`` x the median channel (module doc)."""
    layers = store.select_layers(layers)
    it = layers
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(layers, desc=f"channel census {model_name}".strip())
    rows = []
    for layer in it:
        n, c, h, w = store.shape(layer)
        count = np.zeros(c, dtype=np.int64)
        max_abs = np.zeros(c, dtype=np.float32)
        ratios = np.empty((n, c), dtype=np.float32)
        for i0, chunk in store.iter_chunks(layer, chunk_images=chunk_images, dtype=np.float32):
            m, ratio = channel_ratios(chunk)
            ratios[i0:i0 + chunk.shape[0]] = ratio
            with np.errstate(invalid="ignore"):
                count += (ratio > ratio_threshold).sum(axis=0)
            np.maximum(max_abs, m.max(axis=0), out=max_abs)
        for ch in np.flatnonzero(count > 0):
            col = ratios[:, ch]
            med = float(np.nanmedian(col)) if np.isfinite(col).any() else float("nan")
            rows.append((model_name, store.layer_index(layer), layer, int(c), int(h), int(ch), med, float(max_abs[ch]),
                         float(count[ch]) / n, int(n)))
    return pd.DataFrame(rows, columns=CHANNEL_COLUMNS)
