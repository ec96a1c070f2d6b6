"""The model-family interface: what makes SD, SDXL, SD3 or FLUX different, asked by generic code.

A :class:`Family` is a stateless object (one per family, listed in :mod:`diffaudit.families.registry`). Generic code
(the extraction, the loader, the figures, the explorer) never tests *which* family it has; it asks the family:

* identity: :attr:`Family.name` (what stores record as ``family``), :attr:`Family.label`, :attr:`Family.kind`
  (``U-Net`` or ``DiT``, for figure legends);
* recognition and loading: :meth:`Family.detect`, :meth:`Family.refusal`, :meth:`Family.backbone`,
  :meth:`Family.cuda_dtype`, :meth:`Family.vae_float32`;
* the paper's layer list (or its analogue) on a backbone: :meth:`Family.paper_layers`;
* the extraction recipe: :meth:`Family.prepare` (noise level, schedulers), :meth:`Family.encode_prompt`,
  :meth:`Family.scale_latents` (VAE scaling/shift), :meth:`Family.add_noise`, :meth:`Family.backbone_call` (the
  backbone's arguments and the selection of image tokens as a ``(B, C, H, W)`` map), :meth:`Family.pass_context`,
  :meth:`Family.describe` (what the stores record);
* the embedded mini model(s): :attr:`Family.embedded`, :meth:`Family.build_embedded`, :meth:`Family.save_embedded`;
* layer geometry for figures and the explorer: :meth:`Family.token_px`, :attr:`Family.single_grid`.

The extraction passes itself (``ex``: an :class:`diffaudit.extract.Extractor`) to the recipe methods; they read
``ex.pipe``, ``ex.settings``, ``ex.device``, ``ex.dtype``, ``ex.vae_factor`` and the state :meth:`Family.prepare`
set on it.
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch


class Family:
    """One model family. Subclasses set the class attributes and implement the methods that raise here."""

    #: Registry key, recorded in every store's attributes as ``family``.
    name: str = ""
    #: Human-readable name (docs, messages).
    label: str = ""
    #: Architecture kind for figure legends: ``U-Net`` or ``DiT``.
    kind: str = ""
    #: The embedded mini models of this family (names under ``resources/models``), built offline.
    embedded: tuple[str, ...] = ()
    #: Conditioning entries shared by a whole batch (not concatenated per image when prompts differ).
    shared_conditioning: tuple[str, ...] = ()
    #: Whether paper mode applies the pipeline scheduler's ``scale_model_input`` (sdhelper does on U-Nets).
    scales_model_input: bool = False
    #: The pixel range this family's pipelines feed the VAE in both modes (``None``: the mode's default).
    pixel_range: str | None = None
    #: Whether the family's pipeline runs the VAE in float32 under float16 when its config says ``force_upcast``
    #: (SDXL, PixArt; sdhelper and the SD-1/2 pipelines do not).
    upcasts_vae: bool = False
    #: Whether the family's pipelines standardise the latents with the VAE config's ``latents_mean``/``latents_std``
    #: where it has them (the SDXL pipelines do; the SD-1/2, SD3, FLUX and PixArt pipelines never read them).
    standardises_latents: bool = False
    #: Whether every layer of the backbone sits on one token grid (a DiT's patch grid; a U-Net has levels).
    single_grid: bool = False

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    # -- recognition and loading ---------------------------------------------------------------
    def detect(self, pipe) -> bool:
        """Whether ``pipe`` (a diffusers pipeline) belongs to this family."""
        raise NotImplementedError

    def refusal(self, pipe) -> str | None:
        """Why ``pipe`` looks like this family's kind of pipeline but is not supported (``None``: no opinion)."""
        return None

    def backbone(self, pipe) -> torch.nn.Module:
        """The denoising network whose layers are extracted."""
        raise NotImplementedError

    def cuda_dtype(self, pipe) -> torch.dtype:
        """The compute dtype of ``precision: auto`` on CUDA: float16 (the paper's rule) unless the family's
        activations overflow it."""
        return torch.float16

    def vae_float32(self, pipe, dtype: torch.dtype) -> bool:
        """Whether the VAE runs in float32 when the model runs in ``dtype``: in float16, where the family's pipeline
        honours the VAE config's ``force_upcast`` (:attr:`upcasts_vae`: SDXL's VAE, which overflows in float16)."""
        return self.upcasts_vae and dtype == torch.float16 and bool(pipe.vae.config.get("force_upcast", False))

    # -- layers --------------------------------------------------------------------------------
    def paper_layers(self, net: torch.nn.Module) -> list[str]:
        """``layers: paper`` on the backbone ``net``: the paper's list or its analogue for this layout."""
        raise NotImplementedError

    def token_px(self, layer: str) -> int | None:
        """Pixels per token of ``layer`` when it is known from the name alone (else ``None``)."""
        return None

    # -- the extraction recipe -----------------------------------------------------------------
    def prepare(self, ex) -> None:
        """Set the per-extraction state (noise level, schedulers, switches the family fixes) on ``ex``."""

    def encode_prompt(self, ex, prompts: list[str]) -> dict:
        """The backbone's text conditioning for ``prompts`` as keyword arguments (one row per prompt)."""
        raise NotImplementedError

    def scale_latents(self, vae, sample: torch.Tensor, dtype: torch.dtype, latent_stats: bool = True) -> torch.Tensor:
        """A VAE posterior sample (or mean) -> the backbone's latent space (in ``dtype``): times ``scaling_factor``,
        or, where the family's pipelines standardise latents (:attr:`standardises_latents`), ``latent_stats`` is set
        and the VAE config carries ``latents_mean`` and ``latents_std`` (e.g. Playground v2.5's SDXL VAE),
        ``(z - mean) * scaling_factor / std`` per channel, as the SDXL pipelines scale them. Paper mode passes
        ``latent_stats=False``: sdhelper 1.0.0 scales by ``scaling_factor`` alone."""
        z = sample.to(dtype=dtype)
        stats = latent_statistics(vae, z) if latent_stats and self.standardises_latents else None
        if stats is not None:
            mean, std = stats
            return (z - mean) * vae.config.scaling_factor / std
        return z * vae.config.scaling_factor

    def add_noise(self, ex, lat: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noised latents the backbone sees at the extraction's noise level."""
        raise NotImplementedError

    def backbone_call(self, ex, lat: torch.Tensor, t: torch.Tensor, cond: dict) -> tuple[tuple, dict, object]:
        """``(args, kwargs, select)`` of one backbone call on noised latents; ``select(name, output)`` turns a hooked
        module's raw output into a ``(B, C, H, W)`` map (``None``: the output, or its first element)."""
        raise NotImplementedError

    def pass_context(self, net: torch.nn.Module, mode: str):
        """A context manager around every backbone pass (default: nothing)."""
        return nullcontext()

    def describe(self, ex) -> dict:
        """What the stores record about how this family was conditioned and noised (besides ``family``)."""
        return {}

    # -- the embedded mini model(s) ------------------------------------------------------------
    def build_embedded(self, name: str, seed: int):
        """The embedded model ``name`` as a pipeline in memory (float32, seeded weights)."""
        raise NotImplementedError

    def save_embedded(self, name: str, out_dir: str | Path, seed: int) -> Path:
        """Build the embedded model ``name`` and write it with ``save_pretrained`` to ``out_dir``."""
        raise NotImplementedError


def latent_statistics(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The VAE config's ``latents_mean`` and ``latents_std`` as ``(1, C, 1, 1)`` tensors on ``like``'s device and in
    its dtype, or ``None`` unless the config has both (not ``None``), as the SDXL pipelines read them."""
    mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
    if mean is None or std is None:
        return None
    c = like.shape[1]
    return tuple(torch.tensor(v, dtype=torch.float32).view(1, c, 1, 1).to(like.device, like.dtype) for v in (mean, std))
