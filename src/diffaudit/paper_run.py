"""Is this run the authors' extraction? The guard for everything that uses their hand labels or numbers.

The authors' hand labels (image, x, y of 2x2 high-norm patches) and their published per-layer numbers were made
on one extraction: their model, ``paper`` mode (sdhelper 1.0.0's recipe), seed 42, t=50, batches of 20, the empty
prompt, and their 500 ImageNet images (5 classes x 100, short side >= 350 px, hub-stream order) at 512 px.
On any other extraction the labels point at other images or other noise, and a "relative norm of the labelled
patches" or a "difference to the paper" is meaningless. :func:`differences` lists, one phrase per setting, how
a configuration (and the extraction's recorded device and precision) differs from that run; the
``paper_reference`` rule records the verdict in ``status.json`` and every consumer reads it from there (see
docs/method.md §6).

``paper_reference: force`` in the configuration uses the authors' files anyway (the differences are still
recorded, as a warning).

An experiment (``cfg["experiment"]``: its overrides, :mod:`diffaudit.experiments`) is judged on its effective
extraction: every switch it sets to something other than the authors' choice is a difference.

This module imports only :mod:`diffaudit.experiments` (which imports nothing), so any rule or task may use it.
"""
from __future__ import annotations

from . import experiments

#: The authors' models and the hub ids that hold them (the v1-5 weights moved from runwayml to the
#: stable-diffusion-v1-5 organisation; both are the same files).
PAPER_MODEL_IDS: dict[str, tuple[str, ...]] = {
    "sd15": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5"),
    "sd21": ("stabilityai/stable-diffusion-2-1",),
    "sdturbo": ("stabilityai/sd-turbo",),
}

#: The settings of the authors' extraction, by dotted config key.
PAPER_RUN: dict[str, object] = {
    "extraction.mode": "paper",
    "extraction.seed": 42,
    "extraction.timestep": 50,
    "extraction.batch_size": 20,
    "extraction.prompt": "",
    "dataset.source": "imagenet_subset",
    "dataset.imagenet.source": "hf",
    "dataset.imagenet.classes": [235, 242, 282, 717, 980],
    "dataset.imagenet.per_class": 100,
    "dataset.min_side": 350,
    "dataset.n_images": 500,
    "dataset.size": 512,
}

#: What the authors' extraction did for the switches an experiment can change (besides those in PAPER_RUN).
PAPER_SWITCHES: dict[str, object] = {"padding_mode": "zeros", "noise": "shared", "pixel_range": "unit",
                                     "latent": "sample", "resolution": 512, "weights": "trained"}

#: The config sections the verdict depends on (what the ``paper_reference`` rule declares).
SECTIONS: tuple[str, ...] = ("paper_reference", "extraction", "dataset")

_MISSING = object()


def _get(cfg: dict, key: str):
    value = cfg
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def model_id(entry) -> str | None:
    """The hub id or directory of a ``model_sources`` entry (a string or ``{id, revision}``)."""
    if isinstance(entry, dict):
        return entry.get("id")
    return entry


#: What the authors' extraction ran on, as the stores record it (``device``, ``compute_dtype``): paper-mode noise
#: comes from the device's generator (a CPU draws other numbers for the same seed), in float16.
PAPER_COMPUTE = {"device": "cuda", "compute_dtype": "float16"}


def differences(cfg: dict, model: str, source=None, extraction: dict | None = None) -> list[str]:
    """How this run differs from the authors' extraction of ``model`` (empty: it is that run).

    ``source`` is the model's ``model_sources`` entry (default: looked up in ``cfg``); ``extraction`` the
    provenance a store recorded (its attributes): then the device and precision it really ran with count too.
    """
    if model not in PAPER_MODEL_IDS:
        return [f"model {model!r} is not one of the authors' models ({', '.join(PAPER_MODEL_IDS)})"]
    out = []
    overrides = cfg.get("experiment") or {}
    if overrides and isinstance(cfg.get("extraction"), dict):
        cfg = {**cfg, "extraction": experiments.effective_extraction(cfg["extraction"], overrides)}
    if source is None:
        source = (cfg.get("model_sources") or {}).get(model)
    mid = model_id(source)
    if mid is not None and mid not in PAPER_MODEL_IDS[model]:
        out.append(f"model_sources.{model} is {mid!r} (the authors' run: {PAPER_MODEL_IDS[model][0]!r})")
    for key, want in PAPER_RUN.items():
        got = _get(cfg, key)
        if got is _MISSING:
            continue
        if isinstance(want, list):
            same = list(got or []) == want
        else:
            same = got == want and type(got) is type(want)
        if not same:
            out.append(f"{key} is {got!r} (the authors' run: {want!r})")
    if overrides:
        switches = experiments.resolved(cfg["extraction"])
        for key, want in PAPER_SWITCHES.items():
            got = switches.get(key, want)
            if got != want:
                out.append(f"the experiment sets {key} to {got!r} (the authors' run: {want!r})")
    if extraction is not None:
        device = str(extraction.get("device", "?"))
        if not device.startswith(PAPER_COMPUTE["device"]):
            out.append(f"the extraction ran on {device} (the authors' run: a CUDA GPU, whose generator draws "
                       "the paper-mode noise)")
        dtype = str(extraction.get("compute_dtype", "?"))
        if dtype != PAPER_COMPUTE["compute_dtype"]:
            out.append(f"the extraction computed in {dtype} (the authors' run: {PAPER_COMPUTE['compute_dtype']})")
    return out


def verdict(cfg: dict, model: str, source=None, extraction: dict | None = None) -> dict:
    """``{"applies", "forced", "differences", "reason"}`` for ``model`` under ``cfg`` (see module docstring;
    ``extraction``: the stores' recorded provenance, see :func:`differences`)."""
    diffs = differences(cfg, model, source, extraction)
    known = model in PAPER_MODEL_IDS
    forced = cfg.get("paper_reference") == "force" and known and bool(diffs)
    applies = known and (not diffs or forced)
    if not diffs:
        reason = "this run is the authors' extraction"
    elif forced:
        reason = "paper_reference: force, although " + "; ".join(diffs)
    else:
        reason = "; ".join(diffs)
    return {"model": model, "applies": applies, "forced": forced, "differences": diffs, "reason": reason}
