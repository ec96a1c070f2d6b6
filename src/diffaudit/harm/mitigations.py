"""Training-free mitigations of the artifacts, fitted on some images' stored features and applied to others.

Each mitigation is fitted per layer on the *fit images* (the probe's training images of the run: nothing is
fitted on the images it is scored on) and then applied to any map of that layer, float32 ``(b, C, H, W)``:

``none``               the features as stored.
``position_mean``      subtract the per-position mean feature ``mu[c, y, x]`` of the fit images: what every image
                       has at a position whatever its content (the positional embedding's first moment).
``position_subspace``  project out the top-``k`` principal directions (in channel space) of the per-position mean
                       map: the rows of ``mu`` as ``H*W`` points in ``C`` dimensions, centred over positions (a
                       constant offset is not positional), their first ``k`` right singular vectors ``U``;
                       ``x <- x - U U^T x`` at every token. Removes position directions, keeps the rest of each
                       token (``k`` = ``harm.subspace_k``, at most ``min(C, H*W - 1)``).
``anomaly_inpaint``    per image, the detector's high-norm 2x2 blocks (block mean norm > ``anomalies.threshold`` x
                       the image's median token norm, :func:`diffaudit.analyses.anomalies.flagged_blocks`) are
                       replaced, channel by channel, by the median of the block's unflagged neighbours (the ring of
                       up to 12 tokens around it). Nothing is fitted: detection needs only the image itself.
``channel_mean``       the channel census of the fit images (:func:`diffaudit.analyses.channels.channel_ratios`: a
                       channel is an outlier in an image when its max |activation| exceeds
                       ``channels.ratio_threshold`` x the median channel's); the channels that are outliers in at
                       least :data:`CHANNEL_SHARE` of the fit images are set to their mean over the fit images
                       (one number per channel, all positions).
``all``                the four in the order anomaly_inpaint, channel_mean, position_subspace, position_mean, each
                       fitted on the fit images as transformed by the steps before it.

A mitigation that has nothing to act on in a layer (no outlier channel, an odd map without 2x2 blocks, a 1x1 map
without positions) says so in :attr:`Mitigation.acts_on` and :attr:`Mitigation.active` is False: the tables then
report that, rather than "no effect".

Fitting streams the fit images chunk by chunk (memory: one chunk plus the ``C x H x W`` mean), one pass per step.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..analyses.anomalies import flagged_blocks, token_norms
from ..analyses.channels import channel_ratios

MITIGATIONS: tuple[str, ...] = ("none", "position_mean", "position_subspace", "anomaly_inpaint", "channel_mean",
                                "all")
#: The steps of ``all``, in order.
ALL_STEPS: tuple[str, ...] = ("anomaly_inpaint", "channel_mean", "position_subspace", "position_mean")
#: A channel is one of the layer's outlier channels when it is an outlier in at least this share of the fit images.
CHANNEL_SHARE = 0.5


@dataclass(frozen=True)
class MitigationSettings:
    """The knobs of the mitigations: ``subspace_k`` (harm.subspace_k), ``threshold`` (anomalies.threshold),
    ``channel_ratio`` (channels.ratio_threshold)."""

    subspace_k: int = 4
    threshold: float = 2.0
    channel_ratio: float = 10.0

    def __post_init__(self):
        if int(self.subspace_k) < 1:
            raise ValueError(f"harm.subspace_k must be >= 1, got {self.subspace_k}")


Chunks = Callable[[], Iterable[np.ndarray]]


class Step:
    """One mitigation step of one layer: :meth:`fit` on chunks of the fit images, then :meth:`apply`."""

    name = ""
    active = True
    acts_on = ""

    def fit(self, chunks: Chunks) -> "Step":
        return self

    def apply(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def _mean_map(chunks: Chunks) -> tuple[np.ndarray, int]:
    total, n = None, 0
    for x in chunks():
        s = x.sum(axis=0, dtype=np.float64)
        total = s if total is None else total + s
        n += x.shape[0]
    if not n:
        raise ValueError("no fit images")
    return (total / n).astype(np.float32), n


class PositionMean(Step):
    name = "position_mean"

    def fit(self, chunks: Chunks) -> "PositionMean":
        self.mu, n = _mean_map(chunks)
        _, h, w = self.mu.shape
        self.active = h * w > 1
        self.acts_on = (f"the per-position mean of {n} fit images subtracted at {h}x{w} positions" if self.active
                        else "a 1x1 map has no positions: nothing to act on")
        return self

    def apply(self, x: np.ndarray) -> np.ndarray:
        return x - self.mu[None] if self.active else x


class PositionSubspace(Step):
    name = "position_subspace"

    def __init__(self, k: int):
        self.k = int(k)

    def fit(self, chunks: Chunks) -> "PositionSubspace":
        mu, n = _mean_map(chunks)
        c, h, w = mu.shape
        k = min(self.k, c, h * w - 1)
        self.active = k >= 1
        if not self.active:
            self.basis = np.zeros((c, 0), np.float32)
            self.acts_on = "a 1x1 map has no positions: nothing to act on"
            return self
        rows = mu.reshape(c, h * w).T.astype(np.float64)  # (positions, C)
        rows -= rows.mean(axis=0, keepdims=True)
        # the principal directions: eigenvectors of the C x C scatter matrix (cheaper than an SVD of the rows)
        val, vec = np.linalg.eigh(rows.T @ rows)
        order = np.argsort(val)[::-1]
        self.basis = vec[:, order[:k]].astype(np.float32)  # (C, k), orthonormal
        val = np.clip(val[order], 0, None)
        share = float(val[:k].sum() / max(val.sum(), 1e-30))
        self.acts_on = (f"{k} of {c} channel directions projected out ({share:.0%} of the position-mean map's "
                        f"variance over positions; fitted on {n} images)")
        return self

    def apply(self, x: np.ndarray) -> np.ndarray:
        if not self.active:
            return x
        b, c, h, w = x.shape
        flat = x.reshape(b, c, h * w)
        coef = np.einsum("ck,bct->bkt", self.basis, flat)
        return (flat - np.einsum("ck,bkt->bct", self.basis, coef)).reshape(b, c, h, w)


class AnomalyInpaint(Step):
    name = "anomaly_inpaint"

    def __init__(self, threshold: float):
        self.threshold = float(threshold)
        self.replaced = 0  # tokens replaced so far (over every apply)

    def fit(self, chunks: Chunks) -> "AnomalyInpaint":
        return self  # nothing is fitted; whether the layer has 2x2 blocks is known at the first apply

    @property
    def acts_on(self) -> str:  # type: ignore[override]
        return (f"the tokens of detected high-norm 2x2 blocks replaced by their neighbours' median ({self.replaced} "
                f"over every map it was applied to; threshold {self.threshold:g} x the image's median norm; nothing "
                "fitted)")

    def apply(self, x: np.ndarray) -> np.ndarray:
        b, c, h, w = x.shape
        if h < 2 or w < 2:
            return x
        hit = flagged_blocks(token_norms(x), self.threshold)
        if not hit.any():
            return x
        out = x.copy()
        # the ring of 12 tokens around a 2x2 block at (y0, x0): offsets from its upper-left token
        ring = np.array([(dy, dx) for dy in range(-1, 3) for dx in range(-1, 3) if not (0 <= dy < 2 and 0 <= dx < 2)])
        for i in np.flatnonzero(hit.any(axis=(1, 2))):
            # neighbours that belong to another flagged block are anomalies too: not used as the fill
            flagged = np.zeros((h, w), dtype=bool)
            flagged[: h // 2 * 2, : w // 2 * 2] = hit[i].repeat(2, axis=0).repeat(2, axis=1)
            by, bx = np.nonzero(hit[i])
            ys, xs = 2 * by[:, None] + ring[None, :, 0], 2 * bx[:, None] + ring[None, :, 1]  # (blocks, 12)
            inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
            yc, xc = np.clip(ys, 0, h - 1), np.clip(xs, 0, w - 1)
            usable = inside & ~flagged[yc, xc]
            vals = np.where(usable[:, None, :], x[i][:, yc, xc].transpose(1, 0, 2), np.nan)  # (blocks, C, 12)
            keep = usable.any(axis=1)
            if not keep.any():
                continue
            with np.errstate(all="ignore"):
                fill = np.nanmedian(vals[keep], axis=2).astype(np.float32)  # (blocks kept, C)
            for (y0, x0), f in zip(zip(2 * by[keep], 2 * bx[keep]), fill):
                out[i, :, y0:y0 + 2, x0:x0 + 2] = f[:, None, None]
            self.replaced += 4 * int(keep.sum())
        return out


class ChannelMean(Step):
    name = "channel_mean"

    def __init__(self, ratio: float):
        self.ratio = float(ratio)

    def fit(self, chunks: Chunks) -> "ChannelMean":
        count, total, n, tokens = None, None, 0, 0
        for x in chunks():
            _, r = channel_ratios(x)
            with np.errstate(invalid="ignore"):
                hits = (r > self.ratio).sum(axis=0)
            s = x.sum(axis=(0, 2, 3), dtype=np.float64)
            count = hits if count is None else count + hits
            total = s if total is None else total + s
            n += x.shape[0]
            tokens += x.shape[0] * x.shape[2] * x.shape[3]
        self.channels = np.flatnonzero(count >= CHANNEL_SHARE * n)
        self.values = (total[self.channels] / tokens).astype(np.float32)
        self.active = self.channels.size > 0
        c = count.size
        self.acts_on = (f"channels {', '.join(map(str, self.channels.tolist()))} of {c} set to their mean over "
                        f"{n} fit images" if self.active else
                        f"no channel of {c} is an outlier (> {self.ratio:g} x the median channel) in at least "
                        f"{CHANNEL_SHARE:.0%} of the {n} fit images: nothing to act on")
        return self

    def apply(self, x: np.ndarray) -> np.ndarray:
        if not self.active:
            return x
        out = x.copy()
        out[:, self.channels] = self.values[None, :, None, None]
        return out


def _step(name: str, settings: MitigationSettings) -> Step:
    if name == "position_mean":
        return PositionMean()
    if name == "position_subspace":
        return PositionSubspace(settings.subspace_k)
    if name == "anomaly_inpaint":
        return AnomalyInpaint(settings.threshold)
    if name == "channel_mean":
        return ChannelMean(settings.channel_ratio)
    raise ValueError(f"unknown mitigation step {name!r}")


@dataclass
class Mitigation:
    """A fitted mitigation of one layer (one or several steps, applied in order)."""

    name: str
    steps: list = field(default_factory=list)

    @property
    def active(self) -> bool:
        """Whether any step has something to act on (``anomaly_inpaint``: after an apply that replaced tokens)."""
        return any(s.active and (not isinstance(s, AnomalyInpaint) or s.replaced) for s in self.steps)

    @property
    def acts_on(self) -> str:
        if not self.steps:
            return "the features as stored"
        return "; ".join(f"{s.name}: {s.acts_on}" for s in self.steps)

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        for s in self.steps:
            x = s.apply(x)
        return x

    def __call__(self, layer: str, x: np.ndarray) -> np.ndarray:  # the transform of a store.StoreView
        return self.apply(x)


def fit_mitigation(name: str, chunks: Chunks, settings: MitigationSettings | None = None) -> Mitigation:
    """Fit mitigation ``name`` (one of :data:`MITIGATIONS`) of one layer. ``chunks()`` returns a fresh iterable of
    float32 ``(b, C, H, W)`` chunks of the fit images each time it is called (one pass per step)."""
    settings = settings or MitigationSettings()
    if name not in MITIGATIONS:
        raise ValueError(f"unknown mitigation {name!r}; use one of {', '.join(MITIGATIONS)}")
    names: Sequence[str] = () if name == "none" else ALL_STEPS if name == "all" else (name,)
    steps: list[Step] = []
    for step_name in names:
        done = list(steps)

        def transformed(done=done):
            for x in chunks():
                for s in done:
                    x = s.apply(x)
                yield x

        steps.append(_step(step_name, settings).fit(transformed))
    return Mitigation(name, steps)


def fit_store_mitigations(store, layer: str, fit_images: Sequence[int], names: Sequence[str] = MITIGATIONS,
                          settings: MitigationSettings | None = None, chunk_images: int = 10
                          ) -> dict[str, Mitigation]:
    """Every mitigation in ``names`` fitted on ``fit_images`` (indices into ``store``) of ``layer``."""
    from ..store import StoreView

    view = StoreView(store, fit_images)

    def chunks():
        for _, x in view.iter_chunks(layer, chunk_images=chunk_images):
            yield x

    return {name: fit_mitigation(name, chunks, settings) for name in names}
