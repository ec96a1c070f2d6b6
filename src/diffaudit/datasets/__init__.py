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

The package, by concern: :mod:`~diffaudit.datasets.format` (the on-disk format above, the atomic writer, reading
the index and label names), :mod:`~diffaudit.datasets.images` (loading and the paper's preprocessing),
:mod:`~diffaudit.datasets.demo`, :mod:`~diffaudit.datasets.folder` and :mod:`~diffaudit.datasets.imagenet` (the
sources) and :mod:`~diffaudit.datasets.build` (a configuration's dataset: :func:`build_dataset`). Every public name
is importable from ``diffaudit.datasets``; where the dataset lives in a results directory is decided by
:mod:`diffaudit.layout`.
"""
from __future__ import annotations

from .build import SOURCES, build_dataset
from .demo import DEMO_SOURCES, DEMO_TRANSFORM, build_demo
from .folder import build_folder
from .format import DATASET_FORMAT, IMAGE_EXTENSIONS, INDEX_COLUMNS, DatasetError, load_index, load_label_names
from .imagenet import IMAGENET_NAMES, IMAGENET_WNIDS, PAPER_CLASSES, PAPER_MIN_SIDE, build_imagenet_subset
from .images import center_crop_resize, load_images

__all__ = ["DATASET_FORMAT", "DEMO_SOURCES", "DEMO_TRANSFORM", "IMAGENET_NAMES", "IMAGENET_WNIDS", "IMAGE_EXTENSIONS",
           "INDEX_COLUMNS", "PAPER_CLASSES", "PAPER_MIN_SIDE", "SOURCES", "DatasetError", "build_dataset",
           "build_demo", "build_folder", "build_imagenet_subset", "center_crop_resize", "load_images", "load_index",
           "load_label_names"]
