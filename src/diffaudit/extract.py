"""Extraction of U-Net representations: one U-Net pass per batch, forward hooks on the chosen layers.

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
U-Net's architecture on the ``meta`` device, plus the stores' shard indexes and metadata; a resumed run counts only
what is left), logs it and stops with :class:`InsufficientDiskSpaceError` when the target file system lacks the space.
``diffaudit footprint`` (:mod:`diffaudit.footprint`) prints the paper run's footprint per model (docs/footprint.md).

Speed (benchmarks/bench_extraction_variants.py), none of it changing a stored bit: each U-Net pass stops right after
the last layer its variant needs (:func:`hooked_pass`; a crop variant keeps the layers of one resolution, so most of
the up path is skipped), the maps are converted to the store dtype before the copy to the CPU, one writer thread
serves all variants (a variant's last batch is written while the next one computes), and on the CPU glibc keeps freed
activations for reuse instead of page-faulting fresh ones (:func:`cpu_heap_reuse`).
"""
from __future__ import annotations

import copy
import logging
import queue
import shutil
import threading
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import experiments, layout
from .errors import DiffauditError
from .layers import resolve_layers
from .models import DIT_FAMILIES, backbone, pipeline_family
from .store import STORE_FORMAT, StoreWriter, fingerprint, store_path

log = logging.getLogger(__name__)

MODES = ("paper", "corrected")


@dataclass(frozen=True)
class ExtractionSettings:
    mode: str = "paper"
    timestep: int = 50
    seed: int = 42
    batch_size: int = 20
    prompt: str = ""
    precision: str = "auto"  # auto = fp16 on CUDA, fp32 on CPU (the paper's rule)
    store_dtype: str = "float16"
    crops: bool = True
    # Experiment switches (diffaudit.experiments); None = what the mode does (and no entry in the stores' config).
    padding_mode: str | None = None
    noise: str | None = None
    pixel_range: str | None = None
    latent: str | None = None
    resolution: int | None = None
    weights: str | None = None
    # Diffusion transformers, corrected mode: the flow-matching noise level (None: as noisy as ``timestep``).
    sigma: float | None = None

    @property
    def switches(self) -> dict:
        """Every experiment switch with its value, the mode's defaults filled in."""
        return experiments.resolved({k: v for k, v in asdict(self).items() if v is not None})

    def config(self) -> dict:
        """The settings as the stores record them (unset switches left out, so a baseline's config is what it was
        before experiments existed)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"extraction mode must be one of {MODES}, got {self.mode!r}")
        for key, value in asdict(self).items():
            allowed = experiments.CAUSES.get(key)
            if value is not None and isinstance(allowed, tuple) and value not in allowed:
                raise ValueError(f"extraction {key} must be one of {allowed}, got {value!r}")
        if not 0 <= int(self.timestep) <= 999:
            raise ValueError(f"timestep must be in [0, 999], got {self.timestep}")
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.sigma is not None and not 0 < float(self.sigma) <= 1:
            raise ValueError(f"sigma must be in (0, 1], got {self.sigma}")


class InsufficientDiskSpaceError(DiffauditError, OSError):
    """The extraction's stores would not fit on the target file system; the message says what to do."""


@contextmanager
def deterministic_cudnn():
    """cuDNN deterministic and without benchmark autotuning for the duration; the previous flags are restored
    afterwards (as the probe does). The flags only act on CUDA; elsewhere this is a no-op in effect."""
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


# glibc mallopt parameters (malloc.h) and the values cpu_heap_reuse sets and restores.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_HEAP_REUSE = {_M_MMAP_THRESHOLD: 2**31 - 1, _M_TRIM_THRESHOLD: 2**31 - 1}
# Afterwards: the values glibc's dynamic thresholds settle at after large numpy/torch buffers (mmap threshold at its
# 32 MiB ceiling, trim threshold twice that).
_HEAP_AFTER = {_M_MMAP_THRESHOLD: 32 * 2**20, _M_TRIM_THRESHOLD: 64 * 2**20}
_heap_lock = threading.Lock()
_heap_depth = 0


def _glibc():
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextmanager
def cpu_heap_reuse(enabled: bool = True):
    """On glibc, keep freed memory in the heap for reuse for the duration (a no-op elsewhere, or if not ``enabled``).

    A U-Net pass on the CPU allocates and frees activations of tens to hundreds of MB at every layer. glibc serves
    each block above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and unmaps it on free, so every such
    activation is page-faulted and zeroed by the kernel again (8 million page faults on the parity-sized run,
    benchmarks/bench_extraction_variants.py). Raising the mmap and trim thresholds for the duration lets freed blocks
    be reused; the peak RSS grows by what the heap keeps. Afterwards the heap is trimmed (memory goes back to the
    system) and the thresholds are set to 32 and 64 MiB, where glibc's dynamic thresholds settle after large buffers.
    Values computed are not affected."""
    global _heap_depth
    libc = _glibc() if enabled else None
    if libc is None:
        yield
        return
    with _heap_lock:
        _heap_depth += 1
        if _heap_depth == 1:
            for param, value in _HEAP_REUSE.items():
                libc.mallopt(param, value)
    try:
        yield
    finally:
        with _heap_lock:
            _heap_depth -= 1
            if _heap_depth == 0:
                for param, value in _HEAP_AFTER.items():
                    libc.mallopt(param, value)
                libc.malloc_trim(0)


def crop_image(img, token_px: int):
    """Remove exactly one token ring: ``img.crop((t, t, S - t, S - t))``."""
    w, h = img.size
    return img.crop((token_px, token_px, w - token_px, h - token_px))


class Extractor:
    """Runs the U-Net on batches of PIL images and returns the hooked representations.

    The experiment switches of ``settings`` (:mod:`diffaudit.experiments`) act here: ``weights: random`` runs a
    re-initialised copy of the U-Net, ``padding_mode`` changes the padding of every ``Conv2d`` of the U-Net for the
    duration of each pass, ``noise``/``pixel_range``/``latent`` replace what the mode does."""

    def __init__(self, pipe, layers: Sequence[str], settings: ExtractionSettings, label_names: Sequence[str] = ()):
        from diffusers import DDIMScheduler

        self.pipe = pipe
        self.settings = settings
        self.switches = settings.switches
        self.family = pipeline_family(pipe)
        self.dit = self.family in DIT_FAMILIES
        net = backbone(pipe)
        # ``unet``: the denoising network, U-Net or transformer (the name predates the transformers)
        self.unet = random_unet(net) if self.switches["weights"] == "random" else net
        self.latent_channels = int(pipe.vae.config.latent_channels)
        if self.dit:
            from . import dit

            self.switches = dict(self.switches)
            if settings.pixel_range is None:  # the DiT pipelines (and sdhelper) feed [-1, 1] pixels in both modes
                self.switches["pixel_range"] = "symmetric"
            if settings.mode == "paper":
                self.sigma, self.model_timestep = dit.paper_noise_level(pipe, self.family, int(settings.timestep))
            else:
                self.sigma = (float(settings.sigma) if settings.sigma is not None
                              else dit.sigma_for_ddpm_timestep(int(settings.timestep)))
                self.model_timestep = self.sigma * 1000 if self.family == "sd3" else self.sigma
        self.t5_used: bool | None = None
        self.layers = list(layers)
        self.modules = resolve_layers(self.unet, self.layers)
        # where the passes run: with model CPU offload the weights rest on the CPU between passes
        self.device = torch.device(getattr(pipe, "_execution_device", None) or self.unet.device)
        if self.unet is not net and self.unet.device != self.device:
            self.unet.to(self.device)  # a random-weights copy has no offload hook: it lives on the device
        self.dtype = self.unet.dtype
        # sdhelper noises with a DDIM scheduler rebuilt from the model's scheduler config, for every U-Net model.
        self.ddim = None if self.dit else DDIMScheduler.from_config(pipe.scheduler.config)
        # ``scale_model_input`` of the pipeline's scheduler, on a private copy whose step index is cleared before
        # every call: Euler keeps the step index of the first timestep it sees, so a scheduler used before (or
        # shared between timesteps) would silently scale with another timestep's sigma.
        self.scheduler = copy.deepcopy(pipe.scheduler)
        self._prompt_cache: dict = {}
        self.label_names = list(label_names)
        vae_factor = getattr(pipe, "vae_scale_factor", None)
        self.vae_factor = int(vae_factor or 2 ** (len(pipe.vae.config.block_out_channels) - 1))
        # {layer: times its module runs in one U-Net pass}, from this extractor's first complete pass (None before):
        # what lets later passes stop after the last layer they need.
        self._runs: dict[str, int] | None = None
        self._meta = None  # see _shape_model
        self._meta_runs: dict[str, int] | None = None  # as _runs, for the meta twin

    # -- pieces ----------------------------------------------------------------------------------
    def conditioning(self, batch: int, labels: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text conditioning for a batch, ``(token embeddings, pooled embedding or None)``: the prompt for every
        image, or, when it names the class (``{class}``), each image's own prompt. The pooled embedding is SDXL's
        (its second text tower's projection)."""
        template = self.settings.prompt
        if experiments.CLASS_PLACEHOLDER not in template:
            if batch not in self._prompt_cache:
                self._prompt_cache[batch] = self._conditioning([template] * batch)
            return self._prompt_cache[batch]
        if labels is None or len(labels) != batch:
            raise ValueError(f"prompt {template!r} names each image's class, but the images' labels are not known")
        rows = []
        for label in labels:
            if label not in self._prompt_cache:
                name = self.label_names[label] if 0 <= label < len(self.label_names) else str(label)
                self._prompt_cache[label] = self._conditioning([experiments.class_prompt(template, name)])
            rows.append(self._prompt_cache[label])
        if isinstance(rows[0], dict):  # a transformer's conditioning (txt_ids: one table for every image)
            return {k: v if k == "txt_ids" else torch.cat([r[k] for r in rows]) for k, v in rows[0].items()}
        pooled = None if rows[0][1] is None else torch.cat([r[1] for r in rows])
        return torch.cat([r[0] for r in rows]), pooled

    def _conditioning(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The pipeline's own ``encode_prompt`` (its real text encoders), without classifier-free guidance: SD-1/2
        return the token embeddings; SDXL the concatenation of both towers' penultimate states and the pooled
        embedding (third of its four results)."""
        if self.dit:  # SD3 / FLUX: the transformer's keyword arguments (T5 where the pipeline has it)
            from . import dit

            cond, self.t5_used = dit.encode_prompt(self.pipe, prompts)
            return cond
        out = self.pipe.encode_prompt(prompt=prompts, device=self.device, num_images_per_prompt=1,
                                      do_classifier_free_guidance=False)
        return out[0], (out[2] if self.family == "sdxl" else None)

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        cond = self._conditioning(prompts)
        return cond["encoder_hidden_states"] if isinstance(cond, dict) else cond[0]

    def _pixels(self, images) -> torch.Tensor:
        sizes = {im.size for im in images}
        if len(sizes) != 1:
            raise ValueError(f"all images of a batch must have the same size, got {sorted(sizes)}")
        x = torch.tensor(np.array([np.asarray(im.convert("RGB")) for im in images]), dtype=torch.float32,
                         device=self.device).permute(0, 3, 1, 2) / 255.0
        if self.switches["pixel_range"] == "symmetric":
            x = 2.0 * x - 1.0
        return x

    def corrected_noise(self, image_indices: Sequence[int], full_latent_hw: tuple[int, int],
                        crop_latent_px: int = 0) -> torch.Tensor:
        """Per-image noise from a CPU generator seeded by (seed, image index); cropped like the image."""
        return torch.stack([self._cpu_noise(int(self.settings.seed) * 1_000_003 + int(idx), full_latent_hw,
                                            crop_latent_px) for idx in image_indices]).to(self.device, self.dtype)

    def shared_noise(self, n: int, full_latent_hw: tuple[int, int], crop_latent_px: int = 0) -> torch.Tensor:
        """One noise tensor for every image (CPU generator seeded by the seed alone), cropped like the image."""
        eps = self._cpu_noise(int(self.settings.seed), full_latent_hw, crop_latent_px)
        return eps[None].expand(n, *eps.shape).to(self.device, self.dtype)

    def _cpu_noise(self, seed: int, full_latent_hw: tuple[int, int], crop_latent_px: int) -> torch.Tensor:
        h, w = full_latent_hw
        g = torch.Generator("cpu").manual_seed(seed)
        eps = torch.randn((self.latent_channels, h, w), generator=g, dtype=torch.float32)
        k = crop_latent_px
        return eps[:, k:h - k, k:w - k] if k else eps

    def scale_model_input(self, lat: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The pipeline scheduler's input scaling at ``t`` (its step index cleared first, see ``__init__``)."""
        for attr in ("_step_index", "_begin_index"):
            if hasattr(self.scheduler, attr):
                setattr(self.scheduler, attr, None)
        return self.scheduler.scale_model_input(lat, t)

    @torch.no_grad()
    def latents(self, images, image_indices: Sequence[int], crop_px: int = 0, full_size: int | None = None):
        vae = self.pipe.vae
        sw = self.switches
        x = self._pixels(images)
        t = torch.tensor(int(self.settings.timestep), dtype=torch.long, device=self.device)
        sf = vae.config.scaling_factor
        paper = self.settings.mode == "paper"
        if paper:
            torch.manual_seed(int(self.settings.seed))
        dist = vae.encode(x.to(dtype=vae.dtype)).latent_dist
        if sw["latent"] == "mean":
            lat = dist.mean.contiguous()  # a view into the moments; randn_like would follow its strides
        elif paper:
            lat = dist.sample()
        else:
            lat = dist.sample(generator=torch.Generator(self.device).manual_seed(int(self.settings.seed)))
        if self.dit:  # flow-matching VAEs are shifted, then scaled
            lat = (lat.to(dtype=self.dtype) - vae.config.shift_factor) * sf
        else:
            lat = lat.to(dtype=self.dtype) * sf
        if paper and sw["noise"] == "shared":
            noise = torch.randn_like(lat[None, 0]).expand(lat.shape)
        else:
            factor = x.shape[-1] // lat.shape[-1]
            full = (full_size or x.shape[-1]) // factor
            if crop_px % factor:
                raise ValueError(f"crop of {crop_px}px is not a whole number of latent pixels ({factor}px)")
            if sw["noise"] == "independent":
                noise = self.corrected_noise(image_indices, (full, full), crop_px // factor)
            else:
                noise = self.shared_noise(lat.shape[0], (full, full), crop_px // factor)
        if self.dit:
            from . import dit

            return dit.noised(lat, noise, self.sigma), t
        lat = self.ddim.add_noise(lat, noise, t)
        if paper:
            lat = self.scale_model_input(lat, t)
        return lat, t

    @torch.no_grad()
    def run_batch(self, images, image_indices: Sequence[int], layers: Sequence[str] | None = None,
                  crop_px: int = 0, full_size: int | None = None, out_dtype=None,
                  labels: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """Representations ``{layer: (B, C, H, W)}`` on the CPU for one batch of images (``out_dtype``: converted
        to it before the copy; default: the compute dtype).

        The U-Net pass stops right after the last of ``layers`` in execution order (nothing after it can change
        what was captured), once a complete pass of this extractor has shown that every layer runs once."""
        layers = self.layers if layers is None else list(layers)
        captured: dict[str, torch.Tensor] = {}

        def capture(name, out):
            captured[name] = out.detach().to("cpu", dtype=out_dtype or out.dtype)

        with deterministic_cudnn():
            lat, t = self.latents(images, image_indices, crop_px=crop_px, full_size=full_size)
            cond = self.conditioning(len(images), labels)
            try:
                with conv_padding(self.unet, self.switches["padding_mode"]):
                    self._pass(layers, capture, lat, t, cond)
            except RuntimeError as exc:
                if "Padding size should be less" in str(exc):
                    raise ValueError(f"padding_mode {self.switches['padding_mode']!r} needs every feature map larger "
                                     f"than its padding, but at {images[0].size[0]} px a map of the U-Net is too "
                                     "small; use a larger resolution (or circular/replicate padding)") from exc
                raise
        return {name: captured[name] for name in layers}

    def _pass(self, layers: Sequence[str], on_output: Callable, lat, t, cond, twin=None) -> None:
        """One hooked pass for ``layers`` of the U-Net (or of its ``meta`` twin, :meth:`_shape_model`), stopped early
        once this extractor knows how often each of its layers runs in that model (learned from the model's first
        complete pass here, which hooks all of them). ``cond``: :meth:`conditioning`."""
        unet, modules, key = (self.unet, self.modules, "_runs") if twin is None else (*twin, "_meta_runs")
        runs = getattr(self, key)
        paper_sdxl = self.family == "sdxl" and self.settings.mode == "paper"
        if self.dit:
            args, (kwargs, select) = (), self._dit_call(lat, cond)
        else:
            emb, pooled = cond
            args, kwargs, select = (lat, t), dict(encoder_hidden_states=emb), None
            if self.family == "sdxl" and not paper_sdxl:
                kwargs["added_cond_kwargs"] = sdxl_added_conditioning(pooled, lat.shape[-2:], self.vae_factor)
        hooked = modules if runs is None else {name: modules[name] for name in layers}
        with no_added_conditioning(unet, paper_sdxl):
            counts = hooked_pass(unet, hooked, layers, on_output, runs, *args, select=select, **kwargs)
        if runs is None:
            setattr(self, key, counts)

    def _dit_call(self, lat: torch.Tensor, cond: dict) -> tuple[dict, Callable]:
        """The transformer's keyword arguments for noised latents ``lat`` (:func:`diffaudit.dit.transformer_inputs`;
        in paper mode sdhelper's timestep and, for FLUX, its transposed image ids), and the hook's selection of the
        image tokens as a ``(B, C, y, x)`` map on the patch grid."""
        from . import dit

        kwargs = dit.transformer_inputs(self.pipe, lat, self.sigma, cond)
        grid = dit.grid_hw(self.pipe, tuple(lat.shape[-2:]))
        if self.settings.mode == "paper":
            if self.family == "sd3":  # the schedule's float32 value itself
                kwargs["timestep"] = torch.full_like(kwargs["timestep"], self.model_timestep)
            else:  # sdhelper: (step + 1) / 1000 in the latents' dtype, image ids of the transposed grid
                kwargs["timestep"] = torch.full_like(kwargs["timestep"], int(self.settings.timestep) + 1) / 1000
                ids = kwargs["img_ids"]
                kwargs["img_ids"] = self.pipe._prepare_latent_image_ids(lat.shape[0], grid[1], grid[0], ids.device,
                                                                        ids.dtype)
        n_text = cond["encoder_hidden_states"].shape[1]
        return kwargs, lambda name, out: dit.image_map(name, out, grid, n_text)

    @torch.no_grad()
    def layer_shapes(self, image_px: int, layers: Sequence[str] | None = None) -> dict[str, tuple[int, int, int]]:
        """``{layer: (C, H, W)}`` for square images of ``image_px`` pixels. Exact: one batch-1 pass on a zero latent
        of the U-Net's architecture on the ``meta`` device (shapes without compute), or of the U-Net itself where
        that cannot be built or run; a padding mode too large for a map fails either way."""
        layers = self.layers if layers is None else list(layers)
        h = int(image_px) // self.vae_factor
        cond = self._conditioning([experiments.class_prompt(self.settings.prompt, "")])
        shapes: dict[str, tuple[int, int, int]] = {}

        def record(name, out):
            shapes[name] = tuple(int(d) for d in out.shape[1:])

        def on_meta(x):
            return torch.zeros(x.shape, device="meta", dtype=x.dtype) if isinstance(x, torch.Tensor) else x

        twin = self._shape_model()
        if twin is not None:
            lat = torch.zeros((1, self.latent_channels, h, h), device="meta", dtype=self.dtype)
            meta = ({k: on_meta(v) for k, v in cond.items()} if isinstance(cond, dict)
                    else tuple(on_meta(v) for v in cond))
            try:
                with conv_padding(twin[0], self.switches["padding_mode"]):
                    self._pass(layers, record, lat, torch.tensor(int(self.settings.timestep), dtype=torch.long), meta,
                               twin=twin)
                return {name: shapes[name] for name in layers}
            except Exception:  # noqa: BLE001 - whatever the meta pass cannot do, the real pass below does or reports
                shapes.clear()
        lat = torch.zeros((1, self.latent_channels, h, h), device=self.device, dtype=self.dtype)
        t = torch.tensor(int(self.settings.timestep), dtype=torch.long, device=self.device)
        with deterministic_cudnn(), conv_padding(self.unet, self.switches["padding_mode"]):
            self._pass(layers, record, lat, t, cond)
        return {name: shapes[name] for name in layers}

    def _shape_model(self):
        """``(U-Net, {layer: module})``: the U-Net's architecture (its class and config) on the ``meta`` device, built
        once; None if it cannot be built (e.g. a compiled U-Net)."""
        if self._meta is None:
            from .models import diffusers_errors_only

            try:
                with diffusers_errors_only(), torch.device("meta"):
                    twin = type(self.unet).from_config(self.unet.config).to(dtype=self.dtype).eval()
                self._meta = (twin, resolve_layers(twin, self.layers))
            except Exception:  # noqa: BLE001 - the real U-Net is probed instead
                self._meta = False
        return self._meta or None


@contextmanager
def conv_padding(unet, mode: str):
    """Every ``Conv2d`` of ``unet`` pads with ``mode`` (zeros | reflect | replicate | circular) for the duration;
    the padding widths, and so every shape, stay as they are. ``zeros`` changes nothing."""
    if mode == "zeros":
        yield
        return
    convs = [m for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    saved = [m.padding_mode for m in convs]
    try:
        for m in convs:
            if isinstance(m.padding, str):
                raise ValueError(f"padding_mode {mode!r}: a Conv2d with padding={m.padding!r} cannot change mode")
            m.padding_mode = mode
        yield
    finally:
        for m, s in zip(convs, saved):
            m.padding_mode = s


def sdxl_added_conditioning(pooled: torch.Tensor, latent_hw, vae_factor: int) -> dict:
    """SDXL's added conditioning as its pipeline builds it for an image of the latent's size: the pooled text
    embedding and the six ``time_ids`` (original size, crop top-left (0, 0), target size; sizes = the image's
    (height, width) in pixels)."""
    h, w = (int(d) * int(vae_factor) for d in latent_hw)
    ids = torch.tensor([h, w, 0, 0, h, w], dtype=pooled.dtype, device=pooled.device)
    return {"text_embeds": pooled, "time_ids": ids.expand(pooled.shape[0], 6)}


@contextmanager
def no_added_conditioning(unet, enabled: bool = True):
    """sdhelper 1.0.0's SDXL quirk for the duration (paper mode): ``unet.config.addition_embed_type`` reads
    ``'nothing_at_all'``, so the U-Net adds no pooled-text/size embedding to its time embedding (the authors' tool sets
    it for good; here it is restored afterwards). Nothing happens unless ``enabled``."""
    if not enabled:
        yield
        return
    cfg = unet.config
    saved = cfg.addition_embed_type
    # FrozenDict: the item stays, the attribute (what the forward reads) changes, as in sdhelper
    object.__setattr__(cfg, "addition_embed_type", "nothing_at_all")
    try:
        yield
    finally:
        object.__setattr__(cfg, "addition_embed_type", saved)


def random_unet(unet):
    """The same architecture (the model's own config) with weights re-initialised from
    :data:`diffaudit.experiments.RANDOM_WEIGHTS_SEED`, on the model's device and dtype."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(experiments.RANDOM_WEIGHTS_SEED)
        fresh = type(unet).from_config(unet.config)
    return fresh.to(device=unet.device, dtype=unet.dtype).eval()


class _StopForward(BaseException):
    """Raised by the forward hook of the last layer a pass needs, caught by :func:`hooked_pass` (a BaseException, so
    that no ``except Exception`` on the way can swallow it)."""


def hooked_pass(unet, modules: dict, wanted: Sequence[str], on_output: Callable[[str, torch.Tensor], None],
                runs: dict[str, int] | None, *args, select: Callable | None = None, **kwargs) -> dict[str, int] | None:
    """``unet(*args, **kwargs)`` with a forward hook on each of ``modules`` (``{name: module}``) that calls
    ``on_output(name, output)`` for the names in ``wanted`` (the first element of a tuple output, or what
    ``select(name, output)`` makes of the raw output: a transformer block's image tokens as a map).

    With ``runs`` (``{name: times the module runs in a complete pass}``, e.g. what an earlier call returned) saying that
    each wanted module runs exactly once, the pass stops right after the last of them has run: nothing the U-Net
    computes afterwards can change what was captured, so the outputs are exactly those of a complete pass.
    Returns ``{name: times run}`` for ``modules`` after a complete pass, ``None`` after a stopped one. The hooks are
    removed whatever happens.
    """
    wanted_set = set(wanted)
    left = set(wanted_set)
    stop = runs is not None and bool(left) and all(runs.get(name) == 1 for name in left)
    counts = dict.fromkeys(modules, 0)

    def make_hook(name):
        def hook(_module, _inputs, output):
            counts[name] += 1
            if name not in wanted_set:
                return
            if select is not None:
                on_output(name, select(name, output))
            else:
                on_output(name, output[0] if isinstance(output, tuple) else output)
            left.discard(name)
            if stop and not left:
                raise _StopForward
        return hook

    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        try:
            unet(*args, **kwargs)
        except _StopForward:
            return None
    finally:
        for h in handles:
            h.remove()
    return counts


def probe_shapes(unet, modules: dict, latent: torch.Tensor, timestep, encoder_hidden_states):
    """``{name: (C, H, W)}`` of the outputs of ``modules`` in one U-Net pass on ``latent`` (any device, also
    ``meta``); nothing is copied."""
    shapes: dict[str, tuple[int, int, int]] = {}

    def record(name, out):
        shapes[name] = tuple(int(d) for d in out.shape[1:])

    with torch.no_grad():
        hooked_pass(unet, modules, list(modules), record, None, latent, timestep,
                    encoder_hidden_states=encoder_hidden_states)
    return {name: shapes[name] for name in modules}


# ---------------------------------------------------------------------------------------------
# Driving a whole dataset into stores
# ---------------------------------------------------------------------------------------------

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

    def put(self, start: int, batch: dict[str, np.ndarray], writer: StoreWriter | None = None):
        w = writer or self.writer
        self._submit(lambda: w.write_batch(start, batch))

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
            bg.put(start, {k: v.numpy() for k, v in reps.items()}, writer=writer)
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
                 **describe_switches(settings, extractor.switches, extractor.dit)}
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


def describe_switches(settings: ExtractionSettings, switches: dict | None = None, dit: bool = False) -> dict:
    """What the extraction did, in words, for the stores' attributes (the switches an experiment set are in the
    config as well). ``switches``: what the extractor used, where the family changes a mode default; ``dit``: a
    diffusion transformer (flow-matching noise, no input scaling)."""
    sw, paper = switches or settings.switches, settings.mode == "paper"
    out = {"pixel_range": "[0, 1] (x/255)" if sw["pixel_range"] == "unit" else "[-1, 1]",
           "latent": "VAE posterior sample" if sw["latent"] == "sample" else "VAE posterior mean",
           "noise": ("one tensor shared by a batch, torch.manual_seed(seed) per batch" if paper and sw["noise"] == "shared"
                     else "one tensor shared by every image, CPU generator seeded by seed" if sw["noise"] == "shared"
                     else "independent per image, CPU generator seeded by seed*1000003+image_index"),
           "scale_model_input": paper and not dit}
    if settings.padding_mode is not None:
        out["padding_mode"] = sw["padding_mode"]
    if sw["weights"] == "random":
        out["weights_seed"] = experiments.RANDOM_WEIGHTS_SEED
    return out


def describe_family(extractor: Extractor) -> dict:
    """The model family and how the extraction conditioned it, for the stores' attributes."""
    out = {"family": extractor.family}
    if extractor.dit:
        out["noise_level"] = {"sigma": float(extractor.sigma), "model_timestep": float(extractor.model_timestep),
                              "from": ("sdhelper 1.0.0's step (paper mode)" if extractor.settings.mode == "paper"
                                       else "extraction.sigma" if extractor.settings.sigma is not None
                                       else "equal SNR with the DDPM timestep")}
        out["t5_used"] = extractor.t5_used
    if extractor.family == "sdxl":
        out["added_conditioning"] = (
            "none (paper mode: sdhelper 1.0.0 sets addition_embed_type to 'nothing_at_all')"
            if extractor.settings.mode == "paper" else
            "pooled text embedding + time_ids (original size = target size = the image's, crop (0, 0))")
        out["vae_dtype"] = str(extractor.pipe.vae.dtype).replace("torch.", "")
    return out


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "diffusers", "transformers", "numpy", "zarr", "xarray", "diffaudit"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
