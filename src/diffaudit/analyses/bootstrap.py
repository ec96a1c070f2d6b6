"""Percentile bootstrap over images: the uncertainty intervals of the per-layer tables (docs/method.md §3.7).

The unit of resampling is the image. Every analysis first reduces its data to a few numbers per image (the probe:
the fraction of the image's test tokens predicted right; the similarity: the image's group pair sums; the
anomalies: the sum and the number of the image's relative norms), and the bootstrap only resamples those
per-image aggregates, never the tokens, so it costs one small matrix product per layer however large the maps are.

One resample draws ``n`` images with replacement out of ``n`` (``numpy.random.default_rng(seed).integers``) and is
kept as the (n,) vector of multiplicities; ``n_resamples`` of them form the weight matrix ``W`` (B, n). A
statistic that is a mean over images is then ``W @ values / n`` for all resamples at once, a ratio of sums over
images ``(W @ num) / (W @ den)``. The interval is the percentile interval at ``level``: the ``(1 - level) / 2``
and ``(1 + level) / 2`` quantiles (numpy's default linear interpolation) of the B resampled statistics.
Resamples in which a statistic is undefined (0/0: no image of a subset drawn) are left out of its quantiles.

``W`` depends only on ``(seed, n_resamples, n)``: every layer (and every analysis with the same number of images)
sees the same resamples, so a layer's interval does not depend on which other layers ran, two runs with the same
seed give identical intervals, and the bands of neighbouring layers are drawn from common random numbers. Two
runs on the same images (the baseline and an experiment) see the same resamples too: the difference of their
statistics, resample by resample, gives the paired interval of :meth:`Bootstrap.paired_difference`.
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@functools.lru_cache(maxsize=16)
def _weights(seed: int, n_resamples: int, n: int) -> np.ndarray:
    if n == 0:
        out = np.zeros((n_resamples, 0))
    else:
        idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
        flat = (idx + n * np.arange(n_resamples)[:, None]).ravel()
        out = np.bincount(flat, minlength=n_resamples * n).reshape(n_resamples, n).astype(np.float64)
    out.flags.writeable = False
    return out


@dataclass(frozen=True)
class Bootstrap:
    """Percentile bootstrap over images: ``n_resamples`` resamples, interval at ``level``, generator ``seed``
    (the ``bootstrap`` section of the configuration)."""

    n_resamples: int = 1000
    level: float = 0.95
    seed: int = 0

    def __post_init__(self):
        if int(self.n_resamples) < 1:
            raise ValueError(f"bootstrap.n_resamples must be >= 1, got {self.n_resamples}")
        if not 0.0 < float(self.level) < 1.0:
            raise ValueError(f"bootstrap.level must be in (0, 1), got {self.level}")
        if int(self.seed) < 0:
            raise ValueError(f"bootstrap.seed must be >= 0, got {self.seed}")

    @classmethod
    def from_config(cls, section: Mapping) -> Bootstrap:
        """From the ``bootstrap`` config section (``n_resamples``, ``level``, ``seed``)."""
        return cls(int(section["n_resamples"]), float(section["level"]), int(section["seed"]))

    # -- resamples --------------------------------------------------------------------------------

    def weights(self, n: int) -> np.ndarray:
        """(n_resamples, n) float64 multiplicities of the ``n`` images in each resample (each row sums to n);
        read-only and cached, the same for every call with this seed and ``n``."""
        return _weights(int(self.seed), int(self.n_resamples), int(n))

    def ratio_resamples(self, num, den, weights: np.ndarray | None = None) -> np.ndarray:
        """Resampled ratios of sums over images, ``sum num / sum den``: (B, ...) for ``num`` and ``den`` of shape
        (n, ...) (one row per image); NaN where the resampled denominator is 0. ``weights`` (B, n) replaces the
        resamples (:meth:`paired_difference` passes all ones for the estimate itself)."""
        num = np.asarray(num, dtype=np.float64)
        den = np.broadcast_to(np.asarray(den, dtype=np.float64), num.shape)
        w = self.weights(num.shape[0]) if weights is None else weights
        flat = num.shape[0], -1
        top = (w @ num.reshape(flat)).reshape((w.shape[0], *num.shape[1:]))
        bottom = (w @ den.reshape(flat)).reshape(top.shape)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(bottom != 0, top / np.where(bottom != 0, bottom, 1.0), np.nan)

    def mean_resamples(self, values) -> np.ndarray:
        """Resampled means over images: (B, ...) for ``values`` of shape (n, ...)."""
        values = np.asarray(values, dtype=np.float64)
        return self.ratio_resamples(values, np.ones(values.shape[0])[(...,) + (None,) * (values.ndim - 1)])

    def subset_mean_resamples(self, n: int, subsets: Sequence[tuple[Sequence[int], np.ndarray]],
                              weights: np.ndarray | None = None) -> np.ndarray:
        """Resampled mean over subsets of each subset's mean over its images, the images resampled jointly.

        ``n`` images (a pool) are resampled together; ``subsets`` lists ``(positions, values)`` with the
        positions (into the pool) of a subset's images and their values (len(positions), ...). For every resample
        each subset's mean is the multiplicity-weighted mean over its images (NaN if none was drawn), then the
        subsets' means are averaged. Returns (B, ...). With one subset covering the whole pool this is
        :meth:`mean_resamples`. ``weights`` (B, n) replaces the resamples, as in :meth:`ratio_resamples`.
        """
        w = self.weights(n) if weights is None else weights
        out = None
        for pos, values in subsets:
            values = np.asarray(values, dtype=np.float64)
            ws = w[:, np.asarray(pos, dtype=np.int64)]
            top = (ws @ values.reshape(values.shape[0], -1)).reshape((w.shape[0], *values.shape[1:]))
            bottom = ws.sum(axis=1).reshape((-1,) + (1,) * (values.ndim - 1))
            with np.errstate(divide="ignore", invalid="ignore"):
                mean = np.where(bottom > 0, top / np.where(bottom > 0, bottom, 1.0), np.nan)
            out = mean if out is None else out + mean
        if out is None:
            raise ValueError("no subsets")
        return out / len(subsets)

    def paired_difference(self, n: int, statistic: Callable[[np.ndarray], np.ndarray]
                          ) -> tuple[float, float, float]:
        """``(difference, ci_low, ci_high)`` of a difference between two runs on the same ``n`` images.

        ``statistic(weights)`` maps a (B, n) weight matrix to the (B,) differences (one run's statistic minus the
        other's, both computed with the same weights). The estimate is the statistic with every weight 1 (the
        images as they are); the interval is the percentile interval of the statistic under this bootstrap's
        resamples, so both runs see the same resampled images in each resample (a paired bootstrap)."""
        est = float(np.asarray(statistic(np.ones((1, int(n)))), dtype=np.float64).reshape(-1)[0])
        lo, hi = self.interval(np.asarray(statistic(self.weights(n)), dtype=np.float64))
        return est, float(lo), float(hi)

    # -- intervals --------------------------------------------------------------------------------

    def interval(self, resamples) -> tuple[np.ndarray, np.ndarray]:
        """Percentile interval over axis 0 of resampled statistics (B, ...): ``(low, high)`` of shape (...);
        non-finite resamples are left out, NaN where none is finite."""
        r = np.asarray(resamples, dtype=np.float64)
        q = ((1.0 - self.level) / 2.0, (1.0 + self.level) / 2.0)
        if np.isfinite(r).all():
            lo, hi = np.quantile(r, q, axis=0)
        else:
            r = np.where(np.isfinite(r), r, np.nan)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns -> NaN
                lo, hi = np.nanquantile(r, q, axis=0)
        return lo, hi

    def mean_interval(self, values) -> tuple[np.ndarray, np.ndarray]:
        """Interval of the mean over images of ``values`` (n, ...)."""
        return self.interval(self.mean_resamples(values))

    def ratio_interval(self, num, den) -> tuple[np.ndarray, np.ndarray]:
        """Interval of the ratio of sums over images ``sum num / sum den`` (both (n, ...))."""
        return self.interval(self.ratio_resamples(num, den))
