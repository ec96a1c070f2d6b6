"""Zarr v3 representation stores, readable as xarray DataTrees.

Layout of one store (one per model x dataset x variant), contract:

    <variant>.zarr/                      root attrs: provenance (model, revision, mode, timestep, seed, ...),
                                         ``fingerprint``, ``layers`` (names in order), ``n_images``,
                                         ``n_complete`` (images written so far), ``complete`` (bool)
      image                              (image,) str: image ids, in dataset order
      label                              (image,) int64: class label (-1 if unknown)
      <group>/                           one group per layer; group = torch module path, e.g.
                                         ``up_blocks.1.upsamplers.0``; attrs ``layer`` (paper name),
                                         ``layer_index``, ``channels``, ``height``, ``width``
        repr                             (image, channel, y, x) float16, chunk = 1 image, shard = batch
        image, label                     copies of the root coordinates (so each group is a complete Dataset)

Where the stores of a run are (``<run>/representations[/shard<i>of<n>]/<variant>.zarr``)
are decided by :mod:`diffaudit.layout`.

Writing goes batch by batch into preallocated arrays; ``n_complete`` is advanced only after every layer
of a batch is on disk, and ``complete`` only after the last batch. A resumed run restarts at
``n_complete`` (the partial batch is simply overwritten), so nothing is lost or duplicated.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import zarr

from .errors import DiffauditError, MissingInputError, UserError
from .layers import group_name
from .layout import FULL, crop_token_size, list_variants, store_path

STORE_FORMAT = "diffaudit-repr/1"


class StoreMismatchError(DiffauditError, RuntimeError):
    """An existing store was written with a different configuration."""


class IncompleteStoreError(DiffauditError, RuntimeError):
    """A store is being read that has not been completely written."""


def fingerprint(config: dict) -> str:
    """A stable hash of everything that determines a store's content."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class StoreWriter:
    """Create or resume a representation store and write it batch by batch."""

    def __init__(self, path: str | Path, *, layers: Sequence[str], image_ids: Sequence[str],
                 labels: Sequence[int] | None, config: dict, attrs: dict | None = None,
                 shard_images: int = 20, dtype: str = "float16", layer_indices: Sequence[int] | None = None):
        self.path = Path(path)
        self.layers = list(layers)
        self.layer_indices = list(layer_indices) if layer_indices is not None else list(range(len(self.layers)))
        self.image_ids = [str(i) for i in image_ids]
        self.labels = np.asarray(labels if labels is not None else [-1] * len(self.image_ids), dtype=np.int64)
        self.n_images = len(self.image_ids)
        self.shard_images = max(1, min(int(shard_images), self.n_images))
        self.dtype = np.dtype(dtype)
        self.fingerprint = fingerprint({**config, "layers": self.layers, "images": self.image_ids,
                                        "dtype": str(self.dtype)})
        self.root = self._open_or_create(attrs or {}, config)
        self._arrays: dict[str, zarr.Array] = {}

    # -- setup ---------------------------------------------------------------------------------
    def _open_or_create(self, attrs: dict, config: dict) -> zarr.Group:
        if self.path.exists():
            try:
                root = zarr.open_group(str(self.path), mode="r+")
                old = dict(root.attrs)
            except Exception:  # noqa: BLE001 - unreadable leftovers are restarted below
                old = {}
            if old.get("fingerprint") == self.fingerprint and old.get("format") == STORE_FORMAT:
                if int(old.get("n_complete", 0)) > 0 or old.get("complete"):
                    return root
            elif old.get("fingerprint") and int(old.get("n_complete", 0)) > 0:
                changed = sorted(k for k in set(config) | set(old.get("config", {}))
                                 if config.get(k) != old.get("config", {}).get(k))
                raise StoreMismatchError(
                    f"{self.path} holds {old.get('n_complete')} images extracted with a different configuration "
                    f"(differs in: {', '.join(changed) or 'layers/images/dtype'}); refusing to mix. To start over, "
                    f"delete it (rm -rf {self.path}) or choose another results_dir."
                )
        root = zarr.open_group(str(self.path), mode="w", zarr_format=3)
        root.attrs.update({**attrs, "format": STORE_FORMAT, "config": config, "fingerprint": self.fingerprint,
                           "layers": self.layers, "layer_indices": self.layer_indices,
                           "n_images": self.n_images, "n_complete": 0, "complete": False})
        self._write_coords(root)
        return root

    def _write_coords(self, group: zarr.Group) -> None:
        ids = group.create_array("image", shape=(self.n_images,), dtype=str, dimension_names=["image"],
                                 chunks=(max(1, self.n_images),), overwrite=True)
        ids[:] = np.asarray(self.image_ids, dtype=object)
        lab = group.create_array("label", shape=(self.n_images,), dtype="int64", dimension_names=["image"],
                                 chunks=(max(1, self.n_images),), fill_value=-1, overwrite=True)
        lab[:] = self.labels

    @property
    def n_complete(self) -> int:
        return int(self.root.attrs.get("n_complete", 0))

    @property
    def complete(self) -> bool:
        return bool(self.root.attrs.get("complete", False))

    def _array(self, layer: str, shape: tuple[int, ...]) -> zarr.Array:
        if layer in self._arrays:
            return self._arrays[layer]
        name = group_name(layer)
        c, h, w = shape
        full = (self.n_images, c, h, w)
        existing = None
        if self.n_complete > 0 and name in self.root:
            existing = self.root[name]["repr"]
            if tuple(existing.shape) != full:
                raise StoreMismatchError(f"{self.path}/{name}: stored shape {existing.shape} != {full}; "
                                         f"delete {self.path} to start over")
        if existing is None:
            g = self.root.create_group(name, overwrite=True)
            g.attrs.update({"layer": layer, "layer_index": self.layer_indices[self.layers.index(layer)],
                            "channels": c, "height": h, "width": w})
            existing = g.create_array(
                "repr", shape=full, dtype=self.dtype, chunks=(1, c, h, w), shards=(self.shard_images, c, h, w),
                dimension_names=["image", "channel", "y", "x"], fill_value=0,
                # uncompressed: float16 U-Net activations shrink by only ~8 % under zstd (their mantissa bits are
                # noise), while decoding runs at ~1-1.7 GB/s and was the dominant cost of every analysis pass
                compressors=None,
                attributes={"coordinates": "label", "long_name": f"U-Net representation at {layer}"},
            )
            self._write_coords(g)
        self._arrays[layer] = existing
        return existing

    # -- writing -------------------------------------------------------------------------------
    def write_batch(self, start: int, batch: dict[str, np.ndarray],
                    nonfinite: dict[str, np.ndarray] | None = None) -> None:
        """Write representations of images ``start:start+B`` for every layer, then advance ``n_complete``.
        ``nonfinite`` (``extraction.nonfinite: count``): ``{layer: non-finite values per image of the batch}``, merged
        into the layer's attribute ``nonfinite`` (:meth:`_record_nonfinite`) before ``n_complete`` advances."""
        missing = set(self.layers) - set(batch)
        if missing:
            raise ValueError(f"batch lacks layers {sorted(missing)}")
        if start != self.n_complete:
            raise ValueError(f"batches must be written in order: expected start {self.n_complete}, got {start}")
        n = None
        for layer in self.layers:
            arr = np.asarray(batch[layer])
            n = arr.shape[0]
            self._array(layer, arr.shape[1:])[start:start + n] = arr.astype(self.dtype, copy=False)
        if nonfinite is not None:
            self._record_nonfinite(start, nonfinite)
        self.root.attrs["n_complete"] = start + (n or 0)

    def _record_nonfinite(self, start: int, counts: dict[str, np.ndarray]) -> None:
        """Merge per-image counts of non-finite values into each layer's attribute ``nonfinite``: ``count`` (values in
        all images), ``images`` (the ids of the images with any, in dataset order) and ``counts`` (per such image).
        Keyed by image, so a batch written again after an interruption is not counted twice."""
        for layer, per_image in counts.items():
            g = self.root[group_name(layer)]
            old = dict(g.attrs.get("nonfinite") or {})
            by_image = dict(zip(old.get("images", []), old.get("counts", [])))
            for image, n in zip(self.image_ids[start:start + len(per_image)], per_image):
                if int(n):
                    by_image[image] = int(n)
                else:
                    by_image.pop(image, None)
            images = [i for i in self.image_ids if i in by_image]
            g.attrs["nonfinite"] = {"count": int(sum(by_image.values())), "images": images,
                                    "counts": [by_image[i] for i in images]}

    def finalize(self) -> None:
        if self.n_complete != self.n_images:
            raise IncompleteStoreError(f"{self.path}: {self.n_complete}/{self.n_images} images written")
        self.root.attrs["complete"] = True


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

class ReprStore:
    """Read access to a complete store: metadata, and per-layer streaming over image chunks."""

    def __init__(self, path: str | Path, *, require_complete: bool = True):
        self.path = Path(path)
        if not self.path.exists():
            raise MissingInputError(f"representation store {self.path} does not exist; run the extraction first")
        self.root = zarr.open_group(str(self.path), mode="r")
        self.attrs = dict(self.root.attrs)
        if self.attrs.get("format") != STORE_FORMAT:
            raise StoreMismatchError(f"{self.path} is not a diffaudit representation store")
        if require_complete and not self.attrs.get("complete"):
            raise IncompleteStoreError(
                f"{self.path} is incomplete ({self.attrs.get('n_complete')}/{self.attrs.get('n_images')} images); "
                "re-run the extraction to finish it"
            )
        self.layers: list[str] = list(self.attrs["layers"])
        self.layer_indices: list[int] = list(self.attrs.get("layer_indices", range(len(self.layers))))
        self.image_ids = np.array([str(x) for x in self.root["image"][:]], dtype=object)
        self.labels = np.asarray(self.root["label"][:])

    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    def select_layers(self, layers=None) -> list[str]:
        """``layers`` (default: all stored layers) after checking each is in the store."""
        layers = list(self.layers) if layers is None else list(layers)
        missing = [layer for layer in layers if layer not in self.layers]
        if missing:
            raise KeyError(f"layer(s) {missing} not in store {self.path} (has {self.layers})")
        return layers

    def layer_index(self, layer: str) -> int:
        """The layer's index in the extraction's layer list (``layer_index`` in every table)."""
        return int(self.layer_indices[self.layers.index(layer)])

    def layer_attrs(self, layer: str) -> dict:
        return dict(self.root[group_name(layer)].attrs)

    def shape(self, layer: str) -> tuple[int, int, int, int]:
        return tuple(self.root[group_name(layer)]["repr"].shape)

    def array(self, layer: str) -> zarr.Array:
        if layer not in self.layers:
            raise KeyError(f"layer {layer!r} not in store {self.path} (has {self.layers})")
        return self.root[group_name(layer)]["repr"]

    def iter_chunks(self, layer: str, chunk_images: int = 20, start: int = 0, stop: int | None = None,
                    dtype=np.float32) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_image_index, array[(b, C, H, W)])`` over images, bounded memory."""
        arr = self.array(layer)
        stop = arr.shape[0] if stop is None else stop
        for i in range(start, stop, chunk_images):
            yield i, np.asarray(arr[i:min(i + chunk_images, stop)], dtype=dtype)

    def to_datatree(self):
        """The whole store as a lazily loaded xarray DataTree."""
        import xarray as xr

        return xr.open_datatree(str(self.path), engine="zarr", consolidated=False)

    def dataset(self, layer: str):
        """One layer as a lazily loaded xarray Dataset (variable ``repr``)."""
        import xarray as xr

        return xr.open_zarr(str(self.path), group=group_name(layer), consolidated=False)


# Attributes that legitimately differ between the shards of one extraction.
SHARD_ATTRS = {"fingerprint", "n_images", "n_complete", "shard", "image_range", "config"}


class _ConcatArray:
    """Read-only concatenation of the shards' arrays along the image axis (numpy-style indexing on axis 0)."""

    def __init__(self, arrays: list, offsets: list[int]):
        self.arrays, self.offsets = arrays, offsets
        self.shape = (offsets[-1], *arrays[0].shape[1:])
        self.dtype = arrays[0].dtype

    def __getitem__(self, key):
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if isinstance(first, (int, np.integer)):
            i = int(first) + (self.shape[0] if first < 0 else 0)
            k = int(np.searchsorted(self.offsets, i, side="right")) - 1
            return self.arrays[k][(i - self.offsets[k], *rest)]
        if not isinstance(first, slice) or first.step not in (None, 1):
            raise IndexError("shard views support an integer or a contiguous slice on the image axis")
        start, stop, _ = first.indices(self.shape[0])
        parts = []
        for k, arr in enumerate(self.arrays):
            a, b = max(start, self.offsets[k]), min(stop, self.offsets[k + 1])
            if a < b:
                parts.append(np.asarray(arr[(slice(a - self.offsets[k], b - self.offsets[k]), *rest)]))
        if not parts:
            return np.asarray(self.arrays[0][(slice(0, 0), *rest)])
        return np.concatenate(parts, axis=0)

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out.astype(dtype) if dtype is not None else out


class ShardedStore(ReprStore):
    """Several shard stores of one extraction (consecutive image ranges) read as one store."""

    def __init__(self, paths: list[str | Path]):
        self.shards = [ReprStore(p) for p in paths]
        first = self.shards[0]
        for other in self.shards[1:]:
            a = {k: v for k, v in first.attrs.items() if k not in SHARD_ATTRS}
            b = {k: v for k, v in other.attrs.items() if k not in SHARD_ATTRS}
            if a != b or other.layers != first.layers:
                diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)) or ["layers"]
                raise StoreMismatchError(f"shards {first.path} and {other.path} come from different configurations "
                                         f"(differ in: {', '.join(diff)}); re-extract them together")
        self.path = Path(paths[0]).parent.parent / f"{Path(paths[0]).name} (+{len(paths) - 1} shards)"
        self.attrs = {**first.attrs, "n_images": sum(s.n_images for s in self.shards),
                      "shards": [str(s.path) for s in self.shards]}
        self.layers = first.layers
        self.layer_indices = first.layer_indices
        self.image_ids = np.concatenate([s.image_ids for s in self.shards])
        self.labels = np.concatenate([s.labels for s in self.shards])
        if len(set(self.image_ids)) != len(self.image_ids):
            raise StoreMismatchError(f"shards of {self.path} overlap: an image id occurs twice")
        self.offsets = list(np.cumsum([0] + [s.n_images for s in self.shards]))

    def layer_attrs(self, layer: str) -> dict:
        return self.shards[0].layer_attrs(layer)

    def shape(self, layer: str) -> tuple[int, int, int, int]:
        return (self.n_images, *self.shards[0].shape(layer)[1:])

    def array(self, layer: str) -> _ConcatArray:
        return _ConcatArray([s.array(layer) for s in self.shards], self.offsets)

    def to_datatree(self):
        raise NotImplementedError("open the shards' DataTrees individually (ShardedStore.shards)")

    def dataset(self, layer: str):
        import xarray as xr

        return xr.concat([s.dataset(layer) for s in self.shards], dim="image")


def open_variant(rep_dirs: str | Path | list, variant: str) -> ReprStore:
    """The ``variant`` store of one representation directory, or of several shard directories as one store."""
    dirs = [rep_dirs] if isinstance(rep_dirs, (str, Path)) else list(rep_dirs)
    if len(dirs) == 1:
        return ReprStore(store_path(dirs[0], variant))
    return ShardedStore([store_path(d, variant) for d in dirs])


def shard_ranges(n_images: int, batch_size: int, n_shards: int) -> list[tuple[int, int]]:
    """Image ranges of ``n_shards`` shards, cut at batch boundaries (so paper-mode noise is unchanged)."""
    n_batches = -(-n_images // batch_size)
    if not 1 <= n_shards <= n_batches:
        raise UserError(f"extraction.shards={n_shards} must be between 1 and the number of batches ({n_batches})")
    cuts = [k * n_batches // n_shards for k in range(n_shards + 1)]
    return [(min(a * batch_size, n_images), min(b * batch_size, n_images)) for a, b in zip(cuts, cuts[1:])]


def open_model_stores(rep_dirs: str | Path | Sequence[str | Path]):
    """``(full, {token_size: crop store})`` of one model's representation directory (or its shard directories,
    read as one dataset)."""
    dirs = [rep_dirs] if isinstance(rep_dirs, (str, Path)) else list(rep_dirs)
    full = open_variant(dirs, FULL)
    crops = {crop_token_size(v): open_variant(dirs, v) for v in list_variants(dirs[0])
             if crop_token_size(v) is not None}
    return full, crops


class StoreView:
    """A read-only view of a store (:class:`ReprStore` or :class:`ShardedStore`): a subset of its images, in the
    given order, and/or a transform applied to every chunk it yields (e.g. a mitigation of the features,
    :mod:`diffaudit.harm.mitigations`). It offers what the analyses read (``layers``, ``shape``, ``iter_chunks``,
    ``image_ids``, ``labels``, ...), so any analysis runs unchanged on mitigated features or on some images only.

    ``transform(layer, x) -> x'`` receives float32 ``(b, C, H, W)`` chunks and must keep their shape. Images are
    read in contiguous runs of the underlying store; memory stays one chunk."""

    def __init__(self, store, images: Sequence[int] | None = None, transform=None):
        self.store = store
        self.images = (np.arange(store.n_images) if images is None else np.asarray(images, dtype=np.int64))
        if self.images.size and (self.images.min() < 0 or self.images.max() >= store.n_images):
            raise IndexError(f"image indices outside 0..{store.n_images - 1} of {store.path}")
        self.transform = transform
        self.path = store.path
        self.attrs = store.attrs
        self.layers = store.layers
        self.layer_indices = store.layer_indices
        self.image_ids = np.asarray(store.image_ids)[self.images]
        self.labels = np.asarray(store.labels)[self.images]

    @property
    def n_images(self) -> int:
        return int(self.images.size)

    def select_layers(self, layers=None) -> list[str]:
        return self.store.select_layers(layers)

    def layer_index(self, layer: str) -> int:
        return self.store.layer_index(layer)

    def layer_attrs(self, layer: str) -> dict:
        return self.store.layer_attrs(layer)

    def shape(self, layer: str) -> tuple[int, int, int, int]:
        return (self.n_images, *self.store.shape(layer)[1:])

    def read(self, layer: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Images ``start:stop`` of the view as float32 ``(b, C, H, W)``, transformed."""
        stop = self.n_images if stop is None else stop
        idx = self.images[start:stop]
        arr = self.store.array(layer)  # a StoreView of a LayerCache reads the cache
        parts, i = [], 0
        while i < idx.size:  # contiguous runs of the underlying store
            j = i + 1
            while j < idx.size and idx[j] == idx[j - 1] + 1:
                j += 1
            parts.append(np.asarray(arr[int(idx[i]):int(idx[j - 1]) + 1], dtype=np.float32))
            i = j
        x = np.concatenate(parts) if parts else np.zeros((0, *self.store.shape(layer)[1:]), np.float32)
        return self.transform(layer, x) if self.transform is not None else x

    def iter_chunks(self, layer: str, chunk_images: int = 20, start: int = 0, stop: int | None = None,
                    dtype=np.float32) -> Iterator[tuple[int, np.ndarray]]:
        stop = self.n_images if stop is None else stop
        for i in range(start, stop, chunk_images):
            x = self.read(layer, i, min(i + chunk_images, stop))
            if dtype is not None:
                x = x.astype(dtype, copy=False)
            yield i, x
            del x  # before the next read: one chunk in memory, not two


class LayerCache(StoreView):
    """A store with one layer held in memory (as stored, e.g. float16): for an analysis that reads the same layer
    many times (the harm analysis: every mitigation's fit, probe and measures). Memory: that layer, as much as the
    position probe holds of it. Other layers are read from the store."""

    def __init__(self, store, layer: str):
        super().__init__(store)
        self.cached_layer = layer
        self._data = np.asarray(store.array(layer)[:])

    def array(self, layer: str):
        return self._data if layer == self.cached_layer else self.store.array(layer)

    def read(self, layer: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        if layer != self.cached_layer:
            return super().read(layer, start, stop)
        stop = self.n_images if stop is None else stop
        return np.asarray(self._data[start:stop], dtype=np.float32)
