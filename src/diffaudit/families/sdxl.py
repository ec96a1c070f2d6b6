"""The SDXL family (``sdxl``): a U-Net with two text towers and SDXL's ``text_time`` added conditioning.

* :class:`SDXLFamily` (``FAMILY``): recognition, the pooled text embedding beside the token embeddings, the added
  conditioning in corrected mode (:func:`sdxl_added_conditioning`) and sdhelper 1.0.0's paper-mode quirk of none
  (:func:`no_added_conditioning`), the VAE upcast to float32, what the stores record.
* Architectures (:data:`SDXL_ARCHITECTURES`, :data:`SDXL_SCHEDULER`) and the embedded ``mini-sdxl``:
  :func:`build_mini_sdxl_pipeline`, :func:`save_mini_sdxl_model`.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from .common import MINI_SEED, quiet_libraries, save_pipeline, write_mini_tokenizer_files
from .sd import MINI_TEXT, MINI_VAE, SD15_TEXT, SD15_VAE
from .unet import UNetFamily


class SDXLFamily(UNetFamily):
    """SDXL: a U-Net with ``text_time`` added conditioning (two text towers, pooled embedding, size/crop ids)."""

    name = "sdxl"
    label = "SDXL U-Net"
    embedded = ("mini-sdxl",)
    upcasts_vae = True  # SDXL's VAE overflows in float16; its pipeline (and sdhelper) upcast it (force_upcast)
    standardises_latents = True  # the SDXL pipelines read latents_mean/latents_std where the VAE config has them

    def detect(self, pipe) -> bool:
        unet = getattr(pipe, "unet", None)
        return (unet is not None and hasattr(pipe, "vae") and unet.config.get("addition_embed_type") == "text_time"
                and hasattr(pipe, "text_encoder_2"))

    def conditioning(self, encoded) -> dict:
        """The concatenation of both towers' penultimate states and the pooled embedding (third of the four
        results of ``encode_prompt``)."""
        return {"encoder_hidden_states": encoded[0], "text_embeds": encoded[2]}

    def backbone_call(self, ex, lat, t, cond):
        args, kwargs, select = super().backbone_call(ex, lat, t, cond)
        if ex.settings.mode != "paper":
            kwargs["added_cond_kwargs"] = sdxl_added_conditioning(cond["text_embeds"], lat.shape[-2:], ex.vae_factor)
        return args, kwargs, select

    def pass_context(self, net: torch.nn.Module, mode: str):
        return no_added_conditioning(net, mode == "paper")

    def describe(self, ex) -> dict:
        return {"added_conditioning": (
                    "none (paper mode: sdhelper 1.0.0 sets addition_embed_type to 'nothing_at_all')"
                    if ex.settings.mode == "paper" else
                    "pooled text embedding + time_ids (original size = target size = the image's, crop (0, 0))"),
                "vae_dtype": str(ex.pipe.vae.dtype).replace("torch.", "")}

    def build_embedded(self, name: str, seed: int = MINI_SEED):
        return build_mini_sdxl_pipeline(seed=seed, arch=name)

    def save_embedded(self, name: str, out_dir: str | Path, seed: int = MINI_SEED) -> Path:
        return save_mini_sdxl_model(out_dir, seed=seed, arch=name)


FAMILY = SDXLFamily()


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


# SDXL (stabilityai/stable-diffusion-xl-base-1.0 and sdxl-turbo): three levels (no attention at the first, 1/2/10
# transformer layers), two text towers (CLIP ViT-L 768 + OpenCLIP bigG 1280, concatenated to 2048) and the
# "text_time" added conditioning (pooled bigG embedding + 6 size/crop numbers, 256 Fourier features each).
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), norm_num_groups=32, cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
SDXL_TEXT = SD15_TEXT
SDXL_TEXT_2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
# mini-sdxl: SDXL's layout (levels, attention placement, two text towers, text_time conditioning) with small widths.
MINI_SDXL_UNET = dict(
    SDXL_UNET, sample_size=32, block_out_channels=(32, 64, 128), transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 4, 8), norm_num_groups=32, cross_attention_dim=96, addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 64,
)
MINI_SDXL_VAE = dict(MINI_VAE, sample_size=256, scaling_factor=0.13025, force_upcast=True)
MINI_SDXL_TEXT_2 = dict(MINI_TEXT, hidden_size=64, hidden_act="gelu", projection_dim=64)
MINI_SDXL_TEXT = dict(MINI_TEXT, hidden_size=32, intermediate_size=64)
#: SDXL-layout architectures: (unet, vae, text encoder, text encoder 2).
SDXL_ARCHITECTURES = {"mini-sdxl": (MINI_SDXL_UNET, MINI_SDXL_VAE, MINI_SDXL_TEXT, MINI_SDXL_TEXT_2),
                      "sdxl": (SDXL_UNET, SDXL_VAE, SDXL_TEXT, SDXL_TEXT_2)}
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      steps_offset=1, prediction_type="epsilon", interpolation_type="linear",
                      use_karras_sigmas=False, timestep_spacing="leading")


def build_mini_sdxl_pipeline(seed: int = MINI_SEED, arch: str = "mini-sdxl"):
    """Build the ``mini-sdxl`` pipeline: SDXL's layout (:data:`MINI_SDXL_UNET`), two CLIP text towers (the second
    with a projection: the pooled embedding), the text_time conditioning, SDXL's Euler scheduler; seeded weights,
    in memory, float32. ``arch="sdxl"`` builds the full-width SDXL architecture (seeded weights, for benchmarks)."""
    unet_cfg, vae_cfg, text_cfg, text2_cfg = SDXL_ARCHITECTURES[arch]
    import tempfile

    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = write_mini_tokenizer_files(Path(tmp))
        tokenizers = [CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77,
                                    pad_token="<|endoftext|>") for _ in range(2)]
    tok = tokenizers[0]
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_cfg)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**vae_cfg)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**ids, **text_cfg))
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**ids, **text2_cfg))
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet,
                                     scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
                                     force_zeros_for_empty_prompt=True)


def save_mini_sdxl_model(out_dir: str | Path, seed: int = MINI_SEED, arch: str = "mini-sdxl") -> Path:
    """Build ``mini-sdxl`` and write it with ``save_pretrained`` (float16 safetensors) to ``out_dir``."""
    quiet_libraries()
    pipe = build_mini_sdxl_pipeline(seed=seed, arch=arch)
    unet_cfg, vae_cfg, text_cfg, text2_cfg = SDXL_ARCHITECTURES[arch]
    info = {"seed": seed, "family": "sdxl", "unet": unet_cfg, "vae": vae_cfg, "text": text_cfg,
            "text_2": text2_cfg}
    return save_pipeline(pipe, out_dir, info)
