"""The extractor: one backbone pass per batch of images, forward hooks on the chosen layers (:class:`Extractor`).

Everything that differs between model families (the text conditioning, the VAE scaling, the noising, the backbone's
arguments and the selection of image tokens) is asked of the family (:mod:`diffaudit.families`), decided once here.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from .. import experiments
from ..errors import UserError
from ..families.common import diffusers_errors_only
from ..families.registry import family_of
from ..layers import resolve_layers
from .hooks import (
    conv_padding,
    deterministic_cudnn,
    hooked_pass,
    no_tf32,
    padded_convs,
    random_unet,
    vae_encoder,
)
from .settings import ExtractionSettings


#: Offset of the posterior sample's seeds from the forward noise's (``noise: independent``): image ``i``'s posterior
#: noise comes from a CPU generator seeded by ``seed * 1000003 + i + 2**31``, its forward noise from one seeded by
#: ``seed * 1000003 + i``, so the two draws are never the same numbers. (torch's CPU generator keeps the low 32 bits of
#: a seed, so the offset must lie below 2**32.)
POSTERIOR_STREAM = 1 << 31


def crop_image(img, token_px: int):
    """Remove exactly one token ring: ``img.crop((t, t, S - t, S - t))``."""
    w, h = img.size
    return img.crop((token_px, token_px, w - token_px, h - token_px))


class Extractor:
    """Runs the backbone (U-Net or transformer) on batches of PIL images and returns the hooked representations.

    The experiment switches of ``settings`` (:mod:`diffaudit.experiments`) act here: ``weights: random`` runs a
    re-initialised copy of the U-Net, ``padding_mode`` changes the padding of every ``Conv2d`` of the U-Net (or, by
    ``padding_scope``, of the VAE encoder, or both) for the duration of each pass, ``noise``/``pixel_range``/``latent``
    replace what the mode does."""

    def __init__(self, pipe, layers: Sequence[str], settings: ExtractionSettings, label_names: Sequence[str] = ()):
        self.pipe = pipe
        self.settings = settings
        self.switches = settings.switches
        # the family, decided once (and recorded in the stores): everything family-specific is asked of it
        self.family = family_of(pipe)
        net = self.family.backbone(pipe)
        # ``unet``: the denoising network, U-Net or transformer (the name predates the transformers)
        self.unet = random_unet(net) if self.switches["weights"] == "random" else net
        self.latent_channels = int(pipe.vae.config.latent_channels)
        if self.family.pixel_range is not None and settings.pixel_range is None:  # e.g. the DiTs: [-1, 1] pixels
            self.switches = {**self.switches, "pixel_range": self.family.pixel_range}
        self.t5_used: bool | None = None  # whether a T5 text encoder conditioned the backbone (families that have one)
        mode, scope = self.switches["padding_mode"], self.switches["padding_scope"]
        #: the padding mode of the backbone's convolutions (``zeros`` unless ``padding_scope`` includes it)
        self._denoiser_padding = mode if scope in ("denoiser", "both") else "zeros"
        if self._denoiser_padding != "zeros" and not padded_convs(net):
            raise UserError(f"padding_mode {mode!r} has nothing to act on: the {self.family.label} backbone "
                            f"({type(net).__name__}) has no convolution that pads; leave the switch out for this "
                            "model" + (" (or set padding_scope: vae)" if padded_convs(vae_encoder(pipe.vae)) else ""))
        self.layers = list(layers)
        self.modules = resolve_layers(self.unet, self.layers)
        # where the passes run: with model CPU offload the weights rest on the CPU between passes
        self.device = torch.device(getattr(pipe, "_execution_device", None) or self.unet.device)
        if self.unet is not net and self.unet.device != self.device:
            self.unet.to(self.device)  # a random-weights copy has no offload hook: it lives on the device
        self.dtype = self.unet.dtype
        self.ddim = None  # the DDPM families' noising scheduler (set by their ``prepare``)
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
        self.family.prepare(self)  # the noise level (and its schedulers)

    # -- pieces ----------------------------------------------------------------------------------
    def conditioning(self, batch: int, labels: Sequence[int] | None = None) -> dict:
        """Text conditioning for a batch, the backbone's keyword arguments (:meth:`Family.encode_prompt
        <diffaudit.families.base.Family.encode_prompt>`): the prompt for every image, or, when it names the class
        (``{class}``), each image's own prompt."""
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
        shared = self.family.shared_conditioning  # e.g. FLUX's txt_ids: one table for every image
        return {k: v if k in shared else torch.cat([r[k] for r in rows]) for k, v in rows[0].items()}

    def _conditioning(self, prompts: list[str]) -> dict:
        """The pipeline's own text encoders through the family (without classifier-free guidance)."""
        return self.family.encode_prompt(self, prompts)

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        return self._conditioning(prompts)["encoder_hidden_states"]

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

    def posterior_noise(self, image_indices: Sequence[int], latent_hw: tuple[int, int]) -> torch.Tensor:
        """Per-image noise of the VAE posterior sample (``noise: independent``): a CPU generator seeded by (seed, image
        index) in a stream of its own (:data:`POSTERIOR_STREAM` apart from the forward noise's), float32, moved to the
        device afterwards."""
        return torch.stack([self._cpu_noise(int(self.settings.seed) * 1_000_003 + int(idx) + POSTERIOR_STREAM,
                                            latent_hw, 0) for idx in image_indices]).to(self.device)

    def _posterior(self, dist, image_indices: Sequence[int]) -> torch.Tensor:
        """The latent the switches ask for: the posterior mean, or a sample whose noise is the paper's (the global
        generator, just reseeded), per image (``noise: independent``) or one CPU draw seeded by the seed (shared)."""
        sw = self.switches
        if sw["latent"] == "mean":
            return dist.mean.contiguous()  # a view into the moments; randn_like would follow its strides
        if sw["noise"] == "independent":
            eps = self.posterior_noise(image_indices, tuple(dist.mean.shape[-2:]))
            return dist.mean + dist.std * eps.to(dtype=dist.mean.dtype)
        if self.settings.mode == "paper":
            return dist.sample()
        # drawn on the CPU (then moved), so the values do not depend on the device
        return dist.sample(generator=torch.Generator("cpu").manual_seed(int(self.settings.seed)))

    @torch.no_grad()
    def encode(self, images, image_indices: Sequence[int]) -> torch.Tensor:
        """The clean latents the backbone's noise is added to: pixels through the VAE encoder (with ``padding_mode``
        when ``padding_scope`` includes the VAE), the posterior mean or sample, the family's scaling. Paper mode
        reseeds the global generator first (sdhelper does at every batch)."""
        vae = self.pipe.vae
        x = self._pixels(images)
        if self.settings.mode == "paper":
            torch.manual_seed(int(self.settings.seed))
        with self._padding("vae", images):
            dist = vae.encode(x.to(dtype=vae.dtype)).latent_dist
        lat = self._posterior(dist, image_indices)
        return self.family.scale_latents(vae, lat, self.dtype, latent_stats=self.settings.mode != "paper")

    @torch.no_grad()
    def latents(self, images, image_indices: Sequence[int], crop_px: int = 0, full_size: int | None = None):
        sw = self.switches
        t = torch.tensor(int(self.settings.timestep), dtype=torch.long, device=self.device)
        paper = self.settings.mode == "paper"
        lat = self.encode(images, image_indices)
        if paper and sw["noise"] == "shared":
            noise = torch.randn_like(lat[None, 0]).expand(lat.shape)
        else:
            factor = images[0].size[0] // lat.shape[-1]
            full = (full_size or images[0].size[0]) // factor
            if crop_px % factor:
                raise ValueError(f"crop of {crop_px}px is not a whole number of latent pixels ({factor}px)")
            if sw["noise"] == "independent":
                noise = self.corrected_noise(image_indices, (full, full), crop_px // factor)
            else:
                noise = self.shared_noise(lat.shape[0], (full, full), crop_px // factor)
        return self.family.add_noise(self, lat, noise, t), t

    @contextmanager
    def _padding(self, part: str, images=()):
        """``padding_mode`` on ``part`` (``denoiser``: the backbone; ``vae``: the VAE encoder) for the duration, where
        ``padding_scope`` includes it; a padding too wide for a map is one clear error."""
        mode, scope = self.switches["padding_mode"], self.switches["padding_scope"]
        if mode == "zeros" or scope not in (part, "both"):
            yield
            return
        net = self.unet if part == "denoiser" else vae_encoder(self.pipe.vae)
        try:
            with conv_padding(net, mode):
                yield
        except RuntimeError as exc:
            if "Padding size should be less" in str(exc):
                where = "the VAE encoder" if part == "vae" else "the backbone"
                size = f"at {images[0].size[0]} px " if images else ""
                raise ValueError(f"padding_mode {mode!r} needs every feature map larger than its padding, but "
                                 f"{size}a map of {where} is too small; use a larger resolution (or "
                                 "circular/replicate padding)") from exc
            raise

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

        with deterministic_cudnn(), no_tf32(self.dtype == torch.float32):
            lat, t = self.latents(images, image_indices, crop_px=crop_px, full_size=full_size)
            cond = self.conditioning(len(images), labels)
            with self._padding("denoiser", images):
                self._pass(layers, capture, lat, t, cond)
        return {name: captured[name] for name in layers}

    def _pass(self, layers: Sequence[str], on_output: Callable, lat, t, cond, twin=None) -> None:
        """One hooked pass for ``layers`` of the U-Net (or of its ``meta`` twin, :meth:`_shape_model`), stopped early
        once this extractor knows how often each of its layers runs in that model (learned from the model's first
        complete pass here, which hooks all of them). ``cond``: :meth:`conditioning`."""
        unet, modules, key = (self.unet, self.modules, "_runs") if twin is None else (*twin, "_meta_runs")
        runs = getattr(self, key)
        args, kwargs, select = self.family.backbone_call(self, lat, t, cond)
        hooked = modules if runs is None else {name: modules[name] for name in layers}
        with self.family.pass_context(unet, self.settings.mode):
            counts = hooked_pass(unet, hooked, layers, on_output, runs, *args, select=select, **kwargs)
        if runs is None:
            setattr(self, key, counts)

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
            meta = {k: on_meta(v) for k, v in cond.items()}
            try:
                with conv_padding(twin[0], self._denoiser_padding):
                    self._pass(layers, record, lat, torch.tensor(int(self.settings.timestep), dtype=torch.long), meta,
                               twin=twin)
                return {name: shapes[name] for name in layers}
            except Exception:  # noqa: BLE001 - whatever the meta pass cannot do, the real pass below does or reports
                shapes.clear()
        lat = torch.zeros((1, self.latent_channels, h, h), device=self.device, dtype=self.dtype)
        t = torch.tensor(int(self.settings.timestep), dtype=torch.long, device=self.device)
        with deterministic_cudnn(), conv_padding(self.unet, self._denoiser_padding):
            self._pass(layers, record, lat, t, cond)
        return {name: shapes[name] for name in layers}

    def _shape_model(self):
        """``(U-Net, {layer: module})``: the U-Net's architecture (its class and config) on the ``meta`` device, built
        once; None if it cannot be built (e.g. a compiled U-Net)."""
        if self._meta is None:
            try:
                with diffusers_errors_only(), torch.device("meta"):
                    twin = type(self.unet).from_config(self.unet.config).to(dtype=self.dtype).eval()
                self._meta = (twin, resolve_layers(twin, self.layers))
            except Exception:  # noqa: BLE001 - the real U-Net is probed instead
                self._meta = False
        return self._meta or None


def describe_family(extractor: Extractor) -> dict:
    """The model family and how the extraction conditioned and noised it, for the stores' attributes."""
    return {"family": extractor.family.name, **extractor.family.describe(extractor)}


