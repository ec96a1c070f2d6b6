"""The on-disk format of a dataset (see :mod:`diffaudit.datasets`): ``index.csv`` with its running ids,
``dataset.json`` (provenance), the atomic writer every source builds through, and reading the index and the
label names back; :class:`DatasetError` and the small checks every source shares."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import PIL
from PIL import Image

from ..errors import DiffauditError

DATASET_FORMAT = "diffaudit-dataset/1"
INDEX_COLUMNS = ("id", "file", "source", "label")
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


class DatasetError(DiffauditError, ValueError):
    """A dataset cannot be built or read; the one-line message names the offending file or key."""


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or "no details"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}"


def _check_int(value, key: str, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise DatasetError(f"{key} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise DatasetError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _versions(**extra: str | None) -> dict:
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    out = {"pillow": PIL.__version__, "scikit-image": version("scikit-image")}
    out.update(extra)
    return out


class _DatasetWriter:
    """Writes images into ``<out_dir>.tmp`` and swaps the finished directory in on :meth:`finish`."""

    def __init__(self, out_dir, size: int):
        self.out_dir = Path(out_dir)
        if not self.out_dir.name:
            raise DatasetError(f"invalid output directory {str(out_dir)!r}")
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise DatasetError(f"output path {self.out_dir} exists and is not a directory")
        self.tmp = self.out_dir.with_name(self.out_dir.name + ".tmp")
        self.size = size
        self.rows: list[tuple[str, str, str, int]] = []
        self.hashes: list[str] = []

    def __enter__(self) -> "_DatasetWriter":
        if self.tmp.exists() or self.tmp.is_symlink():
            _remove(self.tmp)
        (self.tmp / "images").mkdir(parents=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)

    def add(self, img: Image.Image, source: str, label: int) -> str:
        if img.mode != "RGB" or img.size != (self.size, self.size):
            raise DatasetError(f"internal: image for {source} is {img.mode} {img.size}, "
                               f"expected RGB {self.size}x{self.size}")
        image_id = f"{len(self.rows):06d}"
        rel = f"images/{image_id}.png"
        # Rebuild from raw pixels so no metadata (ICC profile, EXIF, text chunks) is carried over.
        clean = Image.frombytes("RGB", img.size, img.tobytes())
        buf = io.BytesIO()
        clean.save(buf, format="PNG")
        data = buf.getvalue()
        (self.tmp / rel).write_bytes(data)
        self.hashes.append(hashlib.sha256(data).hexdigest())
        self.rows.append((image_id, rel, source, int(label)))
        return image_id

    def add_file(self, name: str, data: bytes) -> str:
        """Write one extra top-level file (e.g. a table beside the images) into the dataset; it is swapped in
        with the rest on :meth:`finish`. Returns its sha256 (hex)."""
        if Path(name).name != name or name in ("images", "index.csv", "dataset.json") or name.startswith("."):
            raise DatasetError(f"internal: invalid extra file name {name!r}")
        (self.tmp / name).write_bytes(data)
        return hashlib.sha256(data).hexdigest()

    def finish(self, config: dict, label_names: Sequence[str] | None = None,
               versions: dict | None = None, allow_empty: bool = False) -> Path:
        """Write index.csv and dataset.json and swap the directory in. A dataset without images is an error
        unless ``allow_empty`` (the harm pairs of a run with harm switched off)."""
        if not self.rows and not allow_empty:
            raise DatasetError(f"no images selected for {self.out_dir}")
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(INDEX_COLUMNS)
        writer.writerows(self.rows)
        index_bytes = buf.getvalue().encode("utf-8")
        (self.tmp / "index.csv").write_bytes(index_bytes)
        images_digest = hashlib.sha256(
            "".join(f"{row[0]} {h}\n" for row, h in zip(self.rows, self.hashes)).encode()).hexdigest()
        meta = {
            "format": DATASET_FORMAT,
            "config": config,
            "n_images": len(self.rows),
            "size": self.size,
            "versions": versions if versions is not None else _versions(),
            "index_sha256": hashlib.sha256(index_bytes).hexdigest(),
            "images_sha256": images_digest,
            "label_names": list(label_names) if label_names is not None else None,
        }
        (self.tmp / "dataset.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n",
                                               encoding="utf-8")
        old = self.out_dir.with_name(self.out_dir.name + ".old")
        if self.out_dir.exists():
            if old.exists() or old.is_symlink():
                _remove(old)
            os.replace(self.out_dir, old)
        os.replace(self.tmp, self.out_dir)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
        return self.out_dir


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def load_index(dataset_dir) -> pd.DataFrame:
    """Read and validate ``<dataset_dir>/index.csv`` (columns ``id,file,source,label``, ids ``000000``...)."""
    path = Path(dataset_dir) / "index.csv"
    if not path.is_file():
        raise DatasetError(f"{path} not found (not a dataset directory?)")
    try:
        df = pd.read_csv(path, dtype={"id": str, "file": str, "source": str}, keep_default_na=False,
                         na_filter=False)
    except Exception as exc:
        raise DatasetError(f"{path} cannot be parsed ({_one_line(exc)})") from exc
    if tuple(df.columns) != INDEX_COLUMNS:
        raise DatasetError(f"{path} has columns {','.join(map(str, df.columns))}, expected {','.join(INDEX_COLUMNS)}")
    if df.empty:
        raise DatasetError(f"{path} has no rows")
    if not pd.api.types.is_integer_dtype(df["label"]):
        raise DatasetError(f"{path}: column label must hold integers")
    df["label"] = df["label"].astype(np.int64)
    for i, (image_id, file) in enumerate(zip(df["id"], df["file"])):
        if image_id != f"{i:06d}":
            raise DatasetError(f"{path}: row {i} has id {image_id!r}, expected {i:06d}")
        p = Path(file)
        if not file or p.is_absolute() or ".." in p.parts:
            raise DatasetError(f"{path}: row {i} has invalid file {file!r}")
    return df


def _expected_size(dataset_dir: Path) -> int | None:
    meta = dataset_dir / "dataset.json"
    if not meta.exists():
        return None
    try:
        size = json.loads(meta.read_text(encoding="utf-8"))["size"]
    except Exception as exc:
        raise DatasetError(f"{meta} cannot be read ({_one_line(exc)})") from exc
    return _check_int(size, f"{meta}: size", 1)


def load_label_names(dataset_dir) -> list[str]:
    """The class name of each label (``label_names`` of ``dataset.json``; empty when it has none)."""
    meta = Path(dataset_dir) / "dataset.json"
    if not meta.exists():
        return []
    try:
        names = json.loads(meta.read_text(encoding="utf-8")).get("label_names") or []
    except Exception as exc:
        raise DatasetError(f"{meta} cannot be read ({_one_line(exc)})") from exc
    return [str(n) for n in names]
