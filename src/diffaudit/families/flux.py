"""The FLUX family (``flux``): FLUX.1's double-stream then single-stream transformer (flow matching).

:class:`FluxFamily` (``FAMILY``): ``FluxTransformer2DModel`` pipelines; patch embedding ``x_embedder`` (a Linear on
2x2-packed latent tokens); T5 token states and the CLIP-L pooled embedding (plus ``txt_ids``, shared by a batch);
``timestep = sigma``; packed latents with image position ids; sdhelper 1.0.0's noise level, timestep and transposed
image ids; the embedded ``mini-flux`` (:data:`FLUX_TRANSFORMER`, ...).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .flow import FlowMatchingFamily, clip_config

# FLUX.1-schnell: 19 double-stream + 38 single-stream blocks of width 3072 (24 heads x 128, RoPE axes 16+56+56),
# 2x2-packed 16-channel latents (in_channels 64), CLIP-L pooled (768), T5-XXL (4096), no guidance embedding.
FLUX_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32)
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                        guidance_embeds=False, axes_dims_rope=(4, 6, 6))
# vae/config.json and scheduler/scheduler_config.json of black-forest-labs/FLUX.1-schnell.
FLUX_VAE_FACTORS = dict(scaling_factor=0.3611, shift_factor=0.1159)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
                      max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


class FluxFamily(FlowMatchingFamily):
    name = "flux"
    label = "FLUX transformer"
    embedded = ("mini-flux",)
    transformer_class = "FluxTransformer2DModel"
    patch_embedding = "x_embedder"
    shared_conditioning = ("txt_ids",)  # one table for every image
    tiny_transformer = FLUX_TRANSFORMER
    vae_factors = FLUX_VAE_FACTORS
    scheduler_config = FLUX_SCHEDULER

    def patch(self, pipe) -> int:
        return 2  # 2x2 packing

    def cuda_dtype(self, pipe) -> torch.dtype:
        """bfloat16: FLUX's activations overflow float16 (its pipelines are run in bfloat16)."""
        return torch.bfloat16

    def model_timestep(self, sigma: float) -> float:
        return sigma  # the pipeline divides by 1000 and the model multiplies back

    def paper_noise_level(self, pipe, step: int) -> tuple[float, float]:
        """FLUX-schnell (shift 1): the timestep ``step + 1`` of the 1000-step table, ``sigma = (step + 1) / 1000``;
        step 50: ``sigma = 0.051``, and the transformer gets ``0.051`` (``(step + 1) / 1000``)."""
        self.check_step(pipe, step)
        sched = type(pipe.scheduler).from_config(pipe.scheduler.config)  # set_timesteps must not touch the pipeline's
        sched.set_timesteps(1000, device="cpu")
        t = torch.tensor([step + 1], dtype=torch.float32)
        i = sched.index_for_timestep(t, sched.timesteps)
        return float(sched.sigmas[i]), float(t / 1000)

    def prompt_conditioning(self, pipe, prompts: Sequence[str], use_t5: bool = True) -> tuple[dict, bool]:
        """``encoder_hidden_states`` (T5), ``pooled_projections`` (CLIP-L) and ``txt_ids``; FLUX conditions on T5."""
        if not use_t5:
            raise ValueError("FLUX conditions on T5 only: use_t5=False is for sd3 only")
        with torch.no_grad():
            embeds, pooled, txt_ids = pipe.encode_prompt(prompt=list(prompts), prompt_2=None)
        return dict(encoder_hidden_states=embeds, pooled_projections=pooled, txt_ids=txt_ids), True

    def transformer_inputs(self, pipe, noised_latents: torch.Tensor, sigma: float, cond: dict,
                           guidance: float = 3.5) -> dict:
        """Packs 2x2 patches (``_pack_latents``), adds the image position ids (``_prepare_latent_image_ids``: row,
        column), ``timestep = sigma`` in the latents' dtype, and ``guidance`` only for guidance-distilled models
        (FLUX.1-dev; schnell has ``guidance_embeds=False``)."""
        b, c, h, w = noised_latents.shape
        dev, dtype = noised_latents.device, noised_latents.dtype
        self.grid_hw(pipe, (h, w))
        tr = pipe.transformer
        g = torch.full((b,), guidance, dtype=dtype, device=dev) if tr.config.guidance_embeds else None
        return dict(hidden_states=pipe._pack_latents(noised_latents, b, c, h, w),
                    img_ids=pipe._prepare_latent_image_ids(b, h // 2, w // 2, dev, dtype),
                    timestep=torch.full((b,), sigma, dtype=dtype, device=dev), guidance=g, return_dict=False, **cond)

    def sdhelper_inputs(self, pipe, kwargs, step, model_timestep, grid, batch, sdhelper_image_ids=True):
        """sdhelper divides ``step + 1`` by 1000 in the latents' dtype, and passes width and height swapped to
        ``prepare_latents``, so its image position ids are those of the transposed grid laid over the tokens in
        row-major order (``sdhelper_image_ids=False``: the true ids; the same for square images)."""
        kwargs["timestep"] = torch.full_like(kwargs["timestep"], step + 1) / 1000
        if sdhelper_image_ids:
            ids = kwargs["img_ids"]
            kwargs["img_ids"] = pipe._prepare_latent_image_ids(batch, grid[1], grid[0], ids.device, ids.dtype)
        return kwargs

    # -- the embedded tiny model ---------------------------------------------------------------
    def build_embedded(self, name: str = "", seed: int = 0, with_t5: bool = True):
        if not with_t5:
            raise ValueError("FLUX needs its T5 text encoder: with_t5=False is for sd3 only")
        return super().build_embedded(name, seed=seed, with_t5=with_t5)

    def new_transformer(self):
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel(**FLUX_TRANSFORMER)

    def new_text_encoders(self, tokenizer, seed: int) -> dict:
        from transformers import CLIPTextModel

        return {"text_encoder": CLIPTextModel(clip_config(tokenizer, FLUX_CLIP))}

    def text_configs(self) -> list[dict]:
        return [FLUX_CLIP]

    def assemble(self, transformer, scheduler, vae, text, tokenizer, t5, t5_tokenizer):
        from diffusers import FluxPipeline

        return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text["text_encoder"],
                            tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer)


FAMILY = FluxFamily()
