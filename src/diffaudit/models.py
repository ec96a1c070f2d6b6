"""Model registry, loading through diffusers' ``from_pretrained``, and the embedded ``mini`` model.

Hub models are loaded with ``AutoPipelineForText2Image.from_pretrained`` (HF cache, safetensors only,
no remote code). The embedded ``mini`` model is an SD-1.5-shaped pipeline with small widths and weights
from a fixed seed; it is built offline into a local directory with ``save_pretrained`` and loaded back
through exactly the same code path as a hub model.
"""
from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from . import layout
from .devices import default_device
from .errors import DiffauditError


class _DropTorchvisionFallback(logging.Filter):
    """transformers announces at every import that its image processors fall back to PIL without torchvision;
    the Stable Diffusion pipelines never use those processors, so the three lines are noise in every job."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


@contextmanager
def diffusers_errors_only():
    """diffusers logs errors only for the duration (loading and ``.to(float16)`` warn about modules kept in
    float32; there are none in these models)."""
    from diffusers.utils import logging as dlogging

    verbosity = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(verbosity)


def quiet_libraries() -> None:
    """No import-time warnings about torchvision and no loading/saving progress bars from diffusers and
    transformers (the extraction shows its own progress)."""
    import diffusers
    import transformers

    logging.getLogger("transformers.utils.import_utils").addFilter(_DropTorchvisionFallback())
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


class ModelLoadError(DiffauditError, RuntimeError):
    """A model could not be resolved or loaded; the message says what to do."""


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from: a hub id (with revision) or a local diffusers directory."""

    key: str
    source: str
    revision: str | None = None

    @property
    def is_local(self) -> bool:
        return os.path.isabs(self.source) or self.source.startswith(".") or Path(self.source).is_dir()

    def describe(self) -> str:
        if self.is_local:
            return f"{self.key} (local directory {self.source})"
        return f"{self.key} (hub id {self.source} @ {self.revision or 'main'})"


def resolve_model(key: str, model_sources: dict) -> ModelSpec:
    """Look ``key`` up in the ``model_sources`` config mapping.

    Values are either a string (hub id or local directory) or a mapping ``{id: ..., revision: ...}``.
    A key that is not registered but looks like a hub id (``owner/name``) or an existing directory
    is accepted as its own source.
    """
    entry = model_sources.get(key) if model_sources else None
    if entry is None:
        if "/" in key or Path(key).is_dir():
            return ModelSpec(key=key, source=key)
        raise ModelLoadError(
            f"unknown model {key!r}: not in model_sources (known: {', '.join(sorted(model_sources or {}))}). "
            "Add it to model_sources in your config as a hub id or a local diffusers directory."
        )
    if isinstance(entry, str):
        return ModelSpec(key=key, source=entry)
    if isinstance(entry, dict) and "id" in entry:
        return ModelSpec(key=key, source=str(entry["id"]), revision=entry.get("revision"))
    raise ModelLoadError(
        f"model_sources.{key}: expected a hub id, a directory, or {{id: ..., revision: ...}}, got {entry!r}"
    )


def compute_dtype(device: str, precision: str = "auto") -> torch.dtype:
    """The paper's rule: float16 on CUDA, float32 on CPU (``precision: auto``)."""
    if precision == "auto":
        return torch.float32 if device == "cpu" else torch.float16
    if precision in ("float16", "fp16"):
        return torch.float16
    if precision in ("float32", "fp32"):
        return torch.float32
    raise ValueError(f"precision must be auto, float16 or float32, got {precision!r}")


def load_pipeline(spec: ModelSpec, device: str | None = None, dtype: torch.dtype | None = None,
                  offload: bool = False, free_bytes: int | None = None):
    """Load a Stable Diffusion pipeline as sdhelper 1.0.0 does.

    The weights are loaded as float16 (as the authors did) and then moved to ``device`` in ``dtype``; with
    ``offload`` (CUDA only) each component is moved to the GPU only while it runs (diffusers' model CPU offload; the
    extraction's hooks sit on the backbone's submodules and capture as before). On CUDA the weights must fit the
    device's free memory (``free_bytes``: what it has, default asked from CUDA), else one ``ModelLoadError`` says
    what to do. Any failure (gated, missing, no network, not a diffusers directory) becomes one ``ModelLoadError``.
    """
    quiet_libraries()
    from diffusers import AutoPipelineForText2Image

    device = device or default_device()
    dtype = dtype or compute_dtype(device)
    if spec.is_local and not (Path(spec.source) / "model_index.json").is_file():
        raise ModelLoadError(
            f"model {spec.describe()}: {spec.source}/model_index.json not found; "
            "point model_sources to a directory written by diffusers' save_pretrained"
        )
    kwargs = dict(dtype=torch.float16, use_safetensors=True, safety_checker=None,
                  requires_safety_checker=False)
    if not spec.is_local and spec.revision:
        kwargs["revision"] = spec.revision
    with diffusers_errors_only():
        try:
            pipe = AutoPipelineForText2Image.from_pretrained(spec.source, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every loader failure is reported the same way
            raise _load_error(spec, exc) from exc
        try:
            family = pipeline_family(pipe)
        except ModelLoadError as exc:
            raise ModelLoadError(f"model {spec.describe()}: {exc}") from None
        pipe.set_progress_bar_config(disable=True)
        upcast = family == "sdxl" and dtype == torch.float16 and pipe.vae.config.get("force_upcast", False)
        if str(device).startswith("cuda"):
            check_gpu_memory(spec, pipe, device, dtype, offload, free_bytes, vae_float32=upcast)
        elif offload:
            raise ModelLoadError(f"model {spec.describe()}: extraction.offload needs a CUDA device, not {device!r}")
        if offload:
            pipe.to(dtype=dtype)
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe = pipe.to(device, dtype)
        if upcast:
            pipe.vae.to(torch.float32)  # SDXL's VAE overflows in float16; its pipeline (and sdhelper) upcast it
        return pipe


def _components(pipe) -> dict[str, torch.nn.Module]:
    return {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}


def weight_bytes(pipe, dtype: torch.dtype, vae_float32: bool = False) -> dict[str, int]:
    """Bytes of each component's weights (and buffers) in ``dtype`` (the VAE in float32 if ``vae_float32``)."""
    out = {}
    for name, module in _components(pipe).items():
        n = sum(t.numel() for t in [*module.parameters(), *module.buffers()] if t.is_floating_point())
        width = 4 if name == "vae" and vae_float32 else torch.finfo(dtype).bits // 8
        out[name] = n * width
    return out


#: Room left on the GPU beside the weights for the activations of a batch and the CUDA context.
GPU_HEADROOM_BYTES = 2**30


def check_gpu_memory(spec: ModelSpec, pipe, device: str, dtype: torch.dtype, offload: bool = False,
                     free_bytes: int | None = None, vae_float32: bool = False) -> None:
    """Refuse, with what to do, when the device cannot hold the weights (all components, or with ``offload`` the
    largest one) plus :data:`GPU_HEADROOM_BYTES`."""
    sizes = weight_bytes(pipe, dtype, vae_float32)
    need = (max(sizes.values()) if offload else sum(sizes.values())) + GPU_HEADROOM_BYTES
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info(torch.device(device))
    if need <= free_bytes:
        return
    gb = 1e9
    parts = ", ".join(f"{k} {v / gb:.1f}" for k, v in sorted(sizes.items(), key=lambda kv: -kv[1]))
    hint = ("use a GPU with more free memory" if offload else
            "set extraction.offload: true (each component on the GPU only while it runs) or use a larger GPU")
    raise ModelLoadError(f"model {spec.describe()} needs about {need / gb:.1f} GB on {device} "
                         f"({'largest component' if offload else 'weights'}: {parts} GB, + "
                         f"{GPU_HEADROOM_BYTES / gb:.1f} GB for activations), but only {free_bytes / gb:.1f} GB are "
                         f"free; {hint}")


#: The model families the extraction knows (docs/families.md): how the backbone is called and conditioned.
FAMILIES = ("sd", "sdxl", "sd3", "flux")
#: The diffusion-transformer families (flow matching; :mod:`diffaudit.dit`).
DIT_FAMILIES = ("sd3", "flux")


def pipeline_family(pipe) -> str:
    """``sd`` (the SD-1/2 U-Net: text conditioning only), ``sdxl`` (a U-Net with SDXL's ``text_time`` added
    conditioning: two text towers, pooled embedding and size/crop ids), ``sd3`` (MMDiT) or ``flux`` (double- and
    single-stream transformer); anything else is refused in one line."""
    if getattr(pipe, "transformer", None) is not None and hasattr(pipe, "vae"):
        from .dit import family_of

        try:
            return family_of(pipe)
        except ValueError as exc:
            raise ModelLoadError(f"{exc}; supported families: {', '.join(FAMILIES)}") from None
    unet = getattr(pipe, "unet", None)
    if unet is None or not hasattr(pipe, "vae"):
        raise ModelLoadError(f"{type(pipe).__name__} is not a latent diffusion pipeline with a U-Net or a supported "
                             f"transformer; supported families: {', '.join(FAMILIES)}")
    added = unet.config.get("addition_embed_type")
    if added is None:
        return "sd"
    if added == "text_time" and hasattr(pipe, "text_encoder_2"):
        return "sdxl"
    raise ModelLoadError(f"{type(pipe).__name__}: a U-Net with added conditioning {added!r} is not supported "
                         f"(supported families: {', '.join(FAMILIES)})")


def backbone(pipe) -> torch.nn.Module:
    """The denoising network whose layers are extracted: the U-Net, or the transformer of a DiT pipeline."""
    return pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet


def download_model(spec: ModelSpec) -> str | None:
    """Put the files :func:`load_pipeline` reads into the Hugging Face cache (``HF_HOME``), for runs on machines
    without internet (cluster compute nodes then run with ``HF_HUB_OFFLINE=1``). Returns the snapshot directory,
    or ``None`` for a local directory (nothing to download)."""
    if spec.is_local:
        return None
    from diffusers import DiffusionPipeline

    kwargs = dict(use_safetensors=True)
    if spec.revision:
        kwargs["revision"] = spec.revision
    try:
        return str(DiffusionPipeline.download(spec.source, **kwargs))
    except Exception as exc:  # noqa: BLE001 - reported like a failed load
        raise _load_error(spec, exc) from exc


def _load_error(spec: ModelSpec, exc: BaseException) -> ModelLoadError:
    reason = " ".join(str(exc).split())[:300]
    if spec.is_local:
        hint = "check that the directory holds a complete diffusers pipeline (save_pretrained)"
    else:
        hint = (f"the model must be downloadable: check the network, log in with `hf auth login` and accept "
                f"the licence at https://huggingface.co/{spec.source} if it is gated, or pre-fill the HF cache "
                f"and set HF_HUB_OFFLINE=1, or set model_sources.{spec.key} to a local diffusers directory")
    return ModelLoadError(f"could not load model {spec.describe()}: {type(exc).__name__}: {reason}. To fix: {hint}.")


def model_revision(spec: ModelSpec, pipe) -> str | None:
    """The resolved commit hash of a hub model (from the HF cache path), else ``None``."""
    path = getattr(pipe, "config", {}).get("_name_or_path") if hasattr(pipe, "config") else None
    if path and "snapshots" in str(path):
        return Path(path).name
    return spec.revision


# ---------------------------------------------------------------------------------------------
# The embedded ``mini`` model
# ---------------------------------------------------------------------------------------------

MINI_SEED = 0
#: Where the workflow builds the embedded models (rule build_mini; `model_sources.<name>` in params.yaml).
EMBEDDED_ROOT = layout.EMBEDDED_ROOT
#: The embedded models (small widths, seeded weights, built offline): name -> family (:func:`pipeline_family`).
EMBEDDED_MODELS: dict[str, str] = {"mini": "sd", "mini-sdxl": "sdxl", "mini-sd3": "sd3", "mini-flux": "flux"}
MINI_DIR = layout.embedded_dir("mini")


def embedded_model(source: str) -> str | None:
    """The embedded model a ``model_sources`` value points to (its build directory), else ``None``."""
    return layout.embedded_name(source, EMBEDDED_MODELS)

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
ARCHITECTURES = {"mini": (MINI_UNET, MINI_VAE, MINI_TEXT), "sd15": (SD15_UNET, SD15_VAE, SD15_TEXT),
                 "sd21": (SD21_UNET, SD15_VAE, SD21_TEXT)}
#: SDXL-layout architectures: (unet, vae, text encoder, text encoder 2).
SDXL_ARCHITECTURES = {"mini-sdxl": (MINI_SDXL_UNET, MINI_SDXL_VAE, MINI_SDXL_TEXT, MINI_SDXL_TEXT_2),
                      "sdxl": (SDXL_UNET, SDXL_VAE, SDXL_TEXT, SDXL_TEXT_2)}
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
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      steps_offset=1, prediction_type="epsilon", interpolation_type="linear",
                      use_karras_sigmas=False, timestep_spacing="leading")
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


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable-unicode map of byte-level BPE (GPT-2/CLIP)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_mini_tokenizer_files(directory: Path) -> tuple[Path, Path]:
    """A small CLIP BPE vocabulary written by the project: all byte symbols (plain and
    word-final) plus a few merges for common lower-case letter pairs, and the two specials."""
    directory.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab_tokens = symbols + [s + "</w>" for s in symbols]
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    merges = [f"{a} {b}" for a in letters[:8] for b in letters[:8]]
    merges += [f"{a} {b}</w>" for a in letters[:8] for b in letters[:8]]
    vocab_tokens += [m.replace(" ", "") for m in merges]
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_tokens))}
    vocab_file = directory / "vocab.json"
    merges_file = directory / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


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


def build_mini_sdxl_pipeline(seed: int = MINI_SEED, arch: str = "mini-sdxl"):
    """Build the ``mini-sdxl`` pipeline: SDXL's layout (:data:`MINI_SDXL_UNET`), two CLIP text towers (the second
    with a projection: the pooled embedding), the text_time conditioning, SDXL's Euler scheduler; seeded weights,
    in memory, float32. ``arch="sdxl"`` builds the full-width SDXL architecture (seeded weights, for benchmarks)."""
    unet_cfg, vae_cfg, text_cfg, text2_cfg = SDXL_ARCHITECTURES[arch]
    import tempfile

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

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


def save_embedded_model(name: str, out_dir: str | Path, seed: int = MINI_SEED) -> Path:
    """Build the embedded model ``name`` (a key of :data:`EMBEDDED_MODELS`) and write it to ``out_dir``."""
    if name == "mini":
        return save_mini_model(out_dir, seed=seed)
    if name == "mini-sdxl":
        quiet_libraries()
        pipe = build_mini_sdxl_pipeline(seed=seed)
        unet_cfg, vae_cfg, text_cfg, text2_cfg = SDXL_ARCHITECTURES[name]
        info = {"seed": seed, "family": "sdxl", "unet": unet_cfg, "vae": vae_cfg, "text": text_cfg,
                "text_2": text2_cfg}
        return save_pipeline(pipe, out_dir, info)
    if name in ("mini-sd3", "mini-flux"):
        from .dit import save_tiny_model

        return save_tiny_model(EMBEDDED_MODELS[name], out_dir, seed=seed)
    raise ValueError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED_MODELS)}")


def save_mini_model(out_dir: str | Path, seed: int = MINI_SEED, unet_overrides: dict | None = None,
                    scheduler: str = "pndm") -> Path:
    """Build ``mini`` and write it with ``save_pretrained`` (float16 safetensors) to ``out_dir``."""
    quiet_libraries()
    pipe = build_mini_pipeline(seed=seed, unet_overrides=unet_overrides, scheduler=scheduler)
    info = {"seed": seed, "unet": {**MINI_UNET, **(unet_overrides or {})}, "vae": MINI_VAE, "text": MINI_TEXT}
    if scheduler != "pndm":  # the default model's file stays as it was
        info["scheduler"] = scheduler
    return save_pipeline(pipe, out_dir, info)


def save_pipeline(pipe, out_dir: str | Path, info: dict, info_name: str = "MINI_MODEL.json") -> Path:
    """``save_pretrained`` in float16 safetensors plus ``info_name`` (what was built, as JSON), atomically: written to
    ``<out_dir>.tmp`` and renamed."""
    out_dir = Path(out_dir)
    with diffusers_errors_only():
        pipe.to(torch.float16)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / info_name).write_text(json.dumps(info, indent=1))
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir
