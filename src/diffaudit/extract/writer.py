"""Writing an extraction into its stores: one background writer thread (:class:`_BackgroundWriter`), the batches a
store still lacks (:func:`_extract_batches`), one variant into one store (:func:`extract_variant`)."""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..store import StoreWriter
from .extractor import Extractor, crop_image

log = logging.getLogger("diffaudit.extract")


class _BackgroundWriter:
    """Writes batches on a thread so the U-Net can run meanwhile; at most one batch is queued.

    One writer thread can serve several stores in turn (``put(..., writer=)``, ``finalize(writer)``):
    :func:`run_extraction` keeps one for all variants, so a variant's last batch is written while the next variant
    computes. An error of the thread is raised by the next ``put``/``finalize``/``close``; once one occurred, nothing
    more is written."""

    def __init__(self, writer: StoreWriter | None = None):
        self.writer = writer
        self.q: queue.Queue = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is None:
                try:
                    item()
                except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                    self.error = exc

    def _submit(self, job: Callable[[], None]):
        if self.error:
            raise self.error
        self.q.put(job)

    def put(self, start: int, batch: dict[str, np.ndarray], writer: StoreWriter | None = None,
            nonfinite: dict[str, np.ndarray] | None = None):
        w = writer or self.writer
        if nonfinite is None:
            self._submit(lambda: w.write_batch(start, batch))
        else:  # extraction.nonfinite: count
            self._submit(lambda: w.write_batch(start, batch, nonfinite=nonfinite))

    def finalize(self, writer: StoreWriter | None = None):
        """Mark the store complete once its queued batches are written."""
        self._submit((writer or self.writer).finalize)

    def close(self):
        self.q.put(None)
        self.thread.join()
        if self.error:
            raise self.error


def _torch_dtype(dtype) -> torch.dtype | None:
    """The torch dtype of a numpy store dtype (None if torch has none)."""
    return getattr(torch, np.dtype(dtype).name, None) if np.dtype(dtype).kind in "fiub" else None


class NonFiniteError(UserError):
    """A representation holds inf or NaN (e.g. a float16 overflow): nothing of that batch is written."""


def check_finite(reps: dict[str, torch.Tensor], image_ids: Sequence[str], model: str = "") -> None:
    """Stop (:class:`NonFiniteError`, one line naming model, layer and image) before a batch with an inf or NaN in any
    map is written; the batches before it stay, so the run resumes after the cause is fixed."""
    for layer, v in reps.items():
        bad = ~torch.isfinite(v.reshape(v.shape[0], -1)).all(dim=1)
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise NonFiniteError(
                f"non-finite values (inf/NaN) in layer {layer} of image {image_ids[i]}"
                + (f" of model {model}" if model else "")
                + "; a float16 overflow is the usual cause: set extraction.precision to bfloat16 or float32")


def count_nonfinite(reps: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """``{layer: number of inf/NaN values per image}`` of a batch (``extraction.nonfinite: count``)."""
    return {layer: (~torch.isfinite(v.reshape(v.shape[0], -1))).sum(dim=1).numpy() for layer, v in reps.items()}


def _extract_batches(extractor: Extractor, writer: StoreWriter, bg: _BackgroundWriter, *,
                     images_fn: Callable[[int, int], list], labels: Sequence[int] | None, layers: Sequence[str],
                     crop_px: int, full_size: int | None, progress: bool, desc: str, stop_after: int | None,
                     index_offset: int) -> bool:
    """Queue the batches ``writer`` still lacks on ``bg`` (and its finalisation after the last one); False if
    ``stop_after`` stopped it first."""
    from tqdm.auto import tqdm

    s = extractor.settings
    n = writer.n_images
    start0 = writer.n_complete
    out_dtype = _torch_dtype(s.store_dtype)  # converted in one pass before the copy (identical to numpy's astype)
    model = str(writer.root.attrs.get("model", ""))  # for the non-finite check's message (read once, not per batch)
    bar = tqdm(total=n, initial=start0, unit="img", desc=desc, disable=not progress, dynamic_ncols=True)
    done_batches = 0
    try:
        for start in range(start0, n, s.batch_size):
            stop = min(start + s.batch_size, n)
            imgs = images_fn(start, stop)
            if crop_px:
                imgs = [crop_image(im, crop_px) for im in imgs]
            reps = extractor.run_batch(imgs, range(index_offset + start, index_offset + stop), layers=layers,
                                       crop_px=crop_px, full_size=full_size, out_dtype=out_dtype,
                                       labels=None if labels is None else list(labels[start:stop]))
            counts = None
            if s.nonfinite == "count":
                counts = count_nonfinite(reps)
                for layer, c in counts.items():
                    if c.any():
                        log.warning("%d non-finite values in layer %s of %d image(s), the first %s%s (counted in the "
                                    "store)", int(c.sum()), layer, int((c > 0).sum()),
                                    writer.image_ids[start + int(np.flatnonzero(c)[0])],
                                    f" of model {model}" if model else "")
            else:
                check_finite(reps, writer.image_ids[start:stop], model=model)
            bg.put(start, {k: v.numpy() for k, v in reps.items()}, writer=writer, nonfinite=counts)
            bar.update(stop - start)
            done_batches += 1
            if stop_after is not None and done_batches >= stop_after and stop < n:
                return False
    finally:
        bar.close()
    bg.finalize(writer)
    return True


def _variant_writer(extractor: Extractor, path: Path, *, image_ids, labels, layers, layer_indices, config,
                    attrs) -> StoreWriter:
    s = extractor.settings
    return StoreWriter(path, layers=layers, image_ids=image_ids, labels=labels, config=config, attrs=attrs,
                       shard_images=s.batch_size, dtype=s.store_dtype, layer_indices=layer_indices)


def extract_variant(extractor: Extractor, path: Path, *, images_fn: Callable[[int, int], list],
                    image_ids: Sequence[str], labels: Sequence[int] | None, layers: Sequence[str],
                    layer_indices: Sequence[int], config: dict, attrs: dict, crop_px: int = 0,
                    full_size: int | None = None, progress: bool = True, desc: str = "",
                    stop_after: int | None = None, index_offset: int = 0) -> StoreWriter:
    """Extract one variant into the store at ``path`` (resuming from its last complete batch).

    ``index_offset`` is the dataset index of the first image (for shards): corrected-mode noise is seeded by it.
    """
    writer = _variant_writer(extractor, path, image_ids=image_ids, labels=labels, layers=layers,
                             layer_indices=layer_indices, config=config, attrs=attrs)
    if writer.complete:
        return writer
    bg = _BackgroundWriter(writer)
    try:
        _extract_batches(extractor, writer, bg, images_fn=images_fn, labels=labels, layers=layers, crop_px=crop_px,
                         full_size=full_size, progress=progress, desc=desc, stop_after=stop_after,
                         index_offset=index_offset)
    finally:
        bg.close()
    return writer


