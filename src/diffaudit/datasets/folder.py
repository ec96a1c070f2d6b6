"""The ``folder`` source: any directory of images (recursively, ordered by relative path; ImageFolder-style
subfolders become labels), refusing images whose shorter side is below ``dataset.min_side``."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .format import IMAGE_EXTENSIONS, DatasetError, _check_int, _DatasetWriter
from .images import _image_size, _open_loaded, _preprocess

#: How many offending files a "below min_side" message names before "... and N more".
_NAME_AT_MOST = 5


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
