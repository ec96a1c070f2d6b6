"""Dense correspondence by nearest neighbours of features, and the harm metrics of a matched pair.

Matching: each source token is matched to the target token of highest cosine similarity (ties: the first in
row-major order). The similarity matrix grows with tokens squared per pair (4096 x 4096 at a 64 x 64 layer), so it
is built in blocks of source rows that keep one block under :data:`BLOCK_BYTES`; memory is flat in the number of
pairs and images. On a CUDA device the products run there.

Metrics of one pair on an ``n x n`` grid (tokens as (row, col); distances are Chebyshev, in tokens), over the
sampled source tokens whose ground truth is valid:

``pck``                 the share matched within 1 token of the ground truth.
``position_following``  among the tokens whose ground truth lies at least :data:`MOVED` tokens from their own
                        position, the share matched within 1 token of their own (absolute) position: a match that
                        follows the position instead of the content, the positional embedding made concrete.
``hub_ratio``           the share of matches that land on tokens the anomaly detector flags in the target
                        (:func:`diffaudit.analyses.anomalies.flagged_tokens` on the target's features as stored),
                        divided by the flagged tokens' share of the target's tokens: 1 = matches land on anomalies
                        as often as on any token, above 1 = anomalies act as hubs. Pooled as the ratio of sums
                        (matches on flagged tokens / the count expected if matches landed uniformly).

:func:`pair_terms` returns, per metric, each sampled token's numerator and denominator; summed per pair they give
the per-pair terms whose ratio of sums over pairs is the metric, and the bootstrap resamples pairs (images), or
tokens when a task has one pair (``stereo``).
"""
from __future__ import annotations

import numpy as np

METRICS: tuple[str, ...] = ("pck", "position_following", "hub_ratio")
#: A token "moved" (counts for position_following) when its ground truth is at least this far from its position.
MOVED = 2
#: Within this Chebyshev distance (tokens) a match is "right" (pck) or "at its own position" (position_following).
TOLERANCE = 1
#: Upper bound on one block of the source x target similarity matrix (float32).
BLOCK_BYTES = 64 * 2**20


def nearest_tokens(src, tgt, device: str = "cpu", block_bytes: int = BLOCK_BYTES) -> np.ndarray:
    """For each row of ``src`` (S, C) the index of the row of ``tgt`` (T, C) with the highest cosine similarity,
    int64 (S,). Blocks of source rows keep each similarity block under ``block_bytes``."""
    import torch
    import torch.nn.functional as F

    dev = torch.device(device)
    s = F.normalize(torch.as_tensor(np.asarray(src, dtype=np.float32)).to(dev), dim=1, eps=1e-12)
    t = F.normalize(torch.as_tensor(np.asarray(tgt, dtype=np.float32)).to(dev), dim=1, eps=1e-12)
    if s.shape[1] != t.shape[1]:
        raise ValueError(f"source and target have {s.shape[1]} and {t.shape[1]} channels")
    rows = max(1, int(block_bytes // (4 * max(t.shape[0], 1))))
    out = torch.empty(s.shape[0], dtype=torch.int64, device=dev)
    with torch.no_grad():
        for i in range(0, s.shape[0], rows):
            out[i:i + rows] = (s[i:i + rows] @ t.T).argmax(dim=1)
    return out.cpu().numpy()


def tokens_of(x: np.ndarray) -> np.ndarray:
    """One map (C, H, W) as its tokens (H*W, C), row-major."""
    c = x.shape[0]
    return np.ascontiguousarray(x.reshape(c, -1).T)


def sample_tokens(valid: np.ndarray, max_tokens: int | None, rng: np.random.Generator) -> np.ndarray:
    """The source tokens to match: the valid ones, or ``max_tokens`` of them drawn without replacement."""
    idx = np.flatnonzero(valid)
    if max_tokens is not None and idx.size > max_tokens:
        idx = np.sort(rng.choice(idx, size=int(max_tokens), replace=False))
    return idx


def _rc(index: np.ndarray, n: int) -> np.ndarray:
    return np.stack([index // n, index % n], axis=1)


def _cheb(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a - b).max(axis=1)


def pair_terms(tokens: np.ndarray, match: np.ndarray, target: np.ndarray, n: int,
               flagged: np.ndarray | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per sampled source token the numerator and denominator of each metric (module docstring).

    ``tokens`` (k,) source token indices (row-major on the n x n grid), ``match`` (k,) their matched target
    indices, ``target`` (n*n, 2) the ground-truth (row, col) of every source token, ``flagged`` (n*n,) bool the
    target's flagged tokens (None: the layer has no 2x2 blocks; hub_ratio terms are then all 0)."""
    own = _rc(tokens, n)
    got = _rc(match, n)
    truth = target[tokens]
    ones = np.ones(tokens.size)
    out = {"pck": ((_cheb(got, truth) <= TOLERANCE).astype(float), ones)}
    moved = _cheb(truth, own) >= MOVED
    out["position_following"] = ((moved & (_cheb(got, own) <= TOLERANCE)).astype(float), moved.astype(float))
    if flagged is None or not flagged.any():
        out["hub_ratio"] = (np.zeros(tokens.size), np.zeros(tokens.size))
    else:
        out["hub_ratio"] = (flagged[match].astype(float), np.full(tokens.size, flagged.mean()))
    return out
