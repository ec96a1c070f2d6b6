"""Harm-task pairs: image pairs whose dense correspondence is known exactly, written as a dataset in the usual
format (:mod:`diffaudit.datasets`) so that the run's extraction runs on them unchanged.

:func:`build_pairs` reads the run's dataset and writes ``out_dir`` (``images/``, ``index.csv``, ``dataset.json``)
with the images to extract, plus ``pairs.csv`` (one row per pair) and, with the stereo task,
``stereo_disparity.npy``. :func:`ground_truth` turns one pair into a token correspondence on a square grid of
``grid x grid`` tokens over an ``image_size`` image (token pitch ``p = image_size / grid`` px). The tasks:

``flip``
    Source: image ``i`` of the run's dataset itself (already extracted in the baseline store, so only the target
    is written); target: its horizontal mirror. Source token ``(y, x)`` corresponds to target ``(y, grid-1-x)``;
    every token is valid.
``shift``
    With ``s = shift_pixels(shift, size) = round(shift * size)`` px, image ``i`` is resized (PIL bicubic) to
    ``(size+s) x (size+s)``; window A takes rows/cols ``[0, size)``, window B rows/cols ``[s, s+size)`` (a diagonal
    shift). Both windows are written; A is the source, B the target, and B's pixel ``(y, x)`` is A's pixel
    ``(y+s, x+s)``. On a grid the shift is ``k = s / p`` tokens: when that is not a whole number no token is
    valid (the note says so); otherwise A ``(y, x)`` corresponds to B ``(y-k, x-k)``, valid when ``y >= k`` and
    ``x >= k`` (the other tokens of A lie outside B).
``stereo``
    One rectified real pair: the Middlebury 2014 Motorcycle scene as shipped (down-sampled 4x) with
    scikit-image (``skimage.data.stereo_motorcycle``; no download), left = source, right = target. Both images
    are resized (PIL bicubic) so the shorter side is ``size`` and the same centred ``size x size`` window is
    cropped from both (the pair is 741 x 500 px, so sizes above 500 enlarge it). The ground-truth disparity
    ``d`` is resampled to the resized grid by nearest neighbour (so invalid values never blend), multiplied by
    the horizontal scale and cropped alike; a left pixel
    ``(y, x)`` then corresponds to the right pixel ``(y, x - d)`` in crop coordinates. ``d`` is NaN where the
    benchmark has no ground truth (stored as ``inf`` there: occlusions, missing data) and where ``x - d`` falls
    outside ``[0, size)``. On a grid, a left token is valid when at least half of its pixels have a valid ``d``;
    its target is the right token in the same row and column ``floor(mean(x - d) / p)`` over those pixels, and
    the token is invalid when that column is outside ``[0, grid)``.

``pairs.csv`` columns: ``pair`` (0, 1, ...), ``task``, ``source_image`` (the run dataset's image id for flip and
shift, empty for stereo), ``source_store`` (``base``: ``source_index`` indexes the run's baseline store, i.e.
its dataset; ``pairs``: it indexes ``out_dir``'s own images), ``source_index``, ``target_index`` (always into
``out_dir``'s images) and ``shift_px`` (shift only, else 0). ``index.csv``'s ``source`` names each image
(``flip:<id>``, ``shiftA:<id>``, ``shiftB:<id>``, ``stereo:left``, ``stereo:right``); labels are the source
image's label (``-1``, the format's "unknown", for the stereo pair), and the label names are the run dataset's,
so a prompt that names the class is the same as in the baseline extraction.
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ..datasets.format import (DatasetError, _check_int, _DatasetWriter, _expected_size, load_index,
                               load_label_names)
from ..datasets.images import load_images

TASKS = ("flip", "shift", "stereo")
PAIRS_TABLE = "pairs.csv"
DISPARITY_FILE = "stereo_disparity.npy"
PAIRS_COLUMNS = ("pair", "task", "source_image", "source_store", "source_index", "target_index", "shift_px")
STEREO_PAIR = ("Middlebury 2014 Motorcycle (Scharstein et al., GCPR 2014), the 4x down-sampled left/right images "
               "and ground-truth disparity shipped with scikit-image as skimage.data.stereo_motorcycle()")
STEREO_TRANSFORM = ("resize both images (PIL bicubic) so the shorter side is size, crop the centred size x size "
                    "window; disparity resized by nearest neighbour, times the horizontal scale, cropped alike; "
                    "NaN where the benchmark has none (inf) or where x - d is outside [0, size)")


def shift_pixels(shift: float, image_size: int) -> int:
    """The shift task's offset in pixels, ``round(shift * image_size)``; :class:`DatasetError` unless
    ``0 < s < image_size``."""
    image_size = _check_int(image_size, "image_size", 1)
    if isinstance(shift, bool) or not isinstance(shift, (int, float, np.integer, np.floating)) \
            or not math.isfinite(shift):
        raise DatasetError(f"shift must be a finite number (a fraction of the image side), got {shift!r}")
    s = int(round(float(shift) * image_size))
    if s <= 0 or s >= image_size:
        raise DatasetError(f"shift={shift!r} gives {s} px on a {image_size} px image; it must be between 1 and "
                           f"{image_size - 1} px")
    return s


def _check_tasks(tasks) -> tuple[str, ...]:
    if isinstance(tasks, str):
        tasks = (tasks,)
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise DatasetError(f"unknown harm task(s) {', '.join(map(repr, unknown))} (expected some of "
                           f"{', '.join(TASKS)})")
    if len(set(tasks)) != len(tasks):
        raise DatasetError(f"harm tasks repeat: {', '.join(tasks)}")
    return tuple(t for t in TASKS if t in tasks)  # canonical order: the output does not depend on the order given


def _check_images(images, n: int, dataset_dir: Path, needed: bool) -> list[int]:
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
        raise DatasetError(f"images must be a sequence of 0-based image indices, got {type(images).__name__}")
    out = [_check_int(i, "images[]", 0) for i in images]
    bad = [i for i in out if i >= n]
    if bad:
        raise DatasetError(f"images {bad[:5]} out of range: {dataset_dir} has {n} images (indices 0..{n - 1})")
    if len(set(out)) != len(out):
        raise DatasetError(f"images repeat an index: {out}")
    if needed and not out:
        raise DatasetError("images is empty: the flip and shift tasks need at least one source image")
    return out


def _stereo_pair(size: int) -> tuple[Image.Image, Image.Image, np.ndarray, dict]:
    """Left and right ``size x size`` crops and the disparity in crop coordinates (float32, NaN invalid)."""
    import skimage.data  # the pair ships in scikit-image's wheel; nothing is downloaded

    left, right, disp = skimage.data.stereo_motorcycle()
    h, w = disp.shape
    if left.shape[:2] != (h, w) or right.shape[:2] != (h, w):
        raise DatasetError(f"stereo pair: images {left.shape} / {right.shape} do not match the disparity {disp.shape}")
    scale = size / min(w, h)
    rw, rh = max(size, int(round(w * scale))), max(size, int(round(h * scale)))
    x0, y0 = (rw - size) // 2, (rh - size) // 2
    box = (x0, y0, x0 + size, y0 + size)

    def crop(img: np.ndarray) -> Image.Image:
        return Image.fromarray(img).convert("RGB").resize((rw, rh), Image.Resampling.BICUBIC).crop(box)

    d = np.where(np.isfinite(disp), disp, np.nan).astype(np.float32)
    d = np.asarray(Image.fromarray(d, mode="F").resize((rw, rh), Image.Resampling.NEAREST).crop(box),
                   dtype=np.float64) * (rw / w)
    xs = np.arange(size)[None, :] - d
    d[~np.isfinite(d) | ~((xs >= 0) & (xs < size))] = np.nan
    info = {"pair": STEREO_PAIR, "transform": STEREO_TRANSFORM, "original_size": [w, h],
            "resized": [rw, rh], "crop_box": list(box), "disparity_scale": rw / w,
            "scikit-image": metadata.version("scikit-image")}
    return crop(left), crop(right), d.astype(np.float32), info


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def build_pairs(dataset_dir, out_dir, *, tasks=TASKS, images: Sequence[int], shift: float = 0.25) -> Path:
    """Write the harm-task pairs of the run's dataset ``dataset_dir`` into ``out_dir`` (see the module docstring).

    ``images`` are 0-based indices into the run's dataset (the flip and shift sources; ``tasks=()`` writes a folder
    without pairs, for a run with harm switched off); ``shift`` is the shift
    task's offset as a fraction of the image side. Arguments are checked before anything is written, and the
    directory is built atomically (:class:`~diffaudit.datasets.format.DatasetError` on a bad argument, and
    nothing of ``out_dir`` changes when the build fails). Returns ``out_dir``.
    """
    root = Path(dataset_dir)
    tasks = _check_tasks(tasks)
    index = load_index(root)
    label_names = load_label_names(root)
    images = _check_images(images, len(index), root, needed=bool({"flip", "shift"} & set(tasks)))
    size = _expected_size(root)
    if size is None:
        size = load_images(root, index, 0, 1)[0].size[0]
    s = shift_pixels(shift, size) if "shift" in tasks else None
    run_meta = json.loads((root / "dataset.json").read_text(encoding="utf-8")) if (root / "dataset.json").exists() \
        else {}

    rows: list[tuple] = []
    config = {"source": "harm_pairs", "tasks": list(tasks), "images": images, "shift": shift, "shift_px": s,
              "size": size, "run_dataset": {k: run_meta.get(k) for k in ("index_sha256", "images_sha256")}}
    with _DatasetWriter(out_dir, size) as writer:
        sources = load_images(root, index.iloc[images]) if images else []
        ids = [str(index["id"].iloc[i]) for i in images]
        labels = [int(index["label"].iloc[i]) for i in images]
        if "flip" in tasks:
            for i, image_id, label, img in zip(images, ids, labels, sources):
                t = writer.add(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), f"flip:{image_id}", label)
                rows.append(("flip", image_id, "base", i, int(t), 0))
        if "shift" in tasks:
            for image_id, label, img in zip(ids, labels, sources):
                big = img.resize((size + s, size + s), Image.Resampling.BICUBIC)
                a = writer.add(big.crop((0, 0, size, size)), f"shiftA:{image_id}", label)
                b = writer.add(big.crop((s, s, s + size, s + size)), f"shiftB:{image_id}", label)
                rows.append(("shift", image_id, "pairs", int(a), int(b), s))
        if "stereo" in tasks:
            left, right, disparity, info = _stereo_pair(size)
            a = writer.add(left, "stereo:left", -1)
            b = writer.add(right, "stereo:right", -1)
            rows.append(("stereo", "", "pairs", int(a), int(b), 0))
            info["disparity_file"] = DISPARITY_FILE
            info["disparity_sha256"] = writer.add_file(DISPARITY_FILE, _npy_bytes(disparity))
            info["valid_pixel_share"] = float(np.isfinite(disparity).mean())
            config["stereo"] = info
        buf = io.StringIO()
        table = csv.writer(buf, lineterminator="\n")
        table.writerow(PAIRS_COLUMNS)
        table.writerows((k, *row) for k, row in enumerate(rows))
        config["pairs_sha256"] = writer.add_file(PAIRS_TABLE, buf.getvalue().encode("utf-8"))
        return writer.finish(config, label_names=label_names or None, allow_empty=not tasks)


def load_pairs(pairs_dir) -> tuple[pd.DataFrame, np.ndarray | None]:
    """The ``pairs.csv`` table of a directory written by :func:`build_pairs`, and the stereo disparity
    (float32 ``size x size``, NaN invalid) or ``None`` when it holds no stereo pair."""
    root = Path(pairs_dir)
    path = root / PAIRS_TABLE
    if not path.is_file():
        raise DatasetError(f"{path} not found (not a harm-pairs directory?)")
    df = pd.read_csv(path, dtype={"task": str, "source_image": str, "source_store": str}, keep_default_na=False,
                     na_filter=False)
    if tuple(df.columns) != PAIRS_COLUMNS:
        raise DatasetError(f"{path} has columns {','.join(map(str, df.columns))}, expected {','.join(PAIRS_COLUMNS)}")
    bad = sorted(set(df["task"]) - set(TASKS))
    if bad:
        raise DatasetError(f"{path}: unknown task(s) {', '.join(bad)}")
    if not (df["task"] == "stereo").any():
        return df, None
    disp_path = root / DISPARITY_FILE
    if not disp_path.is_file():
        raise DatasetError(f"{disp_path} not found, but {path} has a stereo pair")
    disparity = np.load(disp_path, allow_pickle=False)
    size = _expected_size(root)
    if disparity.dtype != np.float32 or disparity.ndim != 2 or (size is not None and disparity.shape != (size, size)):
        raise DatasetError(f"{disp_path} is {disparity.dtype} {disparity.shape}, expected float32 ({size}, {size})")
    return df, disparity


def _bounds(grid: int, image_size: int) -> np.ndarray:
    """Pixel boundaries of the ``grid`` tokens along one axis: token ``j`` covers ``[b[j], b[j+1])``."""
    return (np.arange(grid + 1) * image_size) // grid


def ground_truth(pair: Mapping, grid: int, image_size: int,
                 disparity: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """The token correspondence of one pair (a row of ``pairs.csv``: a dict or a pandas row) on a square
    ``grid x grid`` token grid over an ``image_size`` px image.

    Returns ``(target, valid, note)``: ``target`` int64 ``(grid*grid, 2)``, the (row, col) of each source token's
    target token in row-major source order (``-1`` where invalid); ``valid`` bool ``(grid*grid,)``; ``note`` is
    ``""`` or why no token is valid. ``disparity`` (from :func:`load_pairs`) is needed for the stereo task.
    The rules are in the module docstring; the token pitch is ``image_size / grid`` px.
    """
    grid = _check_int(grid, "grid", 1)
    image_size = _check_int(image_size, "image_size", grid)
    task = str(pair["task"])
    ys, xs = np.divmod(np.arange(grid * grid), grid)
    target = np.full((grid * grid, 2), -1, dtype=np.int64)
    if task == "flip":
        target[:, 0], target[:, 1] = ys, grid - 1 - xs
        return target, np.ones(grid * grid, dtype=bool), ""
    if task == "shift":
        s = int(pair["shift_px"])
        k, rest = divmod(s * grid, image_size)  # the shift in tokens, s / (image_size / grid)
        if s <= 0 or rest:
            pitch = image_size / grid
            return target, np.zeros(grid * grid, dtype=bool), (
                f"the shift of {s} px is not a whole number of this grid's tokens ({pitch:g} px)")
        valid = (ys >= k) & (xs >= k)
        target[valid, 0], target[valid, 1] = ys[valid] - k, xs[valid] - k
        return target, valid, ""
    if task == "stereo":
        if disparity is None:
            raise ValueError("the stereo pair's ground truth needs its disparity (load_pairs)")
        d = np.asarray(disparity, dtype=np.float64)
        if d.shape != (image_size, image_size):
            raise ValueError(f"disparity is {d.shape}, expected ({image_size}, {image_size})")
        ok = np.isfinite(d)
        xt = np.where(ok, np.arange(image_size)[None, :] - np.where(ok, d, 0.0), 0.0)
        b = _bounds(grid, image_size)

        def pool(a: np.ndarray) -> np.ndarray:  # sums over each token's pixels, (grid, grid)
            return np.add.reduceat(np.add.reduceat(a, b[:-1], axis=0), b[:-1], axis=1)

        count = pool(ok.astype(np.float64)).ravel()
        area = np.outer(np.diff(b), np.diff(b)).ravel()
        enough = count * 2 >= area
        mean = pool(xt).ravel() / np.maximum(count, 1)
        col = np.floor(mean * grid / image_size).astype(np.int64)
        valid = enough & (col >= 0) & (col < grid)
        target[valid, 0], target[valid, 1] = ys[valid], col[valid]
        note = "" if valid.any() else (f"no token of the {grid}x{grid} grid has at least half its pixels with a "
                                       "valid disparity")
        return target, valid, note
    raise DatasetError(f"unknown harm task {task!r} (expected one of {', '.join(TASKS)})")
