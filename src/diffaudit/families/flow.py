"""What the diffusion-transformer families share, and flow-matching noising (SD3, FLUX).

* :class:`TransformerFamily`: a DiT backbone (``pipe.transformer``) recognised by its class, ``layers: paper`` (the
  patch embedding, every ``transformer_blocks[i]``, then every ``single_transformer_blocks[i]``), the selection of a
  hooked block's image tokens as a ``(B, C, gh, gw)`` map on the patch grid (:func:`image_map`), [-1, 1] pixels in
  both modes, the embedded tiny model's build (seeded transformer, VAE, CLIP and T5 towers) and save. A new DiT family
  subclasses it (or :class:`FlowMatchingFamily`) and sets the class attributes; a DDPM-trained DiT mixes in
  :class:`diffaudit.families.unet.DDPMFamily` for its noise.
* :class:`FlowMatchingFamily`: flow-matching noise ``x_sigma = (1 - sigma) x0 + sigma eps``
  (``FlowMatchEulerDiscreteScheduler.scale_noise``, :func:`noised`) at sdhelper 1.0.0's step (paper mode) or at the
  sigma as noisy as SD's DDPM step (:func:`sigma_for_ddpm_timestep`); VAE latents shifted, then scaled; what the
  stores record; :meth:`FlowMatchingFamily.paper_representations`, sdhelper's ``img2repr`` recipe with our hooks.
* Tiny-model pieces: :data:`TINY_VAE`, :data:`T5_ENCODER`, :func:`tiny_t5_tokenizer`.

In diffusers 0.42 every joint block (SD3 ``JointTransformerBlock``, FLUX ``FluxTransformerBlock``) and FLUX's
``FluxSingleTransformerBlock`` return ``(encoder_hidden_states, hidden_states)``: element 1 is the image stream (SD3's
last block has ``context_pre_only`` and returns ``None`` as element 0).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import torch

from ..layers import resolve_layers
from .base import Family
from .common import MINI_SEED, clip_tokenizer, quiet_libraries, save_pipeline

TINY_SEED = MINI_SEED

# T5 v1.1 layout (gated GELU, relative attention); d_model = the transformer's joint_attention_dim.
T5_ENCODER = dict(d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                  feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False, use_cache=False)
# SD-1.5's VAE layout at small width (8x downsampling) with 16 latent channels and no quant convs, as SD3/FLUX's VAE.
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 64, 64), layers_per_block=1,
                norm_num_groups=16, latent_channels=16, sample_size=512, use_quant_conv=False,
                use_post_quant_conv=False)
# Real T5 tokenizers pad to 512 (FLUX's max_sequence_length; SD3's is 256).
T5_MAX_LENGTH = 512


def tiny_t5_tokenizer():
    """A small T5 tokenizer written by the project: a Unigram model over single letters and digits (plain and
    word-initial ``▁x``) plus a few common words, with T5's specials ``<pad>``=0, ``</s>``=1, ``<unk>``=2 and its
    ``</s>`` post-processor. No sentinel tokens (SD3/FLUX never use them)."""
    from transformers import T5TokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    words = ["a", "an", "the", "of", "photo", "picture", "cat", "dog", "painting", "in", "on", "with"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -3.0) for w in words]
    vocab += [("▁" + c, -5.0) for c in chars] + [(c, -6.0) for c in chars]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def clip_config(tokenizer, cfg: dict):
    """A ``CLIPTextConfig`` of width ``cfg`` over ``tokenizer``'s vocabulary and specials."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **cfg)


def t5_encoder(tokenizer, d_model: int):
    """A seeded-width :data:`T5_ENCODER` over ``tokenizer`` (random weights from the current torch seed)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=d_model, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0, **T5_ENCODER))


def image_map(layer: str, output, grid_hw: tuple[int, int], n_text_tokens: int) -> torch.Tensor:
    """A hooked module's raw output as a ``(B, C, gh, gw)`` map of its image tokens.

    A tuple (joint and single blocks in diffusers 0.42: ``(text, image)``) gives its element 1; a tensor (the patch
    embeddings; single blocks of older diffusers returned the text+image sequence) keeps its last ``gh * gw`` tokens
    when it holds ``n_text_tokens`` text tokens in front. Tokens are row-major on the patch grid (SD3's
    ``PatchEmbed`` flattens the conv output, FLUX packs 2x2 patches row by row), so token ``y * gw + x`` -> ``[y, x]``.
    """
    gh, gw = grid_hw
    x = output[1] if isinstance(output, (tuple, list)) else output
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"layer {layer}: expected (batch, tokens, channels) image tokens, got "
                         f"{type(x).__name__}{tuple(x.shape) if isinstance(x, torch.Tensor) else ''}")
    n = x.shape[1]
    if n == n_text_tokens + gh * gw and n_text_tokens:
        x = x[:, n_text_tokens:]
    elif n != gh * gw:
        raise ValueError(f"layer {layer}: {n} tokens fit neither the {gh}x{gw} patch grid nor {n_text_tokens} text "
                         f"tokens + the grid")
    return x.reshape(x.shape[0], gh, gw, x.shape[2]).permute(0, 3, 1, 2)


def ddpm_alphas_cumprod() -> torch.Tensor:
    """SD's DDPM ``alphas_cumprod`` (scaled_linear betas 0.00085..0.012, 1000 steps) computed in float32 exactly as
    diffusers' DDPM/DDIM schedulers do, i.e. the values the U-Net extraction noises with."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def sigma_for_ddpm_timestep(t: int) -> float:
    """The flow-matching sigma as noisy as SD's DDPM step ``t``: equal signal-to-noise ratio, ``((1 - s) / s)^2 =
    abar_t / (1 - abar_t)``, i.e. ``s = sqrt(1 - abar_t) / (sqrt(abar_t) + sqrt(1 - abar_t))``. Increasing in ``t``;
    ``t=50`` (the paper's step) gives ``sigma = 0.1841`` (``abar_50 = 0.9516``)."""
    if not 0 <= int(t) < 1000 or int(t) != t:
        raise ValueError(f"DDPM timestep must be an integer in [0, 999], got {t!r}")
    abar = float(ddpm_alphas_cumprod()[int(t)])
    return math.sqrt(1 - abar) / (math.sqrt(abar) + math.sqrt(1 - abar))


def noised(latents: torch.Tensor, noise: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """``(1 - sigma) x0 + sigma eps``, computed as ``FlowMatchEulerDiscreteScheduler.scale_noise`` does (sigma in the
    latents' dtype), so the result is bitwise the scheduler's."""
    s = torch.as_tensor(sigma, dtype=latents.dtype, device=latents.device)
    return s * noise + (1.0 - s) * latents


class TransformerFamily(Family):
    """A diffusion transformer: ``pipe.transformer`` of class :attr:`transformer_class`.

    Subclasses set :attr:`transformer_class`, :attr:`patch_embedding`, :attr:`tiny_transformer` (the embedded model's
    transformer config), :attr:`vae_factors`, :attr:`scheduler_config` and implement :meth:`patch`, the noise
    (:class:`FlowMatchingFamily`, or :class:`~diffaudit.families.unet.DDPMFamily` mixed in), :meth:`encode_prompt`,
    :meth:`backbone_call` (with :meth:`selector` for the image tokens) and the tiny build's :meth:`new_transformer`,
    :meth:`new_text_encoders`, :meth:`new_scheduler`, :meth:`assemble` and :meth:`text_configs`."""

    kind = "DiT"
    pixel_range = "symmetric"  # the DiT pipelines (and sdhelper) feed [-1, 1] pixels in both modes
    single_grid = True
    #: Class name of the transformer (``type(pipe.transformer).__name__``).
    transformer_class: str = ""
    #: The patch embedding module (the first ``paper`` layer).
    patch_embedding: str = ""
    #: The embedded tiny model's transformer config (its ``joint_attention_dim`` is the T5 width).
    tiny_transformer: dict = {}
    #: The embedded tiny model's VAE scaling (and shift) factors.
    vae_factors: dict = {}
    #: The embedded tiny model's scheduler config.
    scheduler_config: dict = {}

    def detect(self, pipe) -> bool:
        tr = getattr(pipe, "transformer", None)
        return tr is not None and hasattr(pipe, "vae") and type(tr).__name__ == self.transformer_class

    def refusal(self, pipe) -> str | None:
        tr = getattr(pipe, "transformer", None)
        if tr is None or not hasattr(pipe, "vae"):
            return None
        return f"{type(pipe).__name__} has transformer {type(tr).__name__}, not a supported one"

    def backbone(self, pipe) -> torch.nn.Module:
        return pipe.transformer

    def paper_layers(self, net: torch.nn.Module) -> list[str]:
        """The patch embedding, every ``transformer_blocks[i]``, then every ``single_transformer_blocks[i]``, in the
        notation :func:`diffaudit.layers.resolve_layers` reads."""
        if type(net).__name__ != self.transformer_class:
            raise ValueError(f"paper_layers: expected a {self.transformer_class}, got {type(net).__name__}")
        names = [self.patch_embedding]
        names += [f"transformer_blocks[{i}]" for i in range(len(net.transformer_blocks))]
        names += [f"single_transformer_blocks[{i}]" for i in range(len(getattr(net, "single_transformer_blocks", ())))]
        return names

    def patch(self, pipe) -> int:
        """Latent pixels per token side."""
        raise NotImplementedError

    def grid_hw(self, pipe, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """The patch grid (rows, columns) of latents of size ``latent_hw``."""
        h, w = latent_hw
        p = self.patch(pipe)
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} is not a multiple of the {p}x{p} patches")
        return h // p, w // p

    def encode_latents(self, pipe, pixels_m1_1: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """:meth:`scale_latents` of a VAE posterior sample of ``[-1, 1]`` pixels, (B, 16, h, w); the sample comes from
        ``generator``, else from the global RNG (as sdhelper draws it)."""
        vae = pipe.vae
        x = pixels_m1_1.to(device=vae.device, dtype=vae.dtype)
        with torch.no_grad():
            sample = vae.encode(x).latent_dist.sample(generator)
        return self.scale_latents(vae, sample, pipe.transformer.dtype)

    def selector(self, pipe, lat: torch.Tensor, cond: dict):
        """The hook's selection of the image tokens of ``lat``'s grid as a ``(B, C, y, x)`` map."""
        grid = self.grid_hw(pipe, tuple(lat.shape[-2:]))
        n_text = cond["encoder_hidden_states"].shape[1]
        return lambda name, out: image_map(name, out, grid, n_text)

    # -- the embedded tiny model ---------------------------------------------------------------
    def new_transformer(self):
        raise NotImplementedError

    def new_text_encoders(self, tokenizer, seed: int) -> dict:
        """The CLIP text towers (seeded from ``seed + 2`` on), as pipeline components (``{}``: none)."""
        raise NotImplementedError

    def new_scheduler(self):
        """The embedded model's scheduler (from :attr:`scheduler_config`)."""
        raise NotImplementedError

    def t5_width(self) -> int:
        """The width of the tiny T5 encoder: what the transformer's caption projection takes."""
        return self.tiny_transformer["joint_attention_dim"]

    def assemble(self, transformer, scheduler, vae, text: dict, tokenizer, t5, t5_tokenizer):
        raise NotImplementedError

    def text_configs(self) -> list[dict]:
        """The CLIP tower configs of the tiny model (recorded in ``TINY_MODEL.json``)."""
        raise NotImplementedError

    def build_embedded(self, name: str = "", seed: int = TINY_SEED, with_t5: bool = True):
        """This family's tiny pipeline with small widths and weights from ``seed`` (in memory, float32).
        ``with_t5=False`` leaves out the T5 encoder where the pipeline can run without it."""
        from diffusers import AutoencoderKL

        tokenizer = clip_tokenizer()
        t5_tokenizer = tiny_t5_tokenizer() if with_t5 else None
        gen_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            transformer = self.new_transformer()
            torch.manual_seed(seed + 1)
            vae = AutoencoderKL(**TINY_VAE, **self.vae_factors)
            torch.manual_seed(seed + 2)
            text = self.new_text_encoders(tokenizer, seed)
            torch.manual_seed(seed + 4)
            t5 = t5_encoder(t5_tokenizer, self.t5_width()) if with_t5 else None
        finally:
            torch.random.set_rng_state(gen_state)
        scheduler = self.new_scheduler()
        return self.assemble(transformer, scheduler, vae, text, tokenizer, t5, t5_tokenizer)

    def save_embedded(self, name: str, out_dir: str | Path, seed: int = TINY_SEED, with_t5: bool = True) -> Path:
        """Build the tiny pipeline and write it with ``save_pretrained`` (float16 safetensors) to ``out_dir``,
        atomically (``<out_dir>.tmp``, then a rename), with ``TINY_MODEL.json`` recording how it was built."""
        quiet_libraries()
        pipe = self.build_embedded(name, seed=seed, with_t5=with_t5)
        info = {"family": self.name, "seed": seed, "with_t5": with_t5, "transformer": self.tiny_transformer,
                "vae": {**TINY_VAE, **self.vae_factors}, "text": self.text_configs(),
                "t5": T5_ENCODER if with_t5 else None, "scheduler": self.scheduler_config}
        return save_pipeline(pipe, out_dir, info, info_name="TINY_MODEL.json")


class FlowMatchingFamily(TransformerFamily):
    """A rectified-flow DiT: noised as ``(1 - sigma) x0 + sigma eps`` at one noise level per extraction."""

    def scale_latents(self, vae, sample: torch.Tensor, dtype: torch.dtype, latent_stats: bool = True) -> torch.Tensor:
        """Flow-matching VAEs are shifted, then scaled (SD3's and FLUX's pipelines read no ``latents_mean``)."""
        return (sample.to(dtype=dtype) - vae.config.shift_factor) * vae.config.scaling_factor

    def new_scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(**self.scheduler_config)

    def model_timestep(self, sigma: float) -> float:
        """The ``timestep`` the transformer receives at noise level ``sigma`` (recorded in the stores)."""
        raise NotImplementedError

    def paper_noise_level(self, pipe, step: int) -> tuple[float, float]:
        """``(sigma, model_timestep)`` of sdhelper 1.0.0's ``img2repr(step=step)``."""
        raise NotImplementedError

    def prompt_conditioning(self, pipe, prompts: Sequence[str], use_t5: bool = True) -> tuple[dict, bool]:
        """The transformer's text conditioning from the pipeline's own ``encode_prompt``, and whether T5 was used."""
        raise NotImplementedError

    def transformer_inputs(self, pipe, noised_latents: torch.Tensor, sigma: float, cond: dict,
                           guidance: float = 3.5) -> dict:
        """Keyword arguments of one ``pipe.transformer`` call (``return_dict=False``) at ``sigma``."""
        raise NotImplementedError

    def sdhelper_inputs(self, pipe, kwargs: dict, step: int, model_timestep: float, grid: tuple[int, int],
                        batch: int, sdhelper_image_ids: bool = True) -> dict:
        """``kwargs`` as sdhelper 1.0.0's call differs from the pipeline's (its timestep, ...)."""
        return kwargs

    def check_step(self, pipe, step: int) -> None:
        if not self.detect(pipe):
            raise ValueError(f"family {self.name!r} does not match the pipeline's transformer "
                             f"({type(getattr(pipe, 'transformer', None)).__name__})")
        if not 0 <= step <= 999:
            raise ValueError(f"step must be in [0, 999], got {step}")

    # -- the extraction recipe -----------------------------------------------------------------
    def prepare(self, ex) -> None:
        s = ex.settings
        if s.mode == "paper":
            ex.sigma, ex.model_timestep = self.paper_noise_level(ex.pipe, int(s.timestep))
        else:
            ex.sigma = float(s.sigma) if s.sigma is not None else sigma_for_ddpm_timestep(int(s.timestep))
            ex.model_timestep = self.model_timestep(ex.sigma)

    def encode_prompt(self, ex, prompts: list[str]) -> dict:
        cond, ex.t5_used = self.prompt_conditioning(ex.pipe, prompts)
        return cond

    def add_noise(self, ex, lat, noise, t):
        return noised(lat, noise, ex.sigma)

    def backbone_call(self, ex, lat, t, cond):
        """The transformer's keyword arguments for noised latents ``lat`` (:meth:`transformer_inputs`; in paper mode
        :meth:`sdhelper_inputs`), and the hook's selection of the image tokens (:meth:`selector`)."""
        kwargs = self.transformer_inputs(ex.pipe, lat, ex.sigma, cond)
        if ex.settings.mode == "paper":
            kwargs = self.sdhelper_inputs(ex.pipe, kwargs, int(ex.settings.timestep), ex.model_timestep,
                                          self.grid_hw(ex.pipe, tuple(lat.shape[-2:])), lat.shape[0])
        return (), kwargs, self.selector(ex.pipe, lat, cond)

    def describe(self, ex) -> dict:
        return {"noise_level": {"sigma": float(ex.sigma), "model_timestep": float(ex.model_timestep),
                                "from": ("sdhelper 1.0.0's step (paper mode)" if ex.settings.mode == "paper"
                                         else "extraction.sigma" if ex.settings.sigma is not None
                                         else "equal SNR with the DDPM timestep")},
                "t5_used": ex.t5_used}

    # -- sdhelper 1.0.0's paper mode -----------------------------------------------------------
    def paper_representations(self, pipe, images: Sequence, layers: Sequence[str], step: int = 50, seed: int = 42,
                              prompt: str = "", sdhelper_image_ids: bool = True) -> dict[str, torch.Tensor]:
        """What sdhelper 1.0.0's ``img2repr(images, layers, step, seed=seed, batch_size=len(images))`` returns for
        this family's pipeline, with our hooks: ``{layer: (B, C, gh, gw)}`` (any layer of :meth:`paper_layers`).

        ``torch.manual_seed(seed)``; ``image_processor.preprocess`` ([-1, 1]); a VAE posterior sample from the global
        RNG; one noise tensor shared by the batch; ``scale_noise`` at :meth:`paper_noise_level`; the empty prompt
        through the pipeline's ``encode_prompt`` (with T5 where the pipeline has it); :meth:`sdhelper_inputs`.
        """
        tr = pipe.transformer
        modules = resolve_layers(tr, list(layers))
        images = [im.convert("RGB") for im in images]
        if len({im.size for im in images}) != 1:
            raise ValueError("paper_representations: all images of a batch must have the same size")
        sigma, model_t = self.paper_noise_level(pipe, step)
        torch.manual_seed(seed)
        pixels = pipe.image_processor.preprocess(images)
        latents = self.encode_latents(pipe, pixels)
        noise = torch.randn_like(latents[None, 0]).expand(latents.shape)
        x = noised(latents, noise, sigma)
        cond, _ = self.prompt_conditioning(pipe, [prompt] * len(images))
        kwargs = self.transformer_inputs(pipe, x, sigma, cond)
        grid = self.grid_hw(pipe, tuple(latents.shape[-2:]))
        kwargs = self.sdhelper_inputs(pipe, kwargs, step, model_t, grid, len(images), sdhelper_image_ids)
        n_text = cond["encoder_hidden_states"].shape[1]
        out: dict[str, torch.Tensor] = {}

        def hook(name):
            def fn(module, inputs, output):
                out[name] = image_map(name, output, grid, n_text).detach()
            return fn

        with ExitStack() as stack, torch.no_grad():
            for name, module in modules.items():
                stack.callback(module.register_forward_hook(hook(name)).remove)
            tr(**kwargs)
        return {name: out[name] for name in layers}
