"""Image datasets as versionable artifacts.

Every dataset is built once into an output directory with this layout (contract)::

    <out_dir>/
      images/<id>.png     RGB 8-bit PNG, exactly ``size x size``, lossless, no metadata chunks
      index.csv           columns ``id,file,source,label`` in dataset order; ``id`` is the zero-padded
                          6-digit running index (``000000``, ``000001``, ...), ``file`` is relative to
                          ``out_dir`` (``images/000000.png``), ``source`` says where the image came from,
                          ``label`` is an int (-1 if unknown)
      dataset.json        provenance: ``config`` (the effective configuration), ``n_images``, ``size``,
                          ``versions`` (pillow, scikit-image, ...), ``index_sha256`` (sha256 of index.csv),
                          ``images_sha256`` (sha256 over the per-image sha256s), ``label_names``

Building is atomic: everything is written into ``<out_dir>.tmp`` (a stale one is removed first), which
is then renamed to ``<out_dir>``; an existing ``<out_dir>`` is replaced only after the new dataset is
complete. A failed build leaves no ``.tmp`` behind.

Sources (see :func:`build_dataset`):

* ``demo``: images derived deterministically from the pictures bundled in scikit-image's wheel
  (no download); byte-identical across runs for fixed pillow / scikit-image versions.
* ``folder``: any directory of images.
* ``imagenet_subset``: the paper's ImageNet subset (classes 235, 242, 282, 717, 980, 100 images each
  with ``min(w, h) >= 350``), streamed from the Hugging Face hub or read from a local ILSVRC-2012
  train directory.

All images go through :func:`center_crop_resize`, the paper's preprocessing. ``min_side`` (config key
``dataset.min_side``, the paper's 350 px) guards against upscaling: ``imagenet_subset`` skips images whose
shorter side is below it (as the authors did), ``folder`` refuses to build and names them; ``0`` (or ``1``)
accepts every image. The ``demo`` source derives its images from fixed bundled pictures and ignores it.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import PIL
from PIL import Image

from .errors import DiffauditError

DATASET_FORMAT = "diffaudit-dataset/1"
INDEX_COLUMNS = ("id", "file", "source", "label")
SOURCES = ("demo", "folder", "imagenet_subset")
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

PAPER_CLASSES = (235, 242, 282, 717, 980)  # German shepherd, boxer, tiger cat, pickup, volcano
IMAGENET_WNIDS = {235: "n02106662", 242: "n02108089", 282: "n02123159", 717: "n03930630", 980: "n09472597"}
IMAGENET_NAMES = {235: "German shepherd", 242: "boxer", 282: "tiger cat", 717: "pickup", 980: "volcano"}

#: Pictures bundled in scikit-image's wheel used by the ``demo`` source, in label order.
DEMO_SOURCES = (
    "astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
    "hubble_deep_field.jpg", "ihc.png", "retina.jpg", "horse.png", "color.png",
    "camera.png", "coins.png", "moon.png", "page.png", "text.png",
    "brick.png", "grass.png", "gravel.png", "clock_motion.png", "cell.png",
)
DEMO_TRANSFORM = (
    "round r = i // n_sources, source = i % n_sources; r == 0: the whole picture; r >= 1: square crop of "
    "side int(min(w,h) * (0.5 + 0.45 * frac(r * 0.5698402909980532))) at offset "
    "(int((w - side) * frac(r * 0.6180339887498949)), int((h - side) * frac(r * 0.7548776662466927))), "
    "mirrored left-right on odd r; then center_crop_resize(size)"
)

_CONFIG_KEYS = {"source", "path", "n_images", "size", "min_side", "imagenet", "name", "description"}
_IMAGENET_KEYS = {"source", "path", "per_class", "classes"}
#: The paper's minimum shorter side in pixels (default of ``dataset.min_side``).
PAPER_MIN_SIDE = 350
#: How many offending files a "below min_side" message names before "... and N more".
_NAME_AT_MOST = 5
_HF_HELP = ("log in with `hf auth login` (or pass hf_token), accept the imagenet-1k terms at "
            "https://huggingface.co/datasets/ILSVRC/imagenet-1k, or use "
            "`imagenet: {source: local}` with `dataset.path: /path/to/ILSVRC2012/train` instead")


class DatasetError(DiffauditError, ValueError):
    """A dataset cannot be built or read; the one-line message names the offending file or key."""


# ----------------------------------------------------------------------------------------- preprocessing

def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or "no details"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}"


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


# ----------------------------------------------------------------------------------------- validation

def _check_int(value, key: str, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise DatasetError(f"{key} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise DatasetError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_classes(classes, key: str = "classes") -> tuple[int, ...]:
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Iterable):
        raise DatasetError(f"{key} must be a list of ImageNet class indices, got {classes!r}")
    out = tuple(_check_int(c, key, 0) for c in classes)
    if not out:
        raise DatasetError(f"{key} must not be empty")
    if any(c > 999 for c in out):
        raise DatasetError(f"{key} must be ImageNet class indices in 0..999, got {list(out)}")
    if len(set(out)) != len(out):
        raise DatasetError(f"{key} contains duplicates: {list(out)}")
    return out


def _class_name(c: int) -> str:
    return IMAGENET_NAMES.get(c, str(c))


# ----------------------------------------------------------------------------------------- writing

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

    def finish(self, config: dict, label_names: Sequence[str] | None = None,
               versions: dict | None = None) -> Path:
        if not self.rows:
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


def _open_loaded(path: Path) -> Image.Image:
    """Open an image file and decode all pixels (to catch truncation); DatasetError names the file."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
        raise DatasetError(f"cannot read image {path} ({_one_line(exc)})") from exc


def _preprocess(img: Image.Image, size: int, what) -> Image.Image:
    try:
        return center_crop_resize(img, size)
    except DatasetError as exc:
        raise DatasetError(f"{what}: {exc}") from exc
    except Exception as exc:
        raise DatasetError(f"cannot preprocess {what} ({_one_line(exc)})") from exc


# ----------------------------------------------------------------------------------------- demo

def _demo_dir() -> Path:
    import skimage.data  # only locates the bundled files; nothing is downloaded

    return Path(os.path.dirname(skimage.data.__file__))


def _demo_variant(img: Image.Image, r: int) -> Image.Image:
    if r == 0:
        return img
    w, h = img.size
    s = min(w, h)
    side = max(2, int(s * (0.5 + 0.45 * ((r * 0.5698402909980532) % 1.0))))
    left = int((w - side) * ((r * 0.6180339887498949) % 1.0))
    top = int((h - side) * ((r * 0.7548776662466927) % 1.0))
    img = img.crop((left, top, left + side, top + side))
    if r % 2:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def build_demo(out_dir, n_images: int = 40, size: int = 512) -> Path:
    """Build ``n_images`` images derived from the pictures bundled with scikit-image.

    Image ``i`` uses picture ``DEMO_SOURCES[i % 20]`` (label = that index) in round ``r = i // 20``:
    round 0 is the whole picture, later rounds take a square crop whose scale and offset vary with ``r``
    (low-discrepancy sequences, so rounds do not repeat) and mirror it on odd rounds; every image then goes
    through :func:`center_crop_resize`. ``source`` is e.g. ``skimage:astronaut.png#r1``. The files are read
    from the installed wheel (never downloaded), and the result is byte-identical across runs.
    """
    n_images = _check_int(n_images, "n_images", 1)
    size = _check_int(size, "size", 1)
    data_dir = _demo_dir()
    pictures: dict[int, Image.Image] = {}
    with _DatasetWriter(out_dir, size) as writer:
        for i in range(n_images):
            k, r = i % len(DEMO_SOURCES), i // len(DEMO_SOURCES)
            name = DEMO_SOURCES[k]
            if k not in pictures:
                path = data_dir / name
                if not path.is_file():
                    raise DatasetError(f"demo picture {path} is missing from the scikit-image installation")
                pictures[k] = _open_loaded(path)
            img = _preprocess(_demo_variant(pictures[k], r), size, f"demo picture {name}")
            writer.add(img, f"skimage:{name}#r{r}", k)
        config = {"source": "demo", "n_images": n_images, "size": size,
                  "demo_sources": list(DEMO_SOURCES), "demo_transform": DEMO_TRANSFORM}
        return writer.finish(config, label_names=list(DEMO_SOURCES))


# ----------------------------------------------------------------------------------------- folder

def _list_images(root: Path, exclude: Sequence[Path]) -> list[Path]:
    excluded = {p.resolve() for p in exclude}
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames
                       if not d.startswith(".") and (Path(dirpath) / d).resolve() not in excluded]
        for f in filenames:
            if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath, f).relative_to(root))
    return sorted(found, key=lambda p: p.parts)


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header; an unreadable file is one :class:`DatasetError` naming it."""
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as exc:
        raise DatasetError(f"cannot read image {path} ({_one_line(exc)})") from exc


def _check_min_side(src: Path, files: Sequence[Path], min_side: int, size: int) -> None:
    """Raise one :class:`DatasetError` naming the files whose shorter side is below ``min_side``."""
    small: list[str] = []
    for rel in files:
        w, h = _image_size(src / rel)
        if min(w, h) < min_side:
            small.append(f"{rel.as_posix()} ({w}x{h})")
    if small:
        named = ", ".join(small[:_NAME_AT_MOST])
        more = f", ... and {len(small) - _NAME_AT_MOST} more" if len(small) > _NAME_AT_MOST else ""
        raise DatasetError(f"folder {src}: {len(small)} of {len(files)} images have a shorter side below "
                           f"dataset.min_side={min_side} px and would be upscaled to {size}x{size}: {named}{more}; "
                           f"remove these files or lower dataset.min_side (0 accepts every image)")


def build_folder(src_dir, out_dir, n_images: int | None = None, size: int = 512, min_side: int = 0) -> Path:
    """Build a dataset from any directory of images.

    Files are found recursively (extensions png, jpg, jpeg, bmp, gif, tif, tiff, webp, case-insensitive;
    hidden files and folders starting with ``.`` are skipped, as are ``out_dir`` and its ``.tmp``) and
    ordered by relative path (compared component by component, case-sensitive code-point order); the
    first ``n_images`` are used (all if ``None``). Every selected image is fully decoded, so corrupt or
    truncated files raise :class:`DatasetError` naming the file. Modes are handled by
    :func:`center_crop_resize` (palette/RGBA/LA/L/CMYK cropped and resized in their own mode, then RGB;
    16-bit/float scaled to 8-bit ``L`` first); EXIF orientation is ignored (pixels as stored); multi-frame
    files use their first frame.

    ``min_side``: if any selected image has a shorter side below ``min_side`` pixels, nothing is built and
    :class:`DatasetError` names those files (the first five, then how many more) and the fix. ``0`` (the
    default here; the workflow passes ``dataset.min_side``, 350 in ``params.yaml``) or ``1`` accepts every image.

    Labels: if no image lies directly in ``src_dir`` (all are in subfolders, like an ImageFolder tree),
    ``label`` = index of the image's first-level subfolder among the sorted names of the subfolders that
    contain images (computed over all images found, so it does not depend on ``n_images``); otherwise
    every label is -1. ``source`` is the path relative to ``src_dir``.
    """
    if src_dir is None or (isinstance(src_dir, str) and not src_dir.strip()):
        raise DatasetError("folder source needs `path` (the directory of images)")
    src = Path(src_dir).expanduser()
    if not src.exists():
        raise DatasetError(f"folder {src} does not exist")
    if not src.is_dir():
        raise DatasetError(f"folder {src} is not a directory")
    if n_images is not None:
        n_images = _check_int(n_images, "n_images", 1)
    size = _check_int(size, "size", 1)
    min_side = _check_int(min_side, "dataset.min_side", 0)
    out = Path(out_dir)
    files = _list_images(src, [out, out.with_name(out.name + ".tmp")])
    if not files:
        raise DatasetError(f"folder {src} contains no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    if n_images is not None and len(files) < n_images:
        raise DatasetError(f"folder {src} has only {len(files)} images, n_images={n_images} requested")
    classes: list[str] | None = None
    if all(len(f.parts) > 1 for f in files):
        classes = sorted({f.parts[0] for f in files})
    label_of = {c: i for i, c in enumerate(classes or [])}
    selected = files if n_images is None else files[:n_images]
    if min_side > 1:
        _check_min_side(src, selected, min_side, size)
    with _DatasetWriter(out, size) as writer:
        for rel in selected:
            path = src / rel
            img = _preprocess(_open_loaded(path), size, f"image {path}")
            writer.add(img, rel.as_posix(), label_of[rel.parts[0]] if classes else -1)
        config = {"source": "folder", "path": str(src), "n_images": n_images, "size": size, "min_side": min_side}
        return writer.finish(config, label_names=classes)


# ----------------------------------------------------------------------------------------- imagenet

def _shortfall(classes: Sequence[int], counts: Sequence[int], per_class: int, min_side: int,
               where: str) -> DatasetError:
    short = [f"class {c} ({_class_name(c)}) has only {n}"
             for c, n in zip(classes, counts) if n < per_class]
    return DatasetError(f"imagenet_subset: {'; '.join(short)} images with min(w,h) >= {min_side} "
                        f"(dataset.min_side) in {where}, per_class={per_class} requested")


def _hf_stream(hf_token) -> Iterator[dict]:
    try:
        import datasets
    except ImportError as exc:
        raise DatasetError("imagenet_subset source=hf needs the `datasets` package (pip install datasets); "
                           "or use `imagenet: {source: local}` with `dataset.path: /path/to/ILSVRC2012/train`") from exc
    try:
        ds = datasets.load_dataset("imagenet-1k", split="train", streaming=True, token=hf_token)
        # Decode only the records of the selected classes (see _decode_record).
        ds = ds.cast_column("image", datasets.Image(decode=False))
        it = iter(ds)
    except Exception as exc:
        raise DatasetError(f"could not stream imagenet-1k from the Hugging Face hub ({_one_line(exc)}); "
                           f"{_HF_HELP}") from exc
    while True:
        try:
            rec = next(it)
        except StopIteration:
            return
        except Exception as exc:
            raise DatasetError(f"could not stream imagenet-1k from the Hugging Face hub "
                               f"({_one_line(exc)}); {_HF_HELP}") from exc
        yield rec


def _decode_record(value, what: str) -> Image.Image:
    """A record's image: a PIL image as is, or an undecoded hub value decoded exactly as `datasets` does."""
    if isinstance(value, Image.Image):
        return value
    try:
        import datasets

        return datasets.Image().decode_example(value)
    except Exception as exc:
        raise DatasetError(f"cannot decode {what} ({_one_line(exc)})") from exc


def _select_stream(records: Iterable[Mapping], classes: Sequence[int], per_class: int, min_side: int,
                   prefix: str) -> Iterator[tuple[str, int, Image.Image]]:
    """First ``per_class`` images per class with ``min(w,h) >= min_side``, in stream order."""
    label_of = {c: i for i, c in enumerate(classes)}
    counts = [0] * len(classes)
    open_classes = len(classes)
    for pos, rec in enumerate(records):
        what = f"{prefix}[{pos}]"
        try:
            cls = int(rec["label"])
            value = rec["image"]
        except Exception as exc:
            raise DatasetError(f"{what}: record needs `image` and integer `label` ({_one_line(exc)})") from exc
        i = label_of.get(cls)
        if i is None or counts[i] >= per_class:
            continue
        img = _decode_record(value, what)
        if min(img.size) < min_side:
            continue
        counts[i] += 1
        yield f"{what}:class={cls}", i, img
        if counts[i] == per_class:
            open_classes -= 1
            if open_classes == 0:
                return
    raise _shortfall(classes, counts, per_class, min_side, prefix)


def _select_local(root: Path, classes: Sequence[int], per_class: int, min_side: int
                  ) -> Iterator[tuple[str, int, Image.Image]]:
    """Per class (in ``classes`` order), the first qualifying files sorted by file name."""
    folders = []
    for c in classes:
        wnid = IMAGENET_WNIDS.get(c)
        if wnid is None:
            raise DatasetError(f"imagenet.classes: no WordNet id known for class {c} (source=local supports "
                               f"{sorted(IMAGENET_WNIDS)})")
        folder = root / wnid
        if not folder.is_dir():
            raise DatasetError(f"ILSVRC class folder {folder} (class {c}, {_class_name(c)}) not found")
        folders.append(folder)
    counts = [0] * len(classes)
    for i, (c, folder) in enumerate(zip(classes, folders)):
        files = sorted((f for f in folder.iterdir()
                        if f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith(".") and f.is_file()),
                       key=lambda f: f.name)
        for f in files:
            w, h = _image_size(f)
            if min(w, h) < min_side:
                continue
            img = _open_loaded(f)
            counts[i] += 1
            yield f.relative_to(root).as_posix(), i, img
            if counts[i] == per_class:
                break
    if any(n < per_class for n in counts):
        raise _shortfall(classes, counts, per_class, min_side, str(root))


def build_imagenet_subset(out_dir, source: str = "hf", path=None, classes=PAPER_CLASSES, per_class: int = 100,
                          min_side: int = PAPER_MIN_SIDE, size: int = 512, hf_token=None, records=None) -> Path:
    """Build the paper's ImageNet subset: ``per_class`` images of each of ``classes``.

    Stored labels are the positions in ``classes`` (0..4 for :data:`PAPER_CLASSES`). For each class the
    first ``per_class`` images *in source order* with ``min(w, h) >= min_side`` are taken; images are
    written in the order they are encountered, and the scan stops once every class is full.

    * ``source="hf"``: ``datasets.load_dataset("imagenet-1k", split="train", streaming=True)`` iterated in
      order, as the authors did. Only records of the selected classes are decoded (by ``datasets`` itself,
      which in current versions applies EXIF orientation). ``records`` replaces the hub stream by any
      iterable of ``{"image": PIL image, "label": int}`` dicts (used by the tests). ``source`` is
      ``hf:imagenet-1k/train[<stream position>]:class=<c>``.
    * ``source="local"``: an ILSVRC-2012 train directory ``<path>/<wnid>/*.JPEG``; classes are read one
      after another and, within a class, files sorted by file name. This order differs from the hub's
      stream order, so the subset is a *different* set of images than the paper's. Pixels are used as
      stored (no EXIF orientation). ``source`` is ``<wnid>/<file>``.

    Too few qualifying images for a class raises :class:`DatasetError` naming the class and the count.
    ``min_side`` is the config key ``dataset.min_side`` (shared with the ``folder`` source); ``0`` or ``1``
    takes every image.
    """
    classes = _check_classes(classes, "imagenet.classes")
    per_class = _check_int(per_class, "imagenet.per_class", 1)
    min_side = _check_int(min_side, "dataset.min_side", 0)
    size = _check_int(size, "size", 1)
    versions = _versions()
    if source == "hf":
        if records is not None:
            selected = _select_stream(records, classes, per_class, min_side, "records")
        else:
            try:
                versions["datasets"] = metadata.version("datasets")
            except metadata.PackageNotFoundError:
                pass
            selected = _select_stream(_hf_stream(hf_token), classes, per_class, min_side, "hf:imagenet-1k/train")
        root = None
    elif source == "local":
        if records is not None:
            raise DatasetError("imagenet.source=local cannot be combined with injected records")
        if path is None or (isinstance(path, str) and not path.strip()):
            raise DatasetError("imagenet.source=local needs imagenet.path (or dataset path): "
                               "an ILSVRC2012 train directory")
        root = Path(path).expanduser()
        if not root.is_dir():
            raise DatasetError(f"imagenet.path {root} is not a directory")
        selected = _select_local(root, classes, per_class, min_side)
    else:
        raise DatasetError(f"imagenet.source must be 'hf' or 'local', got {source!r}")
    with _DatasetWriter(out_dir, size) as writer:
        for src, label, img in selected:
            writer.add(_preprocess(img, size, src), src, label)
        config = {"source": "imagenet_subset", "n_images": len(classes) * per_class, "size": size,
                  "min_side": min_side,
                  "imagenet": {"source": source, "path": None if root is None else str(root),
                               "per_class": per_class, "classes": list(classes)}}
        if records is not None:
            config["imagenet"]["records"] = "injected"
        return writer.finish(config, label_names=[_class_name(c) for c in classes], versions=versions)


# ----------------------------------------------------------------------------------------- dispatch

def build_dataset(cfg: dict, out_dir) -> Path:
    """Build the dataset described by ``cfg`` into ``out_dir``.

    Keys: ``source`` (``demo`` | ``folder`` | ``imagenet_subset``), ``size`` (default 512), ``n_images``
    (demo: default 40; folder: default all), ``path`` (folder: the image directory), ``min_side`` (folder and
    imagenet_subset: the smallest shorter side in pixels an image may have, default 350 as in the paper; ``0``
    accepts every image; the demo ignores it), ``imagenet: {source: hf|local, path, per_class, classes}``
    (defaults: hf, the paper's classes, 100). For ``imagenet_subset`` the whole subset
    (``per_class * len(classes)`` images) is always built -- ``n_images`` only limits how many of them later
    steps use, so it may not exceed that total -- and the ILSVRC directory of ``source: local`` is ``imagenet.path`` or, if that is absent, the
    top-level ``path``. Keys that do not apply to the chosen source are ignored; ``name`` and
    ``description`` are accepted and ignored; unknown keys raise :class:`DatasetError`.
    """
    if not isinstance(cfg, Mapping):
        raise DatasetError(f"dataset config must be a mapping, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - _CONFIG_KEYS)
    if unknown:
        raise DatasetError(f"dataset config: unknown key(s) {', '.join(map(str, unknown))} "
                           f"(allowed: {', '.join(sorted(_CONFIG_KEYS))})")
    if "source" not in cfg:
        raise DatasetError(f"dataset config: missing key 'source' (one of {', '.join(SOURCES)})")
    source = cfg["source"]
    size = cfg.get("size", 512)
    n_images = cfg.get("n_images")
    min_side = cfg.get("min_side", PAPER_MIN_SIDE)
    if source in ("folder", "imagenet_subset"):
        min_side = _check_int(min_side, "dataset.min_side", 0)
    if source == "demo":
        return build_demo(out_dir, n_images=40 if n_images is None else n_images, size=size)
    if source == "folder":
        if cfg.get("path") is None:
            raise DatasetError("dataset config: source 'folder' needs key 'path'")
        return build_folder(cfg["path"], out_dir, n_images=n_images, size=size, min_side=min_side)
    if source == "imagenet_subset":
        im = cfg.get("imagenet") or {}
        if not isinstance(im, Mapping):
            raise DatasetError(f"dataset config: 'imagenet' must be a mapping, got {type(im).__name__}")
        if "min_side" in im:
            raise DatasetError("dataset config: imagenet.min_side has moved to dataset.min_side (one minimum for "
                               "the folder and imagenet_subset sources); move the key up one level")
        unknown = sorted(set(im) - _IMAGENET_KEYS)
        if unknown:
            raise DatasetError(f"dataset config: unknown key(s) imagenet.{', imagenet.'.join(map(str, unknown))} "
                               f"(allowed: {', '.join(sorted(_IMAGENET_KEYS))})")
        classes = _check_classes(im.get("classes", PAPER_CLASSES), "imagenet.classes")
        per_class = _check_int(im.get("per_class", 100), "imagenet.per_class", 1)
        total = per_class * len(classes)
        if n_images is not None and _check_int(n_images, "n_images", 1) > total:
            raise DatasetError(f"dataset config: n_images={n_images} exceeds the imagenet subset's "
                               f"imagenet.per_class={per_class} x {len(classes)} classes = {total}")
        path = im.get("path") if im.get("path") is not None else cfg.get("path")
        return build_imagenet_subset(out_dir, source=im.get("source", "hf"), path=path,
                                     classes=classes, per_class=per_class, min_side=min_side, size=size)
    raise DatasetError(f"dataset config: unknown source {source!r} (expected one of {', '.join(SOURCES)})")


# ----------------------------------------------------------------------------------------- reading

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
