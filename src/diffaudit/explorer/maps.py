"""The explorer's building blocks shared by its data layer (:mod:`.data`) and its harm views (:mod:`.harm`): the
per-token metrics, the request error, array encoding and a run of a results directory."""
from __future__ import annotations

import base64
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DiffauditError
from ..layout import FULL
from ..store import ReprStore, open_variant

METRICS = ("cosine", "centred_cosine", "dot", "l2", "rel_norm")


class RequestError(DiffauditError, ValueError):
    """A request the explorer cannot answer (bad parameter, unknown model/layer); becomes a 4xx."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------------------------
# Metrics (numpy, float32): the same functions the tests compare the browser against
# ---------------------------------------------------------------------------------------------

def _norms(x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("chw,chw->hw", x, x, dtype=np.float32))


def similarity(rep: np.ndarray, ref: np.ndarray, metric: str, ref_image_mean: np.ndarray | None = None
               ) -> np.ndarray:
    """``metric`` of the reference token ``ref`` (C,) against every token of ``rep`` (C, H, W) -> (H, W) float32.

    ``ref_image_mean`` (C,): the mean token of the reference's own image (``centred_cosine`` only).
    """
    x = np.asarray(rep, dtype=np.float32)
    r = np.asarray(ref, dtype=np.float32).reshape(-1)
    if metric == "centred_cosine":
        x = x - x.mean(axis=(1, 2), dtype=np.float32)[:, None, None]
        r = r - np.asarray(ref_image_mean, dtype=np.float32)
        metric = "cosine"
    if metric == "cosine":
        dot = np.einsum("chw,c->hw", x, r, dtype=np.float32)
        denom = _norms(x) * np.float32(np.linalg.norm(r))
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(denom > 0, dot / np.where(denom > 0, denom, 1), 0.0)
        return np.clip(out, -1, 1).astype(np.float32)
    if metric == "dot":
        return np.einsum("chw,c->hw", x, r, dtype=np.float32)
    if metric == "l2":
        d = x - r[:, None, None]
        return _norms(d)
    if metric == "rel_norm":
        rn = np.float32(np.linalg.norm(r))
        n = _norms(x)
        return (n / rn if rn > 0 else np.zeros_like(n)).astype(np.float32)
    raise RequestError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")


def detect_blocks(rep: np.ndarray, threshold: float) -> np.ndarray:
    """The automatic detector of :func:`diffaudit.analyses.anomalies.detect_anomalies` on one image's map
    (C, H, W): int64 (K, 2) rows ``(x, y)`` (upper-left token of each flagged even-aligned 2x2 block)."""
    n = _norms(np.asarray(rep, dtype=np.float32))
    h, w = n.shape
    if h % 2 or w % 2:
        return np.zeros((0, 2), np.int64)
    med = np.median(n.reshape(-1))
    blocks = n.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    by, bx = np.nonzero(blocks > threshold * med)
    out = np.stack([2 * bx, 2 * by], axis=1).astype(np.int64)
    return out[np.lexsort((out[:, 1], out[:, 0]))] if out.size else out.reshape(0, 2)


def _f(x) -> float | None:
    """A float for JSON, None when not finite (an overflowing float16 activation)."""
    x = float(x)
    return x if np.isfinite(x) else None


def encode(a: np.ndarray) -> str:
    """float32 array -> base64 of its little-endian bytes (the page decodes it into a Float32Array)."""
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode("ascii")


def decode(s: str, shape) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype="<f4").reshape(shape)


# ---------------------------------------------------------------------------------------------
# The results directory
# ---------------------------------------------------------------------------------------------

@dataclass
class Run:
    model: str
    name: str  # "baseline" or the experiment's name
    dirs: list[Path]
    analysis_dir: Path  # where the run's tables are
    _store: ReprStore | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _arrays: dict = field(default_factory=dict)

    @property
    def store(self) -> ReprStore:
        with self._lock:
            if self._store is None:
                self._store = open_variant(self.dirs, FULL)
            return self._store

    def array(self, layer: str):
        """The layer's array, opened once (opening reads the group's metadata)."""
        arr = self._arrays.get(layer)
        if arr is None:
            arr = self._arrays.setdefault(layer, self.store.array(layer))
        return arr


