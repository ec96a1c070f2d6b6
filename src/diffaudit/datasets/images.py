"""Image loading and the paper's preprocessing: decoding a file completely (:func:`_open_loaded`), 16-bit/float
modes to 8 bit, the center crop and resize (:func:`center_crop_resize`), and reading a built dataset's images
back (:func:`load_images`)."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from .format import DatasetError, _check_int, _expected_size, _one_line


def _to_8bit(img: Image.Image) -> Image.Image:
    """Scale 16-bit / 32-bit / float single-channel images to 8-bit ``L``; other modes pass through."""
    mode = img.mode
    if mode.startswith("I;16"):
        arr = np.asarray(img).astype(np.int64)
        out = (arr * 255 + 32767) // 65535
    elif mode == "I":
        arr = np.asarray(img).astype(np.int64)
        if arr.size and arr.min() >= 0 and arr.max() <= 65535:
            out = (arr * 255 + 32767) // 65535
        else:
            out = _min_max(arr.astype(np.float64))
    elif mode == "F":
        out = _min_max(np.asarray(img).astype(np.float64))
    else:
        return img
    return Image.fromarray(np.ascontiguousarray(out, dtype=np.uint8))


def _min_max(arr: np.ndarray) -> np.ndarray:
    arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.rint((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def center_crop_resize(img: Image.Image, size: int = 512) -> Image.Image:
    """The paper's preprocessing (authors' ``create_imagenet_subset.py``): center square crop, resize, RGB.

    ``w, h = img.size; s = min(w, h)``; crop box ``(w//2 - s//2, h//2 - s//2, w//2 + s//2, h//2 + s//2)``
    (an odd ``s`` therefore gives an ``(s-1) x (s-1)`` square), then ``resize((size, size))`` with PIL's
    default filter, and only then ``convert("RGB")`` -- crop and resize happen in the source mode, as the
    authors do, so palette (``P``, resized nearest-neighbour by PIL), ``RGBA``/``LA`` (alpha is dropped by
    the final conversion, not composited), ``L``, ``1``, ``CMYK`` ... give identical results to theirs.

    16-bit and float modes are first scaled to 8-bit ``L``: ``I;16*`` (and ``I`` with all values in
    0..65535) as ``round(v * 255 / 65535)``; other ``I`` images and ``F`` images are stretched linearly
    from their min..max to 0..255 (a constant image becomes 0).

    EXIF orientation is *not* applied: pixels are used as stored. Multi-frame images use the current
    (first) frame. Raises :class:`DatasetError` for images smaller than 2 pixels on a side.
    """
    size = _check_int(size, "size", 1)
    img = _to_8bit(img)
    if img.mode == "La":  # premultiplied modes cannot be converted directly
        img = img.convert("LA")
    elif img.mode == "RGBa":
        img = img.convert("RGBA")
    w, h = img.size
    s = min(w, h)
    if s < 2:
        raise DatasetError(f"image of size {w}x{h} is too small to crop")
    img = img.crop((w // 2 - s // 2, h // 2 - s // 2, w // 2 + s // 2, h // 2 + s // 2))
    img = img.resize((size, size))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Palette images with Transparency")
        return img.convert("RGB")


def _open_loaded(path: Path) -> Image.Image:
    """Open an image file and decode all pixels (to catch truncation); DatasetError names the file."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
        raise DatasetError(f"cannot read image {path} ({_one_line(exc)})") from exc


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header; an unreadable file is one :class:`DatasetError` naming it."""
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as exc:
        raise DatasetError(f"cannot read image {path} ({_one_line(exc)})") from exc


def _preprocess(img: Image.Image, size: int, what) -> Image.Image:
    try:
        return center_crop_resize(img, size)
    except DatasetError as exc:
        raise DatasetError(f"{what}: {exc}") from exc
    except Exception as exc:
        raise DatasetError(f"cannot preprocess {what} ({_one_line(exc)})") from exc


def load_images(dataset_dir, index_df: pd.DataFrame, start: int = 0, stop: int | None = None) -> list[Image.Image]:
    """RGB images of rows ``start:stop`` of ``index_df``.

    Each image must be RGB and ``size x size`` with ``size`` from ``dataset.json`` (without one, all
    images must be square and equally sized); otherwise :class:`DatasetError` names the file.
    """
    root = Path(dataset_dir)
    size = _expected_size(root)
    out: list[Image.Image] = []
    for file in index_df["file"].iloc[start:stop]:
        path = root / file
        img = _open_loaded(path)
        if size is None:
            size = img.size[0]
        if img.mode != "RGB":
            raise DatasetError(f"image {path} has mode {img.mode}, expected RGB")
        if img.size != (size, size):
            raise DatasetError(f"image {path} is {img.size[0]}x{img.size[1]}, expected {size}x{size}")
        out.append(img)
    return out
