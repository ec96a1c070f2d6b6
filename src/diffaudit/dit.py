"""Diffusion transformers (SD3 MMDiT, FLUX): tiny offline models, layer names, token maps, conditioning, noising.

Building blocks for extracting representations from ``StableDiffusion3Pipeline`` and ``FluxPipeline`` the way
:mod:`diffaudit.extract` does it for U-Nets:

* :func:`build_tiny_pipeline` / :func:`save_tiny_model`: SD3- and FLUX.1-schnell-shaped pipelines with small widths
  and seeded weights (the ``mini`` model's counterpart), including project-written CLIP and T5 tokenizers.
* :func:`paper_layers`: the patch embedding, then every joint block, then (FLUX) every single-stream block.
* :func:`image_map`: a hooked module's raw output -> image tokens on the patch grid, ``(B, C, gh, gw)``.
* :func:`encode_prompt`, :func:`encode_latents`, :func:`noised`, :func:`transformer_inputs`: one transformer call at
  a chosen flow-matching noise level, and :func:`sigma_for_ddpm_timestep`, the level as noisy as SD's DDPM step.
* :func:`paper_representations`: what ``sdhelper==1.0.0``'s ``img2repr`` returns for ``model_name`` ``SD3`` and
  ``FLUX-schnell`` (:func:`paper_noise_level` says which noise level that is).

Flow matching noises as ``x_sigma = (1 - sigma) x0 + sigma eps`` (``FlowMatchEulerDiscreteScheduler.scale_noise``);
SD3's transformer takes ``timestep = 1000 sigma``, FLUX's takes ``sigma`` (the pipeline divides by 1000 and the model
multiplies back). In diffusers 0.42 every joint block (SD3 ``JointTransformerBlock``, FLUX ``FluxTransformerBlock``)
and FLUX's ``FluxSingleTransformerBlock`` return ``(encoder_hidden_states, hidden_states)``: element 1 is the image
stream (SD3's last block has ``context_pre_only`` and returns ``None`` as element 0).
"""
from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import torch

from .layers import resolve_layers
from .models import quiet_libraries, save_pipeline, write_mini_tokenizer_files

FAMILIES = ("sd3", "flux")
TINY_SEED = 0

# ---------------------------------------------------------------------------------------------
# Tiny architectures (real models' layouts and constants, small widths)
# ---------------------------------------------------------------------------------------------

# SD3-medium: 24 joint blocks of width 1536 (24 heads x 64), patch 2, CLIP-L (768) + CLIP-G (1280) -> pooled 2048,
# T5-XXL (4096) = joint_attention_dim. Here: 3 blocks of width 32; the two CLIP widths differ (32, 48) as in SD3, so a
# mixed-up concatenation fails; joint_attention_dim 96 > 32 + 48, so the CLIP embeddings are zero-padded as in SD3.
SD3_CLIP_L = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32)
SD3_CLIP_G = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=77, hidden_act="gelu", projection_dim=48)
SD3_TRANSFORMER = dict(sample_size=32, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=8,
                       num_attention_heads=4, joint_attention_dim=96, caption_projection_dim=32,
                       pooled_projection_dim=32 + 48, out_channels=16, pos_embed_max_size=64)
# FLUX.1-schnell: 19 double-stream + 38 single-stream blocks of width 3072 (24 heads x 128, RoPE axes 16+56+56),
# 2x2-packed 16-channel latents (in_channels 64), CLIP-L pooled (768), T5-XXL (4096), no guidance embedding.
FLUX_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32)
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                        guidance_embeds=False, axes_dims_rope=(4, 6, 6))
# T5 v1.1 layout (gated GELU, relative attention); d_model = the transformer's joint_attention_dim.
T5_ENCODER = dict(d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                  feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False, use_cache=False)
# SD-1.5's VAE layout at small width (8x downsampling) with 16 latent channels and no quant convs, as SD3/FLUX's VAE.
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 64, 64), layers_per_block=1,
                norm_num_groups=16, latent_channels=16, sample_size=512, use_quant_conv=False,
                use_post_quant_conv=False)
# vae/config.json of stabilityai/stable-diffusion-3-medium-diffusers and black-forest-labs/FLUX.1-schnell.
VAE_FACTORS = {"sd3": dict(scaling_factor=1.5305, shift_factor=0.0609),
               "flux": dict(scaling_factor=0.3611, shift_factor=0.1159)}
# scheduler/scheduler_config.json of the same two repositories (FlowMatchEulerDiscreteScheduler).
SCHEDULER_CONFIGS = {
    "sd3": dict(num_train_timesteps=1000, shift=3.0),
    "flux": dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096),
}
# Real T5 tokenizers pad to 512 (FLUX's max_sequence_length; SD3's is 256).
T5_MAX_LENGTH = 512


def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {list(FAMILIES)}, got {family!r}")
    return family


def family_of(pipe) -> str:
    """``sd3`` or ``flux``, from the class of ``pipe.transformer``."""
    name = type(getattr(pipe, "transformer", None)).__name__
    if name == "SD3Transformer2DModel":
        return "sd3"
    if name == "FluxTransformer2DModel":
        return "flux"
    raise ValueError(f"not an SD3 or FLUX pipeline: {type(pipe).__name__} has transformer {name}")


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


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = write_mini_tokenizer_files(Path(tmp))
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77, pad_token="<|endoftext|>")


def _clip_config(tokenizer, cfg: dict):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **cfg)


def _t5_encoder(tokenizer, d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=d_model, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0, **T5_ENCODER))


def build_tiny_pipeline(family: str, seed: int = TINY_SEED, with_t5: bool = True):
    """A ``StableDiffusion3Pipeline`` (``sd3``) or ``FluxPipeline`` (``flux``, FLUX.1-schnell-shaped) with small widths
    and weights from ``seed`` (in memory, float32). ``with_t5=False`` leaves out SD3's T5 (``text_encoder_3=None``:
    the pipeline then conditions on zeros in its place); FLUX cannot run without its T5."""
    _check_family(family)
    if family == "flux" and not with_t5:
        raise ValueError("FLUX needs its T5 text encoder: with_t5=False is for sd3 only")
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                           SD3Transformer2DModel, StableDiffusion3Pipeline)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _clip_tokenizer()
    t5_tokenizer = tiny_t5_tokenizer() if with_t5 else None
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        transformer = (SD3Transformer2DModel(**SD3_TRANSFORMER) if family == "sd3"
                       else FluxTransformer2DModel(**FLUX_TRANSFORMER))
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**TINY_VAE, **VAE_FACTORS[family])
        torch.manual_seed(seed + 2)
        if family == "sd3":
            text_encoder = CLIPTextModelWithProjection(_clip_config(tokenizer, SD3_CLIP_L))
            torch.manual_seed(seed + 3)
            text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer, SD3_CLIP_G))
        else:
            text_encoder = CLIPTextModel(_clip_config(tokenizer, FLUX_CLIP))
        torch.manual_seed(seed + 4)
        width = (SD3_TRANSFORMER if family == "sd3" else FLUX_TRANSFORMER)["joint_attention_dim"]
        t5 = _t5_encoder(t5_tokenizer, width) if with_t5 else None
    finally:
        torch.random.set_rng_state(gen_state)
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIGS[family])
    if family == "sd3":
        return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                        text_encoder=text_encoder, tokenizer=tokenizer,
                                        text_encoder_2=text_encoder_2, tokenizer_2=_clip_tokenizer(),
                                        text_encoder_3=t5, tokenizer_3=t5_tokenizer)
    return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                        tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer)


def save_tiny_model(family: str, out_dir: str | Path, seed: int = TINY_SEED, with_t5: bool = True) -> Path:
    """Build the tiny ``family`` pipeline and write it with ``save_pretrained`` (float16 safetensors) to ``out_dir``,
    atomically (``<out_dir>.tmp``, then a rename), with ``TINY_MODEL.json`` recording how it was built."""
    quiet_libraries()
    pipe = build_tiny_pipeline(family, seed=seed, with_t5=with_t5)
    info = {"family": family, "seed": seed, "with_t5": with_t5,
            "transformer": SD3_TRANSFORMER if family == "sd3" else FLUX_TRANSFORMER,
            "vae": {**TINY_VAE, **VAE_FACTORS[family]},
            "text": [SD3_CLIP_L, SD3_CLIP_G] if family == "sd3" else [FLUX_CLIP],
            "t5": T5_ENCODER if with_t5 else None, "scheduler": SCHEDULER_CONFIGS[family]}
    return save_pipeline(pipe, out_dir, info, info_name="TINY_MODEL.json")


# ---------------------------------------------------------------------------------------------
# Layers and token maps
# ---------------------------------------------------------------------------------------------

#: The patch embedding of each family: SD3's ``PatchEmbed`` (conv + position embedding, image tokens out) and FLUX's
#: ``x_embedder`` (a Linear on the 2x2-packed latent tokens).
PATCH_EMBEDDING = {"sd3": "pos_embed", "flux": "x_embedder"}


def paper_layers(transformer: torch.nn.Module) -> list[str]:
    """The paper's layer list for a DiT: the patch embedding, every ``transformer_blocks[i]``, then (FLUX) every
    ``single_transformer_blocks[i]``, in the notation :func:`diffaudit.layers.resolve_layers` reads."""
    name = type(transformer).__name__
    family = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}.get(name)
    if family is None:
        raise ValueError(f"paper_layers: expected an SD3Transformer2DModel or FluxTransformer2DModel, got {name}")
    names = [PATCH_EMBEDDING[family]]
    names += [f"transformer_blocks[{i}]" for i in range(len(transformer.transformer_blocks))]
    names += [f"single_transformer_blocks[{i}]" for i in range(len(getattr(transformer, "single_transformer_blocks",
                                                                            ())))]
    return names


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


def grid_hw(pipe, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The patch grid (rows, columns) of latents of size ``latent_hw``: SD3 patches of ``patch_size``, FLUX 2x2
    packing."""
    h, w = latent_hw
    p = pipe.transformer.config.patch_size if family_of(pipe) == "sd3" else 2
    if h % p or w % p:
        raise ValueError(f"latent size {h}x{w} is not a multiple of the {p}x{p} patches")
    return h // p, w // p


# ---------------------------------------------------------------------------------------------
# Conditioning, latents, noise level
# ---------------------------------------------------------------------------------------------

def encode_prompt(pipe, prompts: Sequence[str], use_t5: bool = True) -> tuple[dict, bool]:
    """The transformer's text conditioning from the pipeline's own ``encode_prompt``: SD3 ``encoder_hidden_states``
    (CLIP-L|CLIP-G penultimate states zero-padded, then T5) and ``pooled_projections``; FLUX also ``txt_ids``.
    Without T5 (``use_t5=False`` or a pipeline loaded with ``text_encoder_3=None``) SD3 puts zeros in T5's place as
    diffusers does; the second value says whether T5 was used."""
    prompts = list(prompts)
    family = family_of(pipe)
    with torch.no_grad():
        if family == "flux":
            if not use_t5:
                raise ValueError("FLUX conditions on T5 only: use_t5=False is for sd3 only")
            embeds, pooled, txt_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None)
            return dict(encoder_hidden_states=embeds, pooled_projections=pooled, txt_ids=txt_ids), True
        t5 = pipe.text_encoder_3
        t5_used = use_t5 and t5 is not None
        # the pipeline's own T5-free path: hide T5 for the call. object.__setattr__ because the pipeline's
        # __setattr__ rewrites its config and cannot restore it (setting the module back leaves [None, None]).
        if not t5_used and t5 is not None:
            object.__setattr__(pipe, "text_encoder_3", None)
        try:
            embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                                      do_classifier_free_guidance=False)
        finally:
            object.__setattr__(pipe, "text_encoder_3", t5)
    return dict(encoder_hidden_states=embeds, pooled_projections=pooled), t5_used


def encode_latents(pipe, pixels_m1_1: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(vae.encode(x).latent_dist.sample() - shift_factor) * scaling_factor`` of ``[-1, 1]`` pixels, (B, 16, h, w);
    the sample comes from ``generator``, else from the global RNG (as sdhelper draws it)."""
    vae = pipe.vae
    x = pixels_m1_1.to(device=vae.device, dtype=vae.dtype)
    with torch.no_grad():
        sample = vae.encode(x).latent_dist.sample(generator)
    dtype = pipe.transformer.dtype
    return (sample.to(dtype) - vae.config.shift_factor) * vae.config.scaling_factor


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


def transformer_inputs(pipe, noised_latents: torch.Tensor, sigma: float, cond: dict,
                       guidance: float = 3.5) -> dict:
    """Keyword arguments of one ``pipe.transformer`` call (``return_dict=False``: it returns a tuple) at noise level
    ``sigma`` on ``(B, 16, h, w)`` latents, as the pipelines build them: SD3 ``timestep = 1000 sigma`` in float32
    (the scheduler's dtype, also under float16); FLUX packs 2x2 patches (``_pack_latents``), adds the image position
    ids (``_prepare_latent_image_ids``: row, column), ``timestep = sigma`` in the latents' dtype, and ``guidance``
    only for guidance-distilled models (FLUX.1-dev; schnell has ``guidance_embeds=False``)."""
    b, c, h, w = noised_latents.shape
    dev, dtype = noised_latents.device, noised_latents.dtype
    if family_of(pipe) == "sd3":
        t = torch.full((b,), sigma * 1000, dtype=torch.float32, device=dev)
        return dict(hidden_states=noised_latents, timestep=t, return_dict=False, **cond)
    grid_hw(pipe, (h, w))
    tr = pipe.transformer
    g = torch.full((b,), guidance, dtype=dtype, device=dev) if tr.config.guidance_embeds else None
    return dict(hidden_states=pipe._pack_latents(noised_latents, b, c, h, w),
                img_ids=pipe._prepare_latent_image_ids(b, h // 2, w // 2, dev, dtype),
                timestep=torch.full((b,), sigma, dtype=dtype, device=dev), guidance=g, return_dict=False, **cond)


# ---------------------------------------------------------------------------------------------
# sdhelper 1.0.0's paper mode
# ---------------------------------------------------------------------------------------------

def paper_noise_level(pipe, family: str, step: int) -> tuple[float, float]:
    """``(sigma, model_timestep)`` of sdhelper 1.0.0's ``img2repr(step=step)``: the noise level of ``scale_noise`` and
    the ``timestep`` the transformer receives.

    SD3 (shift 3): ``set_timesteps(1000)`` then ``timesteps[999 - step]``, i.e. ``sigma = 3 s / (1 + 2 s)`` with
    ``s = linspace(1, 3e-3 / 1.002, 1000)[999 - step]`` (diffusers starts the 1000-step table at the already shifted
    sigma_min and shifts again); step 50: ``sigma = 0.14350``, timestep ``143.50`` (float32).
    FLUX-schnell (shift 1): the timestep ``step + 1`` of the 1000-step table, ``sigma = (step + 1) / 1000``; step 50:
    ``sigma = 0.051``, and the transformer gets ``0.051`` (``(step + 1) / 1000``).
    Both are much less noisy than the DDPM step 50 of the U-Net runs (equal SNR: :func:`sigma_for_ddpm_timestep`
    ``(50) = 0.1841``).
    """
    _check_family(family)
    if family != family_of(pipe):
        raise ValueError(f"family {family!r} does not match the pipeline's transformer ({family_of(pipe)})")
    if not 0 <= step <= 999:
        raise ValueError(f"step must be in [0, 999], got {step}")
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)  # set_timesteps must not touch the pipeline's
    sched.set_timesteps(1000, device="cpu")
    if family == "sd3":
        i = 999 - step
        return float(sched.sigmas[i]), float(sched.timesteps[i])
    t = torch.tensor([step + 1], dtype=torch.float32)
    i = sched.index_for_timestep(t, sched.timesteps)
    return float(sched.sigmas[i]), float(t / 1000)


def paper_representations(pipe, images: Sequence, layers: Sequence[str], step: int = 50, seed: int = 42,
                          prompt: str = "", sdhelper_image_ids: bool = True) -> dict[str, torch.Tensor]:
    """What sdhelper 1.0.0's ``img2repr(images, layers, step, seed=seed, batch_size=len(images))`` returns for an SD3
    or FLUX pipeline, with our hooks: ``{layer: (B, C, gh, gw)}`` (any layer of :func:`paper_layers`; sdhelper's
    ``output[1]`` only works for blocks).

    ``torch.manual_seed(seed)``; ``image_processor.preprocess`` ([-1, 1]); a VAE posterior sample from the global RNG;
    one noise tensor shared by the batch; ``scale_noise`` at :func:`paper_noise_level`; the empty prompt through the
    pipeline's ``encode_prompt`` (with T5 where the pipeline has it). sdhelper passes width and height swapped to
    FLUX's ``prepare_latents``, so its image position ids are those of the transposed grid laid over the tokens in
    row-major order; ``sdhelper_image_ids=False`` uses the true (row, column) ids instead (the same for square
    images).
    """
    family = family_of(pipe)
    tr = pipe.transformer
    modules = resolve_layers(tr, list(layers))
    images = [im.convert("RGB") for im in images]
    if len({im.size for im in images}) != 1:
        raise ValueError("paper_representations: all images of a batch must have the same size")
    sigma, model_t = paper_noise_level(pipe, family, step)
    torch.manual_seed(seed)
    pixels = pipe.image_processor.preprocess(images)
    latents = encode_latents(pipe, pixels)
    noise = torch.randn_like(latents[None, 0]).expand(latents.shape)
    x = noised(latents, noise, sigma)
    cond, _ = encode_prompt(pipe, [prompt] * len(images))
    kwargs = transformer_inputs(pipe, x, sigma, cond)
    grid = grid_hw(pipe, tuple(latents.shape[-2:]))
    if family == "sd3":  # the schedule's float32 value itself, not 1000 x its sigma
        kwargs["timestep"] = torch.full_like(kwargs["timestep"], model_t)
    else:  # sdhelper divides in the latents' dtype
        kwargs["timestep"] = torch.full_like(kwargs["timestep"], step + 1) / 1000
        if sdhelper_image_ids:
            ids = kwargs["img_ids"]
            kwargs["img_ids"] = pipe._prepare_latent_image_ids(len(images), grid[1], grid[0], ids.device, ids.dtype)
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
