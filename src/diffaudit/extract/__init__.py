"""Extraction of backbone representations (U-Net or diffusion transformer): one pass per batch, forward hooks on the
chosen layers, stores per variant. The public names are re-exported here (``from diffaudit.extract import X``).

Modules, by concern: :mod:`~diffaudit.extract.settings` (settings and their validation), :mod:`~.extractor` (the
extractor: one hooked backbone pass per batch, the family deciding the recipe), :mod:`~.hooks` (hooked passes that
stop after the last needed layer, padding, random weights, deterministic cuDNN), :mod:`~.writer` (the background
store writer), :mod:`~.memory` (CPU heap reuse), :mod:`~.plan` (the variants and their footprint on disk) and
:mod:`~.run` (:func:`run_extraction`: a whole dataset into stores).

Two fidelity modes (docs/method.md §1.2 and §1.5):

``paper``
    Exactly what ``sdhelper==1.0.0``'s ``img2repr(images, layers, step=50, seed=42)`` does: pixels /255
    into the VAE ([0, 1]), a VAE posterior *sample*, ``torch.manual_seed(seed)`` at every batch, one noise
    tensor shared by every image of a batch, DDIM ``add_noise`` at ``t``, the pipeline scheduler's
    ``scale_model_input``, the empty prompt, fp16 on CUDA / fp32 on CPU, batch size 20.
``corrected``
    [-1, 1] pixels, posterior mean, independent noise per image drawn from a CPU generator seeded by
    (seed, image index) so it does not depend on batch size or device, no ``scale_model_input`` (the
    latents are VP-noised; Euler's sigma scaling does not apply), and crop-consistent noise for the
    cropped variants (the crop of the full image's noise).

Variants: ``full`` (all layers on the full images) and one ``crop<t>`` per token size ``t`` present in
the chosen layers (images cropped by one token ring, keeping only the layers of that resolution), as the
corner/border control needs.

Footprint: before the first batch, :func:`run_extraction` computes the bytes its stores will hold (layer
channels x height x width x images x itemsize per variant, the shapes from one batch-1 pass per variant of the
backbone's architecture on the ``meta`` device, plus the stores' shard indexes and metadata; a resumed run counts
only what is left), logs it and stops with :class:`InsufficientDiskSpaceError` when the target file system lacks the
space. ``diffaudit footprint`` (:mod:`diffaudit.footprint`) prints the paper run's footprint per model
(docs/footprint.md).

Speed (benchmarks/bench_extraction_variants.py), none of it changing a stored bit: each pass stops right after the
last layer its variant needs (:func:`hooked_pass`; a crop variant keeps the layers of one resolution, so most of the
up path is skipped), the maps are converted to the store dtype before the copy to the CPU, one writer thread serves
all variants (a variant's last batch is written while the next one computes), and on the CPU glibc keeps freed
activations for reuse instead of page-faulting fresh ones (:func:`cpu_heap_reuse`).
"""
from __future__ import annotations

from .extractor import Extractor, crop_image, describe_family
from .hooks import conv_padding, deterministic_cudnn, hooked_pass, no_tf32, probe_shapes, random_unet
from .memory import cpu_heap_reuse
from .plan import (COORD_BYTES_PER_IMAGE, DISK_MARGIN_BYTES, DISK_MARGIN_FRACTION, LAYER_META_BYTES,
                   SHARD_INDEX_BYTES, SHARD_INDEX_BYTES_PER_IMAGE, STORE_META_BYTES, Footprint,
                   InsufficientDiskSpaceError, VariantPlan, check_disk_space, disk_margin, extraction_footprint,
                   human_bytes, plan_variants, store_nbytes, token_sizes)
from .run import library_versions, run_extraction
from .settings import MODES, ExtractionSettings, describe_switches
from .writer import NonFiniteError, _BackgroundWriter, check_finite, count_nonfinite, extract_variant

__all__ = ["NonFiniteError", "check_finite", "count_nonfinite", "no_tf32", "COORD_BYTES_PER_IMAGE", "DISK_MARGIN_BYTES", "DISK_MARGIN_FRACTION", "LAYER_META_BYTES", "MODES",
           "SHARD_INDEX_BYTES", "SHARD_INDEX_BYTES_PER_IMAGE", "STORE_META_BYTES", "ExtractionSettings", "Extractor",
           "Footprint", "InsufficientDiskSpaceError", "VariantPlan", "_BackgroundWriter", "check_disk_space",
           "conv_padding", "cpu_heap_reuse", "crop_image", "describe_family", "describe_switches",
           "deterministic_cudnn", "disk_margin", "extract_variant", "extraction_footprint", "hooked_pass",
           "human_bytes", "library_versions", "plan_variants", "probe_shapes", "random_unet", "run_extraction",
           "store_nbytes", "token_sizes"]
