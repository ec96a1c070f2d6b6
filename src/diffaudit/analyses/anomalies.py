"""High-norm anomalies: relative token norm of labelled 2x2 patches across layers, label files, a detector.

Labels (docs/method.md §3.3.1) are int arrays of shape (K, 3) with rows ``(image_index, x, y)``, x = column
and y = row on the 32 x 32 grid of ``up_blocks[1].upsamplers[0]`` (the reference layer), each the upper-left token
of an even-aligned 2 x 2 patch, as in the authors' ``high_norm_anomalies_{model}.npy`` files.

Relative norm of one label at a layer with map R (C, h, w), float32 (:func:`relative_norms`)::

    scale = h / H_ref;  r0 = int(y*scale);  c0 = int(x*scale);  k = max(1, int(2*scale))
    patch = R[:, r0:r0+k, c0:c0+k]
    paper:      rel_norm = mean_{patch} |token|_2 / mean_{all h*w tokens} |token|_2   (denominator includes patch)
    corrected:  rel_norm = mean_{patch} |token|_2 / mean_{tokens outside the patch} |token|_2

i.e. a 4x4 patch at 64-res layers, the labelled 2x2 patch at 32-res, the single source token at 16-res and token
(y//4, x//4) at 8-res. Per layer the mean and the population std (ddof=0, as ``np.std``) over all labels are
reported. Index 30 (the labelled layer) is selection-biased: anomalies were picked there for their high norm.

Besides the columns shared with the published table (:data:`RELNORM_COLUMNS`), every row carries the label set's
prevalence counts (:data:`PREVALENCE_COLUMNS`): ``n_images`` (images in the store) and ``n_images_with_anomalies``
(images with at least one label), the same for every layer of a source; the credibility score's anomaly axis is
prevalence x severity (``docs/credibility.md``). Last come ``rel_norm_ci_low`` and ``rel_norm_ci_high``
(:data:`CI_COLUMNS`), the percentile bootstrap interval of ``rel_norm_mean`` over images (docs/method.md §3.7):
a resample draws the store's images with replacement and every drawn image brings all its labels, so the
resampled mean is (sum of the drawn images' relative norms) / (number of their labels); resamples that draw no
labelled image are left out. NaN without labels (or where ``rel_norm_mean`` is NaN).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DiffauditError, UserError
from ..store import ReprStore
from ..tables import ANOMALY_CI_COLUMNS, ANOMALY_PREVALENCE_COLUMNS, ANOMALY_TABLE_COLUMNS, RELNORM_COLUMNS  # noqa: F401
from .bootstrap import Bootstrap

REF_LAYER = "up_blocks[1].upsamplers[0]"
DEFAULT_REF_GRID = 32
# RELNORM_COLUMNS (the published table's), PREVALENCE_COLUMNS (appended by relative_norms: the published table has
# no per-image counts), CI_COLUMNS (then the bootstrap interval over images of rel_norm_mean) and
# ANOMALY_TABLE_COLUMNS are the schemas of diffaudit.tables.
PREVALENCE_COLUMNS = ANOMALY_PREVALENCE_COLUMNS
CI_COLUMNS = ANOMALY_CI_COLUMNS
MODES = ("paper", "corrected")


class LabelFileError(DiffauditError, ValueError):
    """A label file (or label array) is malformed."""


# ---------------------------------------------------------------------------------------------
# Label files
# ---------------------------------------------------------------------------------------------

def validate_labels(labels, *, n_images: int | None = None, grid: int = DEFAULT_REF_GRID,
                    source: str = "labels") -> np.ndarray:
    """Check a (K, 3) integer ``(image, x, y)`` array; return it as int64. Errors are one line naming ``source``."""
    arr = np.asarray(labels)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise LabelFileError(f"{source}: expected an array of shape (K, 3) with rows (image, x, y), "
                             f"got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise LabelFileError(f"{source}: expected an integer array, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.shape[0] == 0:
        return arr
    img, xy = arr[:, 0], arr[:, 1:]
    if (img < 0).any():
        raise LabelFileError(f"{source}: negative image index {int(img.min())}")
    if n_images is not None and (img >= n_images).any():
        raise LabelFileError(f"{source}: image index {int(img.max())} out of range for {n_images} images")
    bad = (xy < 0) | (xy > grid - 2)
    if bad.any():
        r = int(np.argwhere(bad.any(axis=1))[0, 0])
        raise LabelFileError(f"{source}: coordinates (x={arr[r, 1]}, y={arr[r, 2]}) in row {r} outside "
                             f"[0, {grid - 2}] (upper-left token of a 2x2 patch on the {grid}x{grid} grid)")
    odd = (xy % 2) != 0
    if odd.any():
        r = int(np.argwhere(odd.any(axis=1))[0, 0])
        raise LabelFileError(f"{source}: odd coordinates (x={arr[r, 1]}, y={arr[r, 2]}) in row {r}; labels mark "
                             "the upper-left token of an even-aligned 2x2 patch")
    return arr


def load_label_file(path, n_images: int | None = None, grid: int = DEFAULT_REF_GRID) -> np.ndarray:
    """Load and validate a ``.npy`` label file (no pickles): int64 (K, 3) rows ``(image, x, y)``."""
    path = Path(path)
    if path.suffix != ".npy":
        raise LabelFileError(f"{path}: label files must be .npy arrays of shape (K, 3), got suffix "
                             f"{path.suffix or '(none)'!r}")
    if not path.is_file():
        raise LabelFileError(f"{path}: label file does not exist")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as e:  # object arrays need pickle, which we refuse
        raise LabelFileError(f"{path}: not a plain numeric .npy array ({str(e).splitlines()[0]})") from None
    except Exception as e:  # noqa: BLE001 - any unreadable file is one clear error
        raise LabelFileError(f"{path}: cannot read as .npy ({type(e).__name__}: {str(e).splitlines()[0]})") \
            from None
    return validate_labels(arr, n_images=n_images, grid=grid, source=str(path))


# ---------------------------------------------------------------------------------------------
# Relative norms
# ---------------------------------------------------------------------------------------------

def reference_grid(store: ReprStore, ref_layer: str = REF_LAYER) -> int:
    """H_ref, the height of the grid the labels live on.

    The height of ``ref_layer`` if the store has it; otherwise ``image_size // 16`` from the store attributes
    (the reference layer has a 16 px token), and 32 (512 px images) if the store does not record its image size.
    """
    if ref_layer in store.layers:
        return int(store.shape(ref_layer)[2])
    size = store.attrs.get("image_size") or store.attrs.get("config", {}).get("image_size")
    return int(size) // 16 if size else DEFAULT_REF_GRID


def _runs(indices: np.ndarray) -> list[tuple[int, int]]:
    """Sorted unique indices -> list of half-open contiguous runs [start, stop)."""
    if indices.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(indices) != 1)
    starts = np.r_[indices[0], indices[breaks + 1]]
    stops = np.r_[indices[breaks], indices[-1]] + 1
    return list(zip(starts.tolist(), stops.tolist()))


def _token_norms(chunk: np.ndarray) -> np.ndarray:
    """(b, C, h, w) float32 -> (b, h, w) float32 L2 norms over channels."""
    return np.sqrt(np.einsum("bchw,bchw->bhw", chunk, chunk, dtype=np.float32))


def relative_norms(store: ReprStore, labels, layers: list[str] | None = None, ref_layer: str = REF_LAYER,
                   mode: str = "paper", label_source: str = "paper", model_name: str = "",
                   chunk_images: int = 20, progress: bool = False, bootstrap: Bootstrap | None = None,
                   ref_grid: int | None = None, image_records: list | None = None) -> pd.DataFrame:
    """Mean and std (ddof=0) over labels of the patch's relative token norm, per layer (module docstring).

    Columns :data:`ANOMALY_TABLE_COLUMNS`: the shared :data:`RELNORM_COLUMNS`, then ``n_images`` (the store's
    images) and ``n_images_with_anomalies`` (distinct labelled images), the label set's prevalence counts, then
    ``rel_norm_ci_low, rel_norm_ci_high``, the ``bootstrap`` interval of the mean over the store's images (default
    ``Bootstrap()``; module docstring).
    Only images that carry labels are read, in contiguous runs of ``chunk_images`` images, one layer at a
    time: memory is O(chunk_images * C * h * w). ``H_ref`` is ``ref_grid`` when given (the grid the labels were
    made on, e.g. another run's), else :func:`reference_grid`.
    ``image_records``, a list, collects per layer every image's sum of relative norms and number of labels
    (quantity ``rel_norm``, records of :func:`diffaudit.analyses.paired.per_image_frame`), the input of the
    experiments' paired comparison.
    """
    return relative_norms_modes(store, labels, (mode,), layers, ref_layer, label_source, model_name, chunk_images,
                                progress, bootstrap, ref_grid, image_records)[mode]


def relative_norms_modes(store: ReprStore, labels, modes=MODES, layers: list[str] | None = None,
                         ref_layer: str = REF_LAYER, label_source: str = "paper", model_name: str = "",
                         chunk_images: int = 20, progress: bool = False, bootstrap: Bootstrap | None = None,
                         ref_grid: int | None = None, image_records: list | None = None) -> dict[str, pd.DataFrame]:
    """:func:`relative_norms` in several modes from ONE pass over the store: ``{mode: table}``.

    The modes differ only in the denominator computed from the same patch and image sums, so the paper-mode
    table and the corrected-mode one (the credibility score's input, free of the patch-in-denominator quirk)
    cost one read of the store; each mode's table is the one :func:`relative_norms` writes alone.
    ``image_records`` collects the per-image terms (as :func:`relative_norms`) in the first mode."""
    modes = tuple(modes)
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown relative-norm mode {mode!r}; use one of {MODES}")
    h_ref = reference_grid(store, ref_layer) if ref_grid is None else int(ref_grid)
    labels = validate_labels(labels, n_images=store.n_images, grid=h_ref)
    layers = store.select_layers(layers)
    images = np.unique(labels[:, 0])
    by_image = {int(i): labels[labels[:, 0] == i] for i in images}
    runs = _runs(images)
    prevalence = (int(store.n_images), int(images.size))
    boot = Bootstrap() if bootstrap is None else bootstrap
    label_count = np.bincount(labels[:, 0], minlength=store.n_images).astype(np.float64)  # the ratio's denominator

    it = layers
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(layers, desc=f"anomaly norms {model_name}".strip())
    rows: dict[str, list] = {mode: [] for mode in modes}
    for layer in it:
        _, c, h, w = store.shape(layer)
        scale = h / h_ref
        k = max(1, int(2 * scale))
        values: dict[str, list[float]] = {mode: [] for mode in modes}
        value_image: list[int] = []
        for start, stop in runs:
            for i0, chunk in store.iter_chunks(layer, chunk_images=chunk_images, start=start, stop=stop,
                                               dtype=np.float32):
                norms = _token_norms(chunk)
                for b in range(chunk.shape[0]):
                    img = i0 + b
                    if img not in by_image:
                        continue
                    nm = norms[b]
                    total = float(nm.sum(dtype=np.float64))
                    for _, x, y in by_image[img]:
                        r0, c0 = int(y * scale), int(x * scale)
                        patch = nm[r0:r0 + k, c0:c0 + k]
                        p_sum, p_cnt = float(patch.sum(dtype=np.float64)), patch.size
                        for mode in modes:
                            if mode == "paper":
                                denom = total / (h * w)
                            else:
                                rest = h * w - p_cnt
                                denom = (total - p_sum) / rest if rest > 0 else np.nan
                            values[mode].append((p_sum / p_cnt) / denom if denom else np.nan)
                        value_image.append(img)
        for mode in modes:
            v = np.asarray(values[mode], dtype=np.float64)
            mean = float(np.mean(v)) if v.size else np.nan
            ci = (np.nan, np.nan)
            per_image = np.bincount(np.asarray(value_image, dtype=np.int64), weights=v, minlength=store.n_images)
            if np.isfinite(mean):
                ci = tuple(float(b) for b in boot.ratio_interval(per_image, label_count))
            if image_records is not None and mode == modes[0]:
                image_records.append({"layer": layer, "spatial": int(h), "quantity": "rel_norm",
                                      "label_source": label_source, "images": np.arange(store.n_images),
                                      "num": per_image, "den": label_count})
            rows[mode].append((model_name, store.layer_index(layer), layer, int(c), int(h), label_source,
                               mean, float(np.std(v)) if v.size else np.nan, int(v.size), *prevalence, *ci))
    return {mode: pd.DataFrame(r, columns=ANOMALY_TABLE_COLUMNS) for mode, r in rows.items()}


# ---------------------------------------------------------------------------------------------
# Automatic detection
# ---------------------------------------------------------------------------------------------

def flagged_blocks(norms: np.ndarray, threshold: float = 2.0) -> np.ndarray:
    """The detector's rule on token norms ``(b, h, w)``: bool ``(b, h // 2, w // 2)``, True for an even-aligned
    2x2 block whose mean norm exceeds ``threshold`` times the image's median token norm (an odd last row or
    column belongs to no block). The one definition of a detected anomaly (:func:`detect_anomalies`, the
    harm metrics' hubs and the ``anomaly_inpaint`` mitigation, :mod:`diffaudit.harm`)."""
    b, h, w = norms.shape
    med = np.median(norms.reshape(b, -1), axis=1)
    blocks = norms[:, : h // 2 * 2, : w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
    return blocks > threshold * med[:, None, None]


def flagged_tokens(norms: np.ndarray, threshold: float = 2.0) -> np.ndarray:
    """:func:`flagged_blocks` as a token mask ``(b, h, w)``: the four tokens of every flagged block."""
    b, h, w = norms.shape
    out = np.zeros((b, h, w), dtype=bool)
    if h >= 2 and w >= 2:
        blocks = flagged_blocks(norms, threshold)
        out[:, : h // 2 * 2, : w // 2 * 2] = blocks.repeat(2, axis=1).repeat(2, axis=2)
    return out


def token_norms(chunk: np.ndarray) -> np.ndarray:
    """(b, C, h, w) float32 -> (b, h, w) float32 L2 norms over channels."""
    return _token_norms(chunk)


def detect_anomalies(store: ReprStore, layer: str = REF_LAYER, threshold: float = 2.0, chunk_images: int = 20,
                     progress: bool = False) -> np.ndarray:
    """Automatically label high-norm 2x2 patches; int64 (K, 3) rows ``(image, x, y)`` like the hand labels.

    Rule, per image of ``layer`` (the labelled layer by default): compute the L2 norm of every token, average the
    norms over each even-aligned 2x2 block, and flag a block when its mean norm exceeds ``threshold`` times the
    image's median token norm. The block is reported by its upper-left token (x = column, y = row, both even),
    sorted by (image, x, y).

    Default threshold 2.0: the anomalies the authors labelled at this layer have mean relative norms of 3.8
    (SD-1.5) and 2.6 (SD-Turbo) times the image's MEAN token norm (docs/method.md §3.3.3), and the median of the
    right-skewed norm map is at most about its mean, so 2x the median catches the typical labelled anomaly while a
    smooth norm map (spread well below 2x) yields no block. The median makes the reference robust to the
    anomalies themselves. Weak anomalies (SD-2.1's labels are only 1.5x the mean) need a lower threshold.

    Streams over image chunks: memory O(chunk_images * C * H * W).
    """
    if layer not in store.layers:
        raise KeyError(f"layer {layer!r} not in store {store.path} (has {store.layers})")
    _, _, h, w = store.shape(layer)
    if h % 2 or w % 2:
        raise UserError(f"detect_anomalies needs an even-sized map for 2x2 blocks, {layer!r} is {h}x{w}; choose another anomalies.ref_layer")
    it = store.iter_chunks(layer, chunk_images=chunk_images, dtype=np.float32)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=-(-store.n_images // chunk_images), desc="detect anomalies")
    found = []
    for i0, chunk in it:
        hit = flagged_blocks(_token_norms(chunk), threshold)
        bi, by, bx = np.nonzero(hit)
        found.append(np.stack([bi + i0, 2 * bx, 2 * by], axis=1))
    out = np.concatenate(found).astype(np.int64) if found else np.zeros((0, 3), np.int64)
    if out.size:
        out = out[np.lexsort((out[:, 2], out[:, 1], out[:, 0]))]
    return out.reshape(-1, 3)


#: Fewest channels of a candidate reference layer for ``ref_layer: auto``.
AUTO_REF_MIN_CHANNELS = 32


def strongest_outlier_layer(store: ReprStore, chunk_images: int = 20) -> str:
    """``anomalies.ref_layer: auto``: the layer whose high-norm 2x2 blocks stand out most, for models without a
    labelled layer (other families, own pipelines). Score of a layer: the mean over images of (largest even-aligned
    2x2 block mean token norm) / (the image's median token norm), the quantity :func:`detect_anomalies` thresholds.
    Candidates: layers with even-sized maps of at least 4x4 tokens and at least :data:`AUTO_REF_MIN_CHANNELS`
    channels (not the 4- or 16-channel latent-space outputs such as ``conv_out``); ties go to the earlier layer."""
    best, best_score = None, -np.inf
    for layer in store.layers:
        _, c, h, w = store.shape(layer)
        if h % 2 or w % 2 or min(h, w) < 4 or c < AUTO_REF_MIN_CHANNELS:
            continue
        scores = []
        for _, chunk in store.iter_chunks(layer, chunk_images=chunk_images, dtype=np.float32):
            norms = _token_norms(chunk)
            b = norms.shape[0]
            med = np.median(norms.reshape(b, -1), axis=1)
            top = norms.reshape(b, h // 2, 2, w // 2, 2).mean(axis=(2, 4)).reshape(b, -1).max(axis=1)
            scores.append(top / np.maximum(med, np.finfo(np.float32).tiny))
        score = float(np.concatenate(scores).mean())
        if score > best_score:
            best, best_score = layer, score
    if best is None:
        raise UserError(f"anomalies.ref_layer auto: no layer of {store.path} has an even-sized map of at least 4x4 "
                        f"tokens and {AUTO_REF_MIN_CHANNELS} channels; set anomalies.ref_layer to a layer name")
    return best


def precision_recall(detected, reference) -> dict:
    """Exact-match agreement on ``(image, x, y)``; precision/recall/f1 are NaN when undefined (0/0)."""
    det = {tuple(int(v) for v in r) for r in np.asarray(detected).reshape(-1, 3)}
    ref = {tuple(int(v) for v in r) for r in np.asarray(reference).reshape(-1, 3)}
    m = len(det & ref)
    p = m / len(det) if det else float("nan")
    r = m / len(ref) if ref else float("nan")
    if np.isnan(p) or np.isnan(r):
        f1 = float("nan")
    else:
        f1 = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return {"precision": p, "recall": r, "f1": f1, "n_detected": len(det), "n_reference": len(ref),
            "n_matched": m}
