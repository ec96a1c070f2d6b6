"""The PixArt family (``pixart``): PixArt-Sigma and PixArt-alpha, DDPM-trained diffusion transformers.

PixArt is a DiT on SDXL-VAE latents (4 channels, scaling 0.13025, no shift; PixArt-alpha: SD's VAE, 0.18215) with
``PixArtTransformer2DModel``: a patch embedding ``pos_embed`` (2x2 latent patches, 16 px tokens; the sin-cos position
table is recomputed for every input size, not stored in the weights), then ``transformer_blocks[i]`` (self-attention
on the image tokens, cross-attention to the projected T5 caption, adaLN-single on the timestep). Only image tokens
flow through the blocks: every hooked output is a ``(B, N, C)`` sequence on the patch grid, row-major. The model was
trained as a VP/DDPM epsilon model (linear betas 1e-4..0.02, learned variance: ``out_channels = 2 x 4``), so it is
noised like the U-Nets (``DDIMScheduler.add_noise`` with its own scheduler's betas) and receives the integer
timestep itself.

sdhelper 1.0.0 has no PixArt path, so there is no paper recipe to reproduce: the family runs in ``corrected`` mode
only and refuses ``paper`` mode in one line. The empty prompt goes through the pipeline's own ``encode_prompt`` (T5
with its attention mask, no caption cleaning; diffusers' conversion drops PixArt's learned null-caption embedding, so
"unconditional" means T5 of the empty string, as in the diffusers pipeline).

The embedded ``mini-pixart``: PixArt-Sigma's layout with 3 blocks of width 32, the project's tiny T5 (width 48, not
32, so a width mix-up fails as 4096 != 1152 does in the real model), a small SDXL-factor VAE and PixArt's
DPM-Solver scheduler config, seeded weights; hub models: ``PixArt-alpha/PixArt-Sigma-XL-2-1024-MS`` (a full
pipeline), ``PixArt-alpha/PixArt-XL-2-512x512`` (PixArt-alpha).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from .common import MINI_SEED, quiet_libraries, save_pipeline
from .flow import T5_ENCODER, TransformerFamily, image_map, t5_encoder, tiny_t5_tokenizer
from .sd import MINI_VAE
from .unet import DDPMFamily

# PixArt-Sigma-XL-2 (28 blocks of width 1152 = 16 heads x 72, T5-XXL 4096 captions, interpolation_scale = px / 512)
# at small width: 3 blocks of 2 x 16, captions 48 wide, sample_size 32 (256 px), interpolation_scale 0.5 (PixArt's
# value at 256 px).
MINI_PIXART_TRANSFORMER = dict(
    sample_size=32, patch_size=2, in_channels=4, out_channels=8, num_layers=3, num_attention_heads=2,
    attention_head_dim=16, cross_attention_dim=32, caption_channels=48, attention_bias=True,
    activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
    norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=0.5, use_additional_conditions=False,
    attention_type="default", dropout=0.0, upcast_attention=False,
)
# SDXL's VAE factors (PixArt-Sigma ships SDXL's VAE) on the embedded models' small VAE layout.
MINI_PIXART_VAE = dict(MINI_VAE, sample_size=256, scaling_factor=0.13025, force_upcast=True)
# scheduler/scheduler_config.json of the PixArt repositories (diffusers' conversion scripts write the
# DPMSolverMultistepScheduler defaults): DDPM linear betas 1e-4..0.02, epsilon prediction.
PIXART_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                        solver_order=2, prediction_type="epsilon", algorithm_type="dpmsolver++",
                        solver_type="midpoint", lower_order_final=True, timestep_spacing="linspace", steps_offset=0)
#: Caption length of PixArtSigmaPipeline (PixArt-alpha's pipeline: 120).
MAX_SEQUENCE_LENGTH = 300


class PixArtFamily(DDPMFamily, TransformerFamily):
    """PixArt-Sigma / PixArt-alpha: a DiT noised on its own DDPM schedule, conditioned on T5 by cross-attention."""

    name = "pixart"
    label = "PixArt DiT"
    embedded = ("mini-pixart",)
    transformer_class = "PixArtTransformer2DModel"
    patch_embedding = "pos_embed"
    tiny_transformer = MINI_PIXART_TRANSFORMER
    scales_model_input = False  # DPM-Solver's scale_model_input is the identity; no paper mode anyway
    upcasts_vae = True  # SDXL's VAE (PixArt-Sigma's) overflows in float16; the pipeline upcasts it (force_upcast)

    def patch(self, pipe) -> int:
        return pipe.transformer.config.patch_size

    # -- the extraction recipe -----------------------------------------------------------------
    def prepare(self, ex) -> None:
        if ex.settings.mode == "paper":
            raise UserError("PixArt has no paper recipe (sdhelper 1.0.0 has no PixArt path): set "
                            "extraction.mode: corrected")
        super().prepare(ex)  # DDPM noising with the model's own betas

    def encode_prompt(self, ex, prompts: list[str]) -> dict:
        """T5 states and their attention mask from the pipeline's ``encode_prompt`` (no guidance, no cleaning)."""
        with torch.no_grad():
            embeds, mask, _, _ = ex.pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False,
                                                       device=ex.device, clean_caption=False,
                                                       max_sequence_length=MAX_SEQUENCE_LENGTH)
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}

    def backbone_call(self, ex, lat, t, cond):
        """The transformer's arguments as PixArtSigmaPipeline builds them: the integer timestep per image, the T5
        states and mask, and the resolution/aspect-ratio conditioning only where the model uses it (PixArt-alpha
        1024)."""
        b = lat.shape[0]
        tr = ex.unet
        added = {"resolution": None, "aspect_ratio": None}
        if tr.config.get("use_additional_conditions"):
            h, w = (int(s) * ex.vae_factor for s in lat.shape[-2:])
            added = {"resolution": torch.tensor([[h, w]], dtype=lat.dtype, device=lat.device).repeat(b, 1),
                     "aspect_ratio": torch.tensor([[h / w]], dtype=lat.dtype, device=lat.device).repeat(b, 1)}
        kwargs = dict(hidden_states=lat, encoder_hidden_states=cond["encoder_hidden_states"],
                      encoder_attention_mask=cond["encoder_attention_mask"], timestep=t.expand(b),
                      added_cond_kwargs=added, return_dict=False)
        return (), kwargs, self.selector(ex.pipe, lat, cond)

    def selector(self, pipe, lat: torch.Tensor, cond: dict):
        """Every block's sequence is the image tokens alone (the caption enters by cross-attention)."""
        grid = self.grid_hw(pipe, tuple(lat.shape[-2:]))
        return lambda name, out: image_map(name, out, grid, 0)

    def describe(self, ex) -> dict:
        abar = float(ex.ddim.alphas_cumprod[int(ex.settings.timestep)])
        return {"noise_level": {"timestep": int(ex.settings.timestep), "alpha_bar": abar,
                                "from": "the model's own DDPM schedule (linear betas)"},
                "t5_used": True, "vae_dtype": str(ex.pipe.vae.dtype).replace("torch.", "")}

    # -- the embedded mini model ---------------------------------------------------------------
    def build_embedded(self, name: str = "mini-pixart", seed: int = MINI_SEED):
        """``mini-pixart`` as a ``PixArtSigmaPipeline`` in memory (float32, weights from ``seed``)."""
        from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

        tokenizer = tiny_t5_tokenizer()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            transformer = PixArtTransformer2DModel(**MINI_PIXART_TRANSFORMER)
            torch.manual_seed(seed + 1)
            vae = AutoencoderKL(**MINI_PIXART_VAE)
            torch.manual_seed(seed + 4)
            text_encoder = t5_encoder(tokenizer, MINI_PIXART_TRANSFORMER["caption_channels"])
        return PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                                   scheduler=DPMSolverMultistepScheduler(**PIXART_SCHEDULER))

    def save_embedded(self, name: str, out_dir: str | Path, seed: int = MINI_SEED) -> Path:
        quiet_libraries()
        pipe = self.build_embedded(name, seed=seed)
        info = {"family": self.name, "seed": seed, "transformer": MINI_PIXART_TRANSFORMER, "vae": MINI_PIXART_VAE,
                "t5": {**T5_ENCODER, "d_model": MINI_PIXART_TRANSFORMER["caption_channels"]},
                "scheduler": PIXART_SCHEDULER}
        return save_pipeline(pipe, out_dir, info, info_name="TINY_MODEL.json")


FAMILY = PixArtFamily()
