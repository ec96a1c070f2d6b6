"""Model sources (``model_sources``), loading through diffusers' ``from_pretrained``, and the embedded models' paths.

Hub models are loaded with ``AutoPipelineForText2Image.from_pretrained`` (HF cache, safetensors only,
no remote code); the family of a loaded pipeline is decided here, once (:func:`pipeline_family`, from
:mod:`diffaudit.families.registry`). The embedded models (``mini``, ``mini-sdxl``, ``mini-sd3``, ``mini-flux``) are
built offline by their family's module (:mod:`diffaudit.families`) into :data:`EMBEDDED_ROOT` with
``save_pretrained`` (:func:`save_embedded_model`) and loaded back through exactly the same code path as a hub model.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import layout
from .devices import default_device
from .errors import ModelLoadError
from .families import registry
from .families.common import MINI_SEED, diffusers_errors_only, quiet_libraries, save_pipeline

__all__ = ["ModelLoadError", "ModelSpec", "Snapshot", "resolve_model", "resolve_snapshot", "compute_dtype",
           "load_pipeline", "weight_bytes", "check_gpu_memory", "GPU_HEADROOM_BYTES", "pipeline_family", "backbone",
           "download_model",
           "EMBEDDED_ROOT", "EMBEDDED_MODELS", "MINI_DIR", "MINI_SEED", "embedded_model", "save_embedded_model",
           "diffusers_errors_only", "quiet_libraries", "save_pipeline"]


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from: a hub id (with revision) or a local diffusers directory, and the hub ids to try in
    order when the main one is gone or unreachable (``mirrors``: ``(id, revision)`` pairs)."""

    key: str
    source: str
    revision: str | None = None
    mirrors: tuple[tuple[str, str | None], ...] = ()

    @property
    def is_local(self) -> bool:
        return os.path.isabs(self.source) or self.source.startswith(".") or Path(self.source).is_dir()

    def describe(self) -> str:
        if self.is_local:
            return f"{self.key} (local directory {self.source})"
        return f"{self.key} (hub id {self.source} @ {self.revision or 'main'})"

    def candidates(self) -> list[tuple[str, str | None]]:
        """The hub ids to try, in order: the main id, then each mirror (``(id, revision)``)."""
        return [(self.source, self.revision), *self.mirrors]


@dataclass(frozen=True)
class Snapshot:
    """The files a model was loaded from: ``source`` the hub id actually used (the main id or a mirror; for a local
    directory the directory), its ``revision`` as asked, the resolved ``commit`` (None for a local directory) and
    the local folder holding the files (``path``: the hub cache's snapshot folder, or the directory)."""

    source: str
    revision: str | None
    commit: str | None
    path: str
    mirror: bool = False


def _mirror(key: str, entry) -> tuple[str, str | None]:
    if isinstance(entry, str) and entry:
        return entry, None
    if isinstance(entry, dict) and isinstance(entry.get("id"), str) and entry["id"]:
        return entry["id"], entry.get("revision")
    raise ModelLoadError(f"model_sources.{key}.mirrors: each mirror is a hub id or {{id: ..., revision: ...}}, "
                         f"got {entry!r}")


def resolve_model(key: str, model_sources: dict) -> ModelSpec:
    """Look ``key`` up in the ``model_sources`` config mapping.

    Values are either a string (hub id or local directory) or a mapping ``{id: ..., revision: ..., mirrors: [...]}``
    (each mirror a hub id, tried at its ``main``, or ``{id: ..., revision: ...}``).
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
        mirrors = entry.get("mirrors") or []
        if not isinstance(mirrors, list):
            raise ModelLoadError(f"model_sources.{key}.mirrors: expected a list of hub ids, got {mirrors!r}")
        return ModelSpec(key=key, source=str(entry["id"]), revision=entry.get("revision"),
                         mirrors=tuple(_mirror(key, m) for m in mirrors))
    raise ModelLoadError(
        f"model_sources.{key}: expected a hub id, a directory, or {{id: ..., revision: ...}}, got {entry!r}"
    )


def _reason(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def resolve_snapshot(spec: ModelSpec) -> Snapshot:
    """The local files of ``spec``: a local directory as it is; a hub model through the Hugging Face cache
    (downloaded if needed and allowed; with ``HF_HUB_OFFLINE=1`` only what the cache holds), trying the main id and
    then each mirror in order, each failed attempt logged with its reason. The snapshot folder names the resolved
    commit. When no id works, one :class:`ModelLoadError` names every id tried, why each failed, and what to do."""
    if spec.is_local:
        return Snapshot(spec.source, None, None, spec.source)
    from diffusers import DiffusionPipeline

    failures = []
    for i, (repo_id, revision) in enumerate(spec.candidates()):
        kwargs = dict(use_safetensors=True, safety_checker=None)
        if revision:
            kwargs["revision"] = revision
        try:
            with diffusers_errors_only():
                path = Path(DiffusionPipeline.download(repo_id, **kwargs))
        except Exception as exc:  # noqa: BLE001 - every hub failure is an attempt that failed
            failures.append(f"{repo_id} @ {revision or 'main'} ({_reason(exc)})")
            log.warning("model %s: hub id %s @ %s could not be loaded: %s%s", spec.key, repo_id, revision or "main",
                        _reason(exc), "; trying the next mirror" if i + 1 < len(spec.candidates()) else "")
            continue
        commit = path.name if path.parent.name == "snapshots" else None
        if i:
            log.warning("model %s: loaded from mirror %s @ %s (commit %s) instead of %s", spec.key, repo_id,
                        revision or "main", commit, spec.source)
        return Snapshot(repo_id, revision, commit, str(path), mirror=bool(i))
    tried = "; ".join(failures)
    raise ModelLoadError(
        f"could not load model {spec.key}: tried {len(failures)} hub id(s): {tried}. To fix: check the network, log "
        f"in with `hf auth login` and accept the licence if the model is gated, add a working mirror to "
        f"model_sources.{spec.key}.mirrors, pre-fill the HF cache and set HF_HUB_OFFLINE=1, or set "
        f"model_sources.{spec.key} to a local diffusers directory.")


def compute_dtype(device: str, precision: str = "auto") -> torch.dtype | None:
    """``precision`` as a dtype. ``auto`` is the paper's rule, float32 on the CPU and float16 on CUDA, where the
    family may prefer bfloat16 (FLUX, SD3.5: their activations overflow float16): ``None`` there, decided by
    :func:`load_pipeline` once the family is known."""
    if precision == "auto":
        return torch.float32 if str(device) == "cpu" else None
    if precision in ("float16", "fp16"):
        return torch.float16
    if precision in ("bfloat16", "bf16"):
        return torch.bfloat16
    if precision in ("float32", "fp32"):
        return torch.float32
    raise ValueError(f"precision must be auto, float16, bfloat16 or float32, got {precision!r}")


def load_pipeline(spec: ModelSpec, device: str | None = None, dtype: torch.dtype | None = None,
                  offload: bool = False, free_bytes: int | None = None, snapshot: Snapshot | None = None):
    """Load a Stable Diffusion pipeline as sdhelper 1.0.0 does.

    The weights are loaded as float16 (as the authors did) and then moved to ``device`` in ``dtype``; with
    ``offload`` (CUDA only) each component is moved to the GPU only while it runs (diffusers' model CPU offload; the
    extraction's hooks sit on the backbone's submodules and capture as before). On CUDA the weights must fit the
    device's free memory (``free_bytes``: what it has, default asked from CUDA), else one ``ModelLoadError`` says
    what to do. Any failure (gated, missing, no network, not a diffusers directory) becomes one ``ModelLoadError``.
    A hub model is first resolved to its snapshot in the HF cache (:func:`resolve_snapshot`: the main id, then its
    mirrors), unless ``snapshot`` says where its files are, and is then loaded from that folder.
    """
    quiet_libraries()
    from diffusers import AutoPipelineForText2Image

    device = device or default_device()
    dtype = dtype or compute_dtype(device)  # None: CUDA's automatic choice, by the family below
    if spec.is_local and not (Path(spec.source) / "model_index.json").is_file():
        raise ModelLoadError(
            f"model {spec.describe()}: {spec.source}/model_index.json not found; "
            "point model_sources to a directory written by diffusers' save_pretrained"
        )
    snapshot = snapshot or resolve_snapshot(spec)
    kwargs = dict(dtype=torch.float16, use_safetensors=True, safety_checker=None,
                  requires_safety_checker=False)
    with diffusers_errors_only():
        try:
            pipe = AutoPipelineForText2Image.from_pretrained(snapshot.path, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every loader failure is reported the same way
            raise _load_error(spec, exc) from exc
        try:
            family = registry.family_of(pipe)
        except ModelLoadError as exc:
            raise ModelLoadError(f"model {spec.describe()}: {exc}") from None
        pipe.set_progress_bar_config(disable=True)
        dtype = dtype or family.cuda_dtype(pipe)
        upcast = family.vae_float32(pipe, dtype)
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
            pipe.vae.to(torch.float32)  # e.g. SDXL's VAE overflows in float16; its pipeline (and sdhelper) upcast it
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


def pipeline_family(pipe) -> str:
    """The name of ``pipe``'s family (:func:`diffaudit.families.registry.family_of`); anything else is refused in one
    line."""
    return registry.family_of(pipe).name


def backbone(pipe) -> torch.nn.Module:
    """The denoising network whose layers are extracted (the family's: the U-Net, or the transformer of a DiT)."""
    return registry.family_of(pipe).backbone(pipe)


def download_model(spec: ModelSpec) -> str | None:
    """Put the files :func:`load_pipeline` reads into the Hugging Face cache (``HF_HOME``), for runs on machines
    without internet (cluster compute nodes then run with ``HF_HUB_OFFLINE=1``), through a mirror if the main id
    fails. Returns the snapshot directory, or ``None`` for a local directory (nothing to download)."""
    if spec.is_local:
        return None
    return resolve_snapshot(spec).path


def _load_error(spec: ModelSpec, exc: BaseException) -> ModelLoadError:
    reason = " ".join(str(exc).split())[:300]
    if spec.is_local:
        hint = "check that the directory holds a complete diffusers pipeline (save_pretrained)"
    else:
        hint = (f"the model must be downloadable: check the network, log in with `hf auth login` and accept "
                f"the licence at https://huggingface.co/{spec.source} if it is gated, or pre-fill the HF cache "
                f"and set HF_HUB_OFFLINE=1, or set model_sources.{spec.key} to a local diffusers directory")
    return ModelLoadError(f"could not load model {spec.describe()}: {type(exc).__name__}: {reason}. To fix: {hint}.")


# ---------------------------------------------------------------------------------------------
# The embedded models (built by their families)
# ---------------------------------------------------------------------------------------------

#: Where the workflow builds the embedded models (rule build_mini; `model_sources.<name>` in params.yaml).
EMBEDDED_ROOT = layout.EMBEDDED_ROOT
#: The embedded models (small widths, seeded weights, built offline): name -> family name (the families' registry).
EMBEDDED_MODELS: dict[str, str] = registry.embedded_models()
MINI_DIR = layout.embedded_dir("mini")


def embedded_model(source: str) -> str | None:
    """The embedded model a ``model_sources`` value points to (its build directory), else ``None``."""
    return layout.embedded_name(source, EMBEDDED_MODELS)


def save_embedded_model(name: str, out_dir: str | Path, seed: int = MINI_SEED) -> Path:
    """Build the embedded model ``name`` (a key of :data:`EMBEDDED_MODELS`) and write it to ``out_dir``."""
    return registry.embedded_family(name).save_embedded(name, out_dir, seed=seed)
