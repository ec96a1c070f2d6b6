"""Building the dataset a configuration describes (``dataset`` section): the keys, their checks, and the
dispatch to the ``demo``, ``folder`` and ``imagenet_subset`` sources."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .demo import build_demo
from .folder import build_folder
from .format import DatasetError, _check_int
from .imagenet import PAPER_CLASSES, PAPER_MIN_SIDE, _check_classes, build_imagenet_subset

SOURCES = ("demo", "folder", "imagenet_subset")
_CONFIG_KEYS = {"source", "path", "n_images", "size", "min_side", "imagenet", "name", "description"}
_IMAGENET_KEYS = {"source", "path", "per_class", "classes"}


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
