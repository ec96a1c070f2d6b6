"""The whole extraction of a dataset into the ``full`` and ``crop<t>`` stores (:func:`run_extraction`)."""
from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from ..store import store_path
from .extractor import Extractor, describe_family
from .hooks import deterministic_cudnn
from .memory import cpu_heap_reuse
from .plan import check_disk_space, extraction_footprint, plan_variants
from .settings import ExtractionSettings, describe_switches
from .writer import _BackgroundWriter, _extract_batches, _variant_writer


def run_extraction(pipe, *, dataset_images: Callable[[int, int], list], image_ids: Sequence[str],
                   labels: Sequence[int] | None, layers: Sequence[str], settings: ExtractionSettings,
                   out_dir: str | Path, provenance: dict, image_size: int = 512, progress: bool = True,
                   stop_after: int | None = None, index_offset: int = 0, label_names: Sequence[str] = ()) -> Path:
    """Extract the ``full`` variant and every ``crop<t>`` variant into ``out_dir``.

    Work happens in ``<out_dir>.partial``; it is renamed to ``out_dir`` only when every store is complete,
    so a directory at ``out_dir`` is always complete. Re-running after an interruption resumes.
    Before anything is written, the bytes still to write are estimated, logged and checked against the free space
    (:class:`InsufficientDiskSpaceError`). cuDNN runs deterministic; its flags are restored afterwards.
    ``settings.resolution`` (an experiment) resizes the ``image_size`` images before anything else; the stores
    then record that size as ``image_size``. ``label_names`` (by label) fill a prompt that names the class.
    """
    out_dir = Path(out_dir)
    if settings.resolution and int(settings.resolution) != int(image_size):
        image_size, dataset_images = int(settings.resolution), _resized(dataset_images, int(settings.resolution))
    work = out_dir.with_name(out_dir.name + ".partial")
    layers = list(layers)
    with deterministic_cudnn():
        extractor = Extractor(pipe, layers, settings, label_names=label_names)
        base_config = {**provenance, **settings.config(), "device": extractor.device.type,
                       "compute_dtype": str(extractor.dtype).replace("torch.", ""), "image_size": image_size}
        attrs = {**base_config, "library_versions": library_versions(),
                 **describe_switches(settings, extractor.switches, extractor.family.scales_model_input)}
        name = provenance.get("model", "")
        with cpu_heap_reuse(extractor.device.type == "cpu"):
            # the first probe (all layers) is a complete pass; the crops' probes and every batch stop after the
            # last layer they need
            plan = plan_variants(extractor.layer_shapes, layers, image_size, settings.crops)
            attrs.update(describe_family(extractor))  # after the first conditioning (what it used: T5 or not)
            extra = {v.name: ({"variant": v.name, "crop_px": v.crop_px} if v.crop_px else {"variant": v.name})
                     for v in plan}
            configs = {v: {**base_config, **e} for v, e in extra.items()}
            check_disk_space(extraction_footprint(plan, work, image_ids, configs, settings))
            work.mkdir(parents=True, exist_ok=True)
            writers = []
            # one writer thread for every variant: a variant's last batch is written while the next one computes
            bg = _BackgroundWriter()
            try:
                for v in plan:
                    w = _variant_writer(extractor, store_path(work, v.name), image_ids=image_ids, labels=labels,
                                        layers=v.layers, layer_indices=v.layer_indices, config=configs[v.name],
                                        attrs={**attrs, **extra[v.name]})
                    writers.append(w)
                    if w.complete:
                        continue
                    if not _extract_batches(extractor, w, bg, images_fn=dataset_images, labels=labels,
                                            layers=v.layers, crop_px=v.crop_px,
                                            full_size=image_size if v.crop_px else None, progress=progress,
                                            desc=f"{name} {v.name}", stop_after=stop_after,
                                            index_offset=index_offset):
                        break
            finally:
                bg.close()
        if len(writers) < len(plan) or not all(w.complete for w in writers):
            return work
    if out_dir.exists():
        shutil.rmtree(out_dir)
    work.rename(out_dir)
    return out_dir


def _resized(images_fn: Callable[[int, int], list], size: int) -> Callable[[int, int], list]:
    from PIL import Image

    return lambda a, b: [im.resize((size, size), Image.BICUBIC) for im in images_fn(a, b)]



def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "diffusers", "transformers", "numpy", "zarr", "xarray", "diffaudit"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
