"""The SD3 family (``sd3``): the MMDiT of Stable Diffusion 3 / 3.5 (joint text-image blocks, flow matching).

:class:`SD3Family` (``FAMILY``): ``SD3Transformer2DModel`` pipelines; patch embedding ``pos_embed``, tokens of
``patch_size`` latent pixels; CLIP-L | CLIP-G penultimate states zero-padded, then T5, as the text stream;
``timestep = 1000 sigma``; sdhelper 1.0.0's noise level; the embedded ``mini-sd3`` (:data:`SD3_TRANSFORMER`, ...).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .flow import FlowMatchingFamily, clip_config

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
# vae/config.json and scheduler/scheduler_config.json of stabilityai/stable-diffusion-3-medium-diffusers.
SD3_VAE_FACTORS = dict(scaling_factor=1.5305, shift_factor=0.0609)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)


class SD3Family(FlowMatchingFamily):
    name = "sd3"
    label = "SD3 MMDiT"
    embedded = ("mini-sd3",)
    transformer_class = "SD3Transformer2DModel"
    patch_embedding = "pos_embed"  # PatchEmbed: conv + position embedding, image tokens out
    tiny_transformer = SD3_TRANSFORMER
    vae_factors = SD3_VAE_FACTORS
    scheduler_config = SD3_SCHEDULER

    def patch(self, pipe) -> int:
        return pipe.transformer.config.patch_size

    @staticmethod
    def is_sd35(transformer) -> bool:
        """SD3.5's MMDiT: query-key normalisation (large) or dual-attention "MMDiT-X" layers (medium); SD3 has
        neither."""
        cfg = transformer.config
        return bool(cfg.get("qk_norm")) or bool(cfg.get("dual_attention_layers"))

    def cuda_dtype(self, pipe) -> torch.dtype:
        """bfloat16 for SD3.5, whose activations overflow float16; float16 for SD3 (the paper's rule)."""
        return torch.bfloat16 if self.is_sd35(pipe.transformer) else torch.float16

    def describe(self, ex) -> dict:
        out = super().describe(ex)
        if ex.settings.mode == "paper" and self.is_sd35(ex.pipe.transformer):
            # sdhelper 1.0.0 takes its SD3 branch for SD3 only: on SD3.5 paper mode is an analogy, not a reproduction
            out["paper_recipe"] = ("sdhelper 1.0.0's SD3 recipe applied to SD3.5 (sdhelper has no SD3.5 path): "
                                   "not a reproduction of a run of the authors' code")
        return out

    def model_timestep(self, sigma: float) -> float:
        return sigma * 1000

    def paper_noise_level(self, pipe, step: int) -> tuple[float, float]:
        """SD3 (shift 3): ``set_timesteps(1000)`` then ``timesteps[999 - step]``, i.e. ``sigma = 3 s / (1 + 2 s)`` with
        ``s = linspace(1, 3e-3 / 1.002, 1000)[999 - step]`` (diffusers starts the 1000-step table at the already
        shifted sigma_min and shifts again); step 50: ``sigma = 0.14350``, timestep ``143.50`` (float32). Much less
        noisy than the DDPM step 50 of the U-Net runs (equal SNR: ``sigma_for_ddpm_timestep(50) = 0.1841``)."""
        self.check_step(pipe, step)
        sched = type(pipe.scheduler).from_config(pipe.scheduler.config)  # set_timesteps must not touch the pipeline's
        sched.set_timesteps(1000, device="cpu")
        i = 999 - step
        return float(sched.sigmas[i]), float(sched.timesteps[i])

    def prompt_conditioning(self, pipe, prompts: Sequence[str], use_t5: bool = True) -> tuple[dict, bool]:
        """``encoder_hidden_states`` (CLIP-L|CLIP-G penultimate states zero-padded, then T5) and
        ``pooled_projections``. Without T5 (``use_t5=False`` or a pipeline loaded with ``text_encoder_3=None``) zeros
        stand in T5's place as diffusers does; the second value says whether T5 was used."""
        prompts = list(prompts)
        with torch.no_grad():
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

    def transformer_inputs(self, pipe, noised_latents: torch.Tensor, sigma: float, cond: dict,
                           guidance: float = 3.5) -> dict:
        """``timestep = 1000 sigma`` in float32 (the scheduler's dtype, also under float16)."""
        b = noised_latents.shape[0]
        t = torch.full((b,), sigma * 1000, dtype=torch.float32, device=noised_latents.device)
        return dict(hidden_states=noised_latents, timestep=t, return_dict=False, **cond)

    def sdhelper_inputs(self, pipe, kwargs, step, model_timestep, grid, batch, sdhelper_image_ids=True):
        """The schedule's float32 value itself, not 1000 x its sigma."""
        kwargs["timestep"] = torch.full_like(kwargs["timestep"], model_timestep)
        return kwargs

    # -- the embedded tiny model ---------------------------------------------------------------
    def new_transformer(self):
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel(**SD3_TRANSFORMER)

    def new_text_encoders(self, tokenizer, seed: int) -> dict:
        from transformers import CLIPTextModelWithProjection

        text_encoder = CLIPTextModelWithProjection(clip_config(tokenizer, SD3_CLIP_L))
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(clip_config(tokenizer, SD3_CLIP_G))
        return {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2}

    def text_configs(self) -> list[dict]:
        return [SD3_CLIP_L, SD3_CLIP_G]

    def assemble(self, transformer, scheduler, vae, text, tokenizer, t5, t5_tokenizer):
        """A ``StableDiffusion3Pipeline``; without T5 (``text_encoder_3=None``) it conditions on zeros in its place."""
        from diffusers import StableDiffusion3Pipeline

        from .common import clip_tokenizer

        return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                        text_encoder=text["text_encoder"], tokenizer=tokenizer,
                                        text_encoder_2=text["text_encoder_2"], tokenizer_2=clip_tokenizer(),
                                        text_encoder_3=t5, tokenizer_3=t5_tokenizer)


FAMILY = SD3Family()
