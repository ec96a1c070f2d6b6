"""What the U-Net families (SD-1/2 and SDXL) share: DDPM noising as sdhelper does it, the U-Net call, the layer list.

* :class:`DDPMFamily`: VP/DDPM noising with a DDIM scheduler rebuilt from the model's scheduler config (``add_noise``
  at the DDPM timestep; paper mode then applies the pipeline scheduler's ``scale_model_input``). A DiT trained as a
  DDPM epsilon model can reuse it.
* :class:`UNetFamily`: recognition by ``pipe.unet``, text conditioning through the pipeline's own
  ``encode_prompt``, the call ``unet(latents, t, encoder_hidden_states=...)``.
* :func:`unet_layers`: every resnet, attention, down/upsampler and the in/out convolutions in execution order.
"""
from __future__ import annotations

import torch

from .base import Family


class DDPMFamily(Family):
    """Noising on SD's DDPM schedule (what sdhelper 1.0.0 does for every U-Net model)."""

    scales_model_input = True

    def prepare(self, ex) -> None:
        from diffusers import DDIMScheduler

        # sdhelper noises with a DDIM scheduler rebuilt from the model's scheduler config, for every U-Net model.
        ex.ddim = DDIMScheduler.from_config(ex.pipe.scheduler.config)

    def add_noise(self, ex, lat: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        lat = ex.ddim.add_noise(lat, noise, t)
        if ex.settings.mode == "paper" and self.scales_model_input:
            lat = ex.scale_model_input(lat, t)
        return lat


class UNetFamily(DDPMFamily):
    """A latent diffusion U-Net conditioned on text (``pipe.unet``)."""

    kind = "U-Net"

    def backbone(self, pipe) -> torch.nn.Module:
        return pipe.unet

    def paper_layers(self, net: torch.nn.Module) -> list[str]:
        return unet_layers(net)

    def encode_prompt(self, ex, prompts: list[str]) -> dict:
        """The pipeline's own ``encode_prompt`` (its real text encoders), without classifier-free guidance."""
        out = ex.pipe.encode_prompt(prompt=prompts, device=ex.device, num_images_per_prompt=1,
                                    do_classifier_free_guidance=False)
        return self.conditioning(out)

    def conditioning(self, encoded) -> dict:
        """The pipeline's ``encode_prompt`` results -> the conditioning this family keeps: the token embeddings."""
        return {"encoder_hidden_states": encoded[0]}

    def backbone_call(self, ex, lat, t, cond):
        return (lat, t), dict(encoder_hidden_states=cond["encoder_hidden_states"]), None


def unet_layers(unet: torch.nn.Module) -> list[str]:
    """Every resnet, attention, down/upsampler and the in/out convolutions of a diffusers U-Net, in execution order:
    the paper's choice of layers, for any U-Net layout (SDXL's three levels, attention-free blocks, ...)."""
    names = ["conv_in"]

    def block(prefix: str, blk) -> None:
        resnets = getattr(blk, "resnets", None) or []
        attentions = getattr(blk, "attentions", None) or []
        if prefix == "mid_block":  # resnet, then (attention, resnet) pairs
            names.append(f"{prefix}.resnets[0]")
            for i in range(1, len(resnets)):
                if i - 1 < len(attentions):
                    names.append(f"{prefix}.attentions[{i - 1}]")
                names.append(f"{prefix}.resnets[{i}]")
            return
        for i in range(len(resnets)):
            names.append(f"{prefix}.resnets[{i}]")
            if i < len(attentions):
                names.append(f"{prefix}.attentions[{i}]")
        for kind in ("downsamplers", "upsamplers"):
            for i in range(len(getattr(blk, kind, None) or [])):
                names.append(f"{prefix}.{kind}[{i}]")

    for i, blk in enumerate(unet.down_blocks):
        block(f"down_blocks[{i}]", blk)
    if getattr(unet, "mid_block", None) is not None:
        block("mid_block", unet.mid_block)
    for i, blk in enumerate(unet.up_blocks):
        block(f"up_blocks[{i}]", blk)
    names.append("conv_out")
    return names
