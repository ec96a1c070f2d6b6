"""The tokens the position probe trains and tests on (:mod:`diffaudit.analyses.probe`): one layer's tokens read from
a store, all of them or only those used, and the token indices of images (image-major: token ``t`` of an ``n x n``
layer is image ``t // n^2``, row ``(t % n^2) // n``, column ``t % n``)."""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from ..store import ReprStore


def derived_seed(*parts) -> int:
    """A 63-bit seed from any parts (sha256 of their text)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _layer_tokens(store: ReprStore, layer: str, device: torch.device, chunk_images: int = 20) -> torch.Tensor:
    """All tokens of one layer as a float16 (N*H*W, C) tensor on ``device``, order (image, row, col)."""
    n_img, c, h, w = store.shape(layer)
    buf = np.empty((n_img, h, w, c), dtype=np.float16)
    for i0, chunk in store.iter_chunks(layer, chunk_images=chunk_images, dtype=np.float16):
        buf[i0:i0 + chunk.shape[0]] = chunk.transpose(0, 2, 3, 1)
    x = torch.from_numpy(buf).reshape(n_img * h * w, c)
    return x.to(device) if device.type != "cpu" else x


def _layer_token_subset(store: ReprStore, layer: str, device: torch.device, tokens: torch.Tensor,
                        chunk_images: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Only the tokens ``tokens`` (sorted unique indices, image-major) of one layer, float16 ``(len, C)`` on
    ``device``, and ``row_of`` (every token's row in it, -1 for the others): the memory of the tokens used."""
    n_img, c, h, w = store.shape(layer)
    hw = h * w
    want = tokens.numpy()
    buf = np.empty((want.size, c), dtype=np.float16)
    for i0, chunk in store.iter_chunks(layer, chunk_images=chunk_images, dtype=np.float16):
        lo, hi = np.searchsorted(want, [i0 * hw, (i0 + chunk.shape[0]) * hw])
        if hi > lo:
            buf[lo:hi] = chunk.transpose(0, 2, 3, 1).reshape(-1, c)[want[lo:hi] - i0 * hw]
    row_of = torch.full((n_img * hw,), -1, dtype=torch.int64)
    row_of[tokens] = torch.arange(want.size)
    x = torch.from_numpy(buf)
    return (x.to(device) if device.type != "cpu" else x), row_of


def _token_indices(images: np.ndarray, hw: int) -> torch.Tensor:
    img = torch.as_tensor(np.asarray(images, dtype=np.int64))
    return (img[:, None] * hw + torch.arange(hw, dtype=torch.int64)[None, :]).reshape(-1)


def _train_token_indices(images: np.ndarray, n: int, per_image: int | None, layer: str) -> torch.Tensor:
    """The training tokens: every token of ``images``, or ``per_image`` positions of each image drawn without
    replacement (a generator seeded by the layer, so every run of the layer draws the same) when the map has more."""
    if per_image is None or int(per_image) >= n * n:
        return _token_indices(images, n * n)
    rng = np.random.default_rng(derived_seed("train-tokens", layer) % 2**32)
    img = np.asarray(images, dtype=np.int64)
    pos = np.stack([np.sort(rng.choice(n * n, size=int(per_image), replace=False)) for _ in img])
    return torch.as_tensor((img[:, None] * n * n + pos).reshape(-1))
