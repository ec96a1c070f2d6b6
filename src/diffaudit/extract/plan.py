"""The run plan and its footprint: the variants of an extraction (``full`` and one ``crop<t>`` per token size,
:func:`plan_variants`), the bytes their stores will hold (:func:`store_nbytes`, :func:`extraction_footprint`) and
the check against the free disk space before the first batch (:func:`check_disk_space`)."""
from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import layout
from ..errors import DiffauditError
from ..store import STORE_FORMAT, fingerprint, store_path
from .settings import ExtractionSettings

log = logging.getLogger("diffaudit.extract")


class InsufficientDiskSpaceError(DiffauditError, OSError):
    """The extraction's stores would not fit on the target file system; the message says what to do."""




def token_sizes(shapes: dict[str, tuple[int, int, int]], image_size: int) -> dict[int, list[str]]:
    """Group layers by token size in pixels (``image_size // H``).

    Layers without whole-pixel square tokens, or too small for the corner/border/other groups after removing
    one ring (``H - 2 < 3``), get no cropped variant.
    """
    groups: dict[int, list[str]] = {}
    for layer, (_, h, w) in shapes.items():
        if h != w or image_size % h or h < 5:
            log.warning("layer %s (%dx%d): no cropped variant (tokens not whole pixels, or the map is too small "
                        "for corner/border/other groups)", layer, h, w)
            continue
        groups.setdefault(image_size // h, []).append(layer)
    return dict(sorted(groups.items()))



# ---------------------------------------------------------------------------------------------
# Footprint: what the stores will hold, checked against the free space before the first batch
# ---------------------------------------------------------------------------------------------

# Bytes of a store besides the representation data, as zarr 3.1 writes it (slight upper bounds of what
# tests/test_extract_footprint.py measures: ~2.6 kB per store, ~2.8 kB per layer group, ~2 bytes per image for the
# zstd-compressed ``image``/``label`` coordinates, stored at the root and again in every layer group). Every shard of
# a layer array ends in an index of 16 bytes per chunk (1 chunk = 1 image) plus a 4-byte checksum.
# For the paper run all of this is < 0.01 % of the data.
STORE_META_BYTES = 3072
LAYER_META_BYTES = 3072
COORD_BYTES_PER_IMAGE = 4
SHARD_INDEX_BYTES_PER_IMAGE = 16
SHARD_INDEX_BYTES = 4
# Free space kept beyond the estimate: 2 % of it plus 64 MiB (logs, DVC/Snakemake bookkeeping, other writers).
DISK_MARGIN_FRACTION = 0.02
DISK_MARGIN_BYTES = 64 * 2**20


@dataclass(frozen=True)
class VariantPlan:
    """One store of an extraction: its layers, their indices in the layer list, the crop and the map shapes."""

    name: str
    layers: list[str]
    layer_indices: list[int]
    crop_px: int
    shapes: dict[str, tuple[int, int, int]]


def plan_variants(shape_fn: Callable[[int, Sequence[str]], dict], layers: Sequence[str], image_size: int,
                  crops: bool = True) -> list[VariantPlan]:
    """``full`` and, with ``crops``, one ``crop<t>`` per token size; ``shape_fn(image_px, layers)`` gives the
    ``(C, H, W)`` of the layers for square images of ``image_px`` pixels (e.g. :meth:`Extractor.layer_shapes`)."""
    layers = list(layers)
    full = shape_fn(image_size, layers)
    plan = [VariantPlan(layout.FULL, layers, list(range(len(layers))), 0, full)]
    if crops:
        for tpx, group in token_sizes(full, image_size).items():
            plan.append(VariantPlan(layout.crop_variant(tpx), group, [layers.index(layer) for layer in group], tpx,
                                    shape_fn(image_size - 2 * tpx, group)))
    return plan


def store_nbytes(shapes: dict[str, tuple[int, int, int]], n_images: int, dtype: str = "float16",
                 shard_images: int = 20, done: int = 0) -> int:
    """Bytes a representation store of these layer shapes holds on disk when complete (data, shard indexes,
    metadata), or, with ``done`` images already written, the bytes still to be written."""
    n_images, done = int(n_images), int(done)
    if n_images <= 0 or done >= n_images:
        return 0
    shard = max(1, min(int(shard_images), n_images))
    per_image = np.dtype(dtype).itemsize * sum(int(np.prod(s)) for s in shapes.values())
    n_shards = -(-n_images // shard)
    index = len(shapes) * (n_shards - done // shard) * (SHARD_INDEX_BYTES_PER_IMAGE * shard + SHARD_INDEX_BYTES)
    meta = 0 if done else (STORE_META_BYTES + len(shapes) * LAYER_META_BYTES
                           + (len(shapes) + 1) * n_images * COORD_BYTES_PER_IMAGE)
    return per_image * (n_images - done) + index + meta


def _images_done(path: Path, expected_fingerprint: str, n_images: int) -> int:
    """Images an existing store at ``path`` already holds for this configuration (0 if none or another one)."""
    if not path.exists():
        return 0
    try:
        import zarr

        a = dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception:  # noqa: BLE001 - unreadable leftovers are restarted by StoreWriter
        return 0
    if a.get("format") != STORE_FORMAT or a.get("fingerprint") != expected_fingerprint:
        return 0
    return n_images if a.get("complete") else int(a.get("n_complete", 0))


@dataclass(frozen=True)
class Footprint:
    """Bytes of an extraction's stores: ``total`` per complete variant, ``remaining`` still to be written."""

    path: Path
    n_images: int
    n_layers: int
    dtype: str
    total: dict[str, int]
    remaining: dict[str, int]
    done: dict[str, int] = field(default_factory=dict)

    @property
    def needed(self) -> int:
        return sum(self.remaining.values())

    @property
    def crop_bytes(self) -> int:
        return sum(b for v, b in self.remaining.items() if layout.crop_token_size(v) is not None)

    def describe(self) -> str:
        parts = ", ".join(f"{v} {human_bytes(b)}" for v, b in self.remaining.items())
        resumed = sum(self.done.values())
        return (f"{human_bytes(self.needed)} to write to {self.path} ({parts}; {self.n_images} images x {self.n_layers} "
                f"layers, {self.dtype}" + (f"; resuming, {human_bytes(sum(self.total.values()) - self.needed)} "
                                            "already written" if resumed else "") + ")")


def human_bytes(n: int | float) -> str:
    return f"{n / 1e9:.3g} GB" if n >= 1e7 else f"{n / 1e6:.3g} MB"


def extraction_footprint(plan: Sequence[VariantPlan], work: str | Path, image_ids: Sequence[str],
                         configs: dict[str, dict], settings: ExtractionSettings) -> Footprint:
    """The bytes :func:`run_extraction` will write into ``work`` for ``plan``; stores already there with the same
    configuration (a resumed run) count only with their remaining images."""
    work = Path(work)
    ids = [str(i) for i in image_ids]
    n = len(ids)
    dtype = str(np.dtype(settings.store_dtype))
    total, remaining, done = {}, {}, {}
    for v in plan:
        fp = fingerprint({**configs[v.name], "layers": list(v.layers), "images": ids, "dtype": dtype})
        done[v.name] = _images_done(store_path(work, v.name), fp, n)
        total[v.name] = store_nbytes(v.shapes, n, dtype, settings.batch_size)
        remaining[v.name] = store_nbytes(v.shapes, n, dtype, settings.batch_size, done=done[v.name])
    return Footprint(work, n, len(plan[0].layers) if plan else 0, dtype, total, remaining, done)


def disk_margin(needed: int) -> int:
    return int(DISK_MARGIN_FRACTION * needed) + DISK_MARGIN_BYTES


def check_disk_space(fp: Footprint) -> int:
    """Log the footprint (one line) and raise :class:`InsufficientDiskSpaceError` if the file system of
    ``fp.path`` has less free space than the bytes still to write plus :func:`disk_margin`. Returns the free bytes."""
    probe = Path(fp.path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = int(shutil.disk_usage(probe).free)
    log.info("extraction footprint: %s; %s free there", fp.describe(), human_bytes(free))
    if fp.needed and fp.needed + disk_margin(fp.needed) > free:
        crops = (f", `extraction.crops: false` (saves {human_bytes(fp.crop_bytes)})" if fp.crop_bytes else "")
        raise InsufficientDiskSpaceError(
            f"not enough disk space for the extraction: it needs {human_bytes(fp.needed)} (+ {human_bytes(disk_margin(fp.needed))} "
            f"margin) in {fp.path} but that file system ({probe}) has {human_bytes(free)} free. To fix: free space there, "
            f"extract fewer layers (`layers`) or images (`dataset.n_images`){crops}, or choose another results_dir "
            "on a larger disk."
        )
    return free


