"""The SD-1/2 U-Net family (``sd``): SD-1.4/1.5, SD-2.1, SD-Turbo and the embedded ``mini``.

* :data:`PAPER_LAYERS`: the paper's 45 hooked modules; :class:`SDFamily` (``FAMILY``): recognition (a U-Net without
  added conditioning), ``layers: paper`` (the paper's list where the layout matches it).
* SD layer geometry, computed once: :func:`layer_shape` ((channels, spatial) of a layer of the SD-1.5/2.x U-Net) and
  :func:`token_px` (pixels per token of a layer name).
* Architectures and schedulers of the registered SD models (:data:`ARCHITECTURES`, :data:`SCHEDULERS`, ...) and the
  embedded ``mini``: :func:`build_mini_pipeline`, :func:`save_mini_model` (small widths, seeded weights).
* The embedded ``mini-cal``: ``mini`` with a calibrated VAE (:func:`build_mini_cal_pipeline`,
  :func:`save_mini_cal_model`): the same seeded weights, a posterior spread small against the spread of its mean
  over images, and a scaling factor that gives those means unit spread, as a trained VAE has (docs/families.md).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..layers import layer_segments
from .common import MINI_SEED, quiet_libraries, save_pipeline, write_mini_tokenizer_files
from .unet import UNetFamily, unet_layers

# The 45 hooked submodules of the paper (``sd15_all_blocks`` in the authors' code). It omits
# ``up_blocks[0].resnets[2]``. Index in this list = ``layer_index`` in every table.
PAPER_LAYERS: tuple[str, ...] = (
    "conv_in",
    "down_blocks[0].resnets[0]",
    "down_blocks[0].attentions[0]",
    "down_blocks[0].resnets[1]",
    "down_blocks[0].attentions[1]",
    "down_blocks[0].downsamplers[0]",
    "down_blocks[1].resnets[0]",
    "down_blocks[1].attentions[0]",
    "down_blocks[1].resnets[1]",
    "down_blocks[1].attentions[1]",
    "down_blocks[1].downsamplers[0]",
    "down_blocks[2].resnets[0]",
    "down_blocks[2].attentions[0]",
    "down_blocks[2].resnets[1]",
    "down_blocks[2].attentions[1]",
    "down_blocks[2].downsamplers[0]",
    "down_blocks[3].resnets[0]",
    "down_blocks[3].resnets[1]",
    "mid_block.resnets[0]",
    "mid_block.attentions[0]",
    "mid_block.resnets[1]",
    "up_blocks[0].resnets[0]",
    "up_blocks[0].resnets[1]",
    "up_blocks[0].upsamplers[0]",
    "up_blocks[1].resnets[0]",
    "up_blocks[1].attentions[0]",
    "up_blocks[1].resnets[1]",
    "up_blocks[1].attentions[1]",
    "up_blocks[1].resnets[2]",
    "up_blocks[1].attentions[2]",
    "up_blocks[1].upsamplers[0]",
    "up_blocks[2].resnets[0]",
    "up_blocks[2].attentions[0]",
    "up_blocks[2].resnets[1]",
    "up_blocks[2].attentions[1]",
    "up_blocks[2].resnets[2]",
    "up_blocks[2].attentions[2]",
    "up_blocks[2].upsamplers[0]",
    "up_blocks[3].resnets[0]",
    "up_blocks[3].attentions[0]",
    "up_blocks[3].resnets[1]",
    "up_blocks[3].attentions[1]",
    "up_blocks[3].resnets[2]",
    "up_blocks[3].attentions[2]",
    "conv_out",
)


# ---------------------------------------------------------------------------------------------
# Layer geometry (SD-1.5 / SD-2.x)
# ---------------------------------------------------------------------------------------------

#: Channels of each level of the SD-1.5/2.x U-Net, on the way down and on the way up.
DOWN_CHANNELS = (320, 640, 1280, 1280)
UP_CHANNELS = (1280, 1280, 640, 320)
#: Pixels per latent pixel (the VAE's downsampling) and the number of U-Net levels.
VAE_FACTOR = 8
LEVELS = 4


def _depth(kind: str, i: int, sub: str | None) -> int:
    """Halvings of the latent grid at the output of ``{down,up}_blocks[i]``'s ``sub`` list (``None``: the whole block,
    whose output is its down/upsampler's, the last block's its resnets')."""
    last = LEVELS - 1
    if kind == "down_blocks":
        return min(i + 1, last) if sub in ("downsamplers", None) else i
    return last - (min(i + 1, last) if sub in ("upsamplers", None) else i)


def layer_shape(name: str, image_size: int = 512) -> tuple[int, int] | None:
    """(channels, spatial) of a U-Net layer output of the SD-1.5 / SD-2.x U-Net (docs/method.md §1.3).

    Handles conv_in / conv_out, ``{down,up}_blocks[i].{resnets,attentions,downsamplers,upsamplers}[j]``,
    ``mid_block.*`` and the block outputs ``down_blocks[i]``, ``mid_block``, ``up_blocks[i]``; spatial scales
    with ``image_size`` (64 latent tokens at 512 px). Other names (e.g. sub-modules inside an attention block,
    whose outputs are not feature maps) give ``None``.
    """
    base = image_size // VAE_FACTOR
    segs = layer_segments(name)
    if not segs or len(segs) > 2 or any(len(idx) > 1 for _, idx in segs):
        return None
    head, hi = segs[0][0], (segs[0][1][0] if segs[0][1] else None)
    sub = segs[1][0] if len(segs) > 1 else None
    if head == "conv_in" and sub is None:
        return DOWN_CHANNELS[0], base
    if head == "conv_out" and sub is None:
        return 4, base
    if head == "mid_block" and hi is None and sub in (None, "resnets", "attentions"):
        return DOWN_CHANNELS[-1], base >> (LEVELS - 1)
    if head in ("down_blocks", "up_blocks") and hi is not None and 0 <= hi < LEVELS:
        sampler = "downsamplers" if head == "down_blocks" else "upsamplers"
        if sub not in ("resnets", "attentions", sampler, None) or (sub == sampler and hi == LEVELS - 1):
            return None
        channels = (DOWN_CHANNELS if head == "down_blocks" else UP_CHANNELS)[hi]
        return channels, base >> _depth(head, hi, sub)
    return None


def token_px(layer: str) -> int | None:
    """Pixels per token of ``layer`` in an SD-1.x/2.x U-Net (8 at conv_in ... 64 at mid_block); None if unknown.
    Sub-modules count as the list entry they sit in (``up_blocks[1].attentions[0].proj_out``: 32)."""
    segs = layer_segments(layer)
    if not segs:
        return None
    head, idx = segs[0]
    if head in ("conv_in", "conv_out", "conv_norm_out", "conv_act"):
        return VAE_FACTOR
    if head == "mid_block":
        return VAE_FACTOR << (LEVELS - 1)
    if head not in ("down_blocks", "up_blocks") or len(idx) != 1 or not 0 <= idx[0] < LEVELS:
        return None
    sampler = "downsamplers" if head == "down_blocks" else "upsamplers"
    subs = [attr for attr, _ in segs[1:]]
    sub = None if not subs else sampler if sampler in subs else subs[0]
    return VAE_FACTOR << _depth(head, idx[0], sub)


# ---------------------------------------------------------------------------------------------
# The family
# ---------------------------------------------------------------------------------------------

class SDFamily(UNetFamily):
    """SD-1/2: a U-Net with text conditioning only (no added conditioning)."""

    name = "sd"
    label = "SD-1/2 U-Net"
    embedded = ("mini", "mini-cal")

    def detect(self, pipe) -> bool:
        unet = getattr(pipe, "unet", None)
        return unet is not None and hasattr(pipe, "vae") and unet.config.get("addition_embed_type") is None

    def refusal(self, pipe) -> str | None:
        unet = getattr(pipe, "unet", None)
        if unet is None or not hasattr(pipe, "vae"):
            return None
        added = unet.config.get("addition_embed_type")
        return f"{type(pipe).__name__}: a U-Net with added conditioning {added!r} is not supported"

    def paper_layers(self, net: torch.nn.Module) -> list[str]:
        """The paper's 45 layers where the layout is SD-1/2's (they omit ``up_blocks[0].resnets[2]``), else every
        layer of :func:`~diffaudit.families.unet.unet_layers` (the same choice on the model's layout)."""
        every = unet_layers(net)
        if every == [*PAPER_LAYERS[:23], "up_blocks[0].resnets[2]", *PAPER_LAYERS[23:]]:
            return list(PAPER_LAYERS)
        return every

    def token_px(self, layer: str) -> int | None:
        return token_px(layer)

    def build_embedded(self, name: str, seed: int = MINI_SEED):
        if name == "mini-cal":
            return build_mini_cal_pipeline(seed=seed)
        return build_mini_pipeline(seed=seed)

    def save_embedded(self, name: str, out_dir: str | Path, seed: int = MINI_SEED) -> Path:
        if name == "mini-cal":
            return save_mini_cal_model(out_dir, seed=seed)
        return save_mini_model(out_dir, seed=seed)


FAMILY = SDFamily()

# ---------------------------------------------------------------------------------------------
# Architectures, schedulers and the embedded ``mini`` model
# ---------------------------------------------------------------------------------------------

# SD-1.5 block layout (block types, depth, attention placement) with small widths. Layer names
# and the 8x VAE downsampling are therefore exactly those of SD-1.5.
MINI_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 128, 128),
    layers_per_block=2,
    attention_head_dim=8,
    norm_num_groups=32,
    cross_attention_dim=64,
)
MINI_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 32, 64, 64),
    layers_per_block=1,
    norm_num_groups=16,
    latent_channels=4,
    sample_size=512,
    scaling_factor=0.18215,
)
MINI_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=64)
# The full SD-1.5 architecture (for offline speed checks with seeded weights; not the trained model).
SD15_UNET = dict(MINI_UNET, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768)
SD15_VAE = dict(MINI_VAE, block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
# SD-2.1 / SD-Turbo (same U-Net; sd21 is the 768-px v-model, sd-turbo the 512-px distilled one): SD-1.5's channel
# layout with per-level head counts, linear attention projections and the OpenCLIP ViT-H/14 text tower (1024 wide).
SD21_UNET = dict(SD15_UNET, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True)
SD21_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                 max_position_embeddings=77, hidden_act="gelu", projection_dim=512)
ARCHITECTURES = {"mini": (MINI_UNET, MINI_VAE, MINI_TEXT), "sd15": (SD15_UNET, SD15_VAE, SD15_TEXT),
                 "sd21": (SD21_UNET, SD15_VAE, SD21_TEXT)}
# Token vocabulary of the real CLIP / OpenCLIP tokenizers (the mini tokenizer is smaller).
CLIP_VOCAB_SIZE = 49408

# SD-1.5's scheduler configuration (PNDM, scaled-linear betas).
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1,
                      set_alpha_to_one=False, prediction_type="epsilon")
# stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json: DDIM, v-prediction, default (leading) spacing.
SD21_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                      prediction_type="v_prediction", timestep_spacing="leading")
# stabilityai/sd-turbo scheduler/scheduler_config.json: Euler, trailing spacing, epsilon prediction.
# (prediction_type does not enter the extraction: only the betas (DDIM add_noise) and Euler's sigma table do.)
SDTURBO_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, steps_offset=1, prediction_type="epsilon",
                         interpolation_type="linear", use_karras_sigmas=False, timestep_spacing="trailing")
# The scheduler classes of the registered models, by short name: (diffusers class, config).
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "pndm": ("PNDMScheduler", SD15_SCHEDULER),           # sd14, sd15
    "ddim": ("DDIMScheduler", SD21_SCHEDULER),           # sd21
    "euler": ("EulerDiscreteScheduler", SDTURBO_SCHEDULER),  # sdturbo
}
# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json: Euler, leading spacing, epsilon.
MODEL_SCHEDULERS: dict[str, str] = {"sd14": "pndm", "sd15": "pndm", "sd21": "ddim", "sdturbo": "euler"}
#: Architecture (a key of :data:`ARCHITECTURES`) of each registered model (sd-turbo has SD-2.1's networks).
MODEL_ARCHITECTURES: dict[str, str] = {"sd14": "sd15", "sd15": "sd15", "sd21": "sd21", "sdturbo": "sd21",
                                       "mini": "mini"}




def make_scheduler(name: str = "pndm"):
    """A fresh scheduler of one of :data:`SCHEDULERS` (``pndm``, ``ddim``, ``euler``)."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {name!r}")
    cls, cfg = SCHEDULERS[name]
    return getattr(diffusers, cls)(**cfg)


def build_mini_pipeline(seed: int = MINI_SEED, unet_overrides: dict | None = None, arch: str = "mini",
                        scheduler: str = "pndm"):
    """Build the ``mini`` SD-1.5-shaped pipeline with seeded weights (in memory, float32).

    ``arch="sd15"`` builds the full-width SD-1.5 architecture instead (seeded weights, for benchmarks).
    ``scheduler`` picks one of :data:`SCHEDULERS` (``ddim``: SD-2.1's, ``euler``: SD-Turbo's).
    """
    unet_cfg, vae_cfg, text_cfg = ARCHITECTURES[arch]
    import tempfile

    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = write_mini_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77,
                                  pad_token="<|endoftext|>")
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**{**unet_cfg, **(unet_overrides or {})})
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**vae_cfg)
        torch.manual_seed(seed + 2)
        text_config = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                     **text_cfg)
        text_encoder = CLIPTextModel(text_config)
    finally:
        torch.random.set_rng_state(gen_state)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=make_scheduler(scheduler), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def save_mini_model(out_dir: str | Path, seed: int = MINI_SEED, unet_overrides: dict | None = None,
                    scheduler: str = "pndm") -> Path:
    """Build ``mini`` and write it with ``save_pretrained`` (float16 safetensors) to ``out_dir``."""
    quiet_libraries()
    pipe = build_mini_pipeline(seed=seed, unet_overrides=unet_overrides, scheduler=scheduler)
    info = {"seed": seed, "unet": {**MINI_UNET, **(unet_overrides or {})}, "vae": MINI_VAE, "text": MINI_TEXT}
    if scheduler != "pndm":  # the default model's file stays as it was
        info["scheduler"] = scheduler
    return save_pipeline(pipe, out_dir, info)


# ---------------------------------------------------------------------------------------------
# mini-cal: mini with a calibrated VAE
# ---------------------------------------------------------------------------------------------

# With random weights, mini's VAE encoder puts out a log-variance near 0: its posterior spread (about 1.06) is six
# times the spread of its mean over images (about 0.18-0.19), so after scaling_factor 0.18215 and at t=50 the U-Net
# input carries about 0.03 of image signal against 0.19 of posterior noise and 0.22 of forward noise
# (benchmarks/vae_signal.py). A trained VAE is the other way round. mini-cal keeps every weight of mini (same seeds)
# and changes two numbers: the log-variance half of the VAE's quant_conv bias is shifted by MINI_CAL_LOGVAR_SHIFT
# (posterior std times exp(-6), about 0.0026, a 70th of the mean's spread), and scaling_factor is set so that the
# scaled posterior means have unit standard deviation over images (the RMS over latent elements of the std over
# images), measured on the calibration images: the demo source's 40 images at 512 px, [0, 1] pixels, the model as
# saved (float16 weights, loaded in float32 on the CPU): std 0.1910 -> 1 / 0.1910 = 5.236. The constant is written
# here, rounded to four digits, so the build stays byte-deterministic (tests/test_models.py measures it again).
MINI_CAL_LOGVAR_SHIFT = -12.0
MINI_CAL_SCALING_FACTOR = 5.236
MINI_CAL_VAE = dict(MINI_VAE, scaling_factor=MINI_CAL_SCALING_FACTOR)


def build_mini_cal_pipeline(seed: int = MINI_SEED):
    """``mini`` (:func:`build_mini_pipeline`, same seeds and weights) with its VAE calibrated: the encoder's
    log-variance lowered by :data:`MINI_CAL_LOGVAR_SHIFT` and ``scaling_factor`` :data:`MINI_CAL_SCALING_FACTOR`."""
    pipe = build_mini_pipeline(seed=seed)
    vae = pipe.vae
    vae.register_to_config(scaling_factor=MINI_CAL_SCALING_FACTOR)
    latent = int(vae.config.latent_channels)
    with torch.no_grad():  # quant_conv's outputs: latent means, then latent log-variances
        vae.quant_conv.bias[latent:] += MINI_CAL_LOGVAR_SHIFT
    return pipe


def save_mini_cal_model(out_dir: str | Path, seed: int = MINI_SEED) -> Path:
    """Build ``mini-cal`` and write it with ``save_pretrained`` (float16 safetensors) to ``out_dir``."""
    quiet_libraries()
    pipe = build_mini_cal_pipeline(seed=seed)
    info = {"seed": seed, "unet": MINI_UNET, "vae": MINI_CAL_VAE, "text": MINI_TEXT,
            "calibration": {"quant_conv_logvar_bias_shift": MINI_CAL_LOGVAR_SHIFT,
                            "scaling_factor": MINI_CAL_SCALING_FACTOR,
                            "scaling_images": "demo source, 40 images at 512 px"}}
    return save_pipeline(pipe, out_dir, info)
