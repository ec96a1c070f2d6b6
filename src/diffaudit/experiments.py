"""Experiments: named variants of the extraction, each changing one candidate cause of the artifacts.

``experiments:`` in params.yaml maps a name to overrides of the baseline (the ``extraction`` section). Each key
switches one thing (docs/experiments.md):

``padding_mode``  zeros | reflect | replicate | circular: the padding of every ``Conv2d`` of the U-Net
``padding_scope`` denoiser (default) | vae | both: where ``padding_mode`` acts (the VAE: its encoder's convolutions
                  and its downsamplers' zero pad); needs a ``padding_mode`` other than zeros
``noise``         shared (one noise tensor for every image) | independent (one per image, seeded by its index)
``timestep``      the DDPM timestep the latents are noised to (0..999)
``seed``          the noise seed
``pixel_range``   unit ([0, 1], the paper's) | symmetric ([-1, 1], what the VAE was trained on)
``latent``        sample (a draw from the VAE posterior, the paper's) | mean
``resolution``    the images are resized to this many pixels (a multiple of 64) before the VAE
``prompt``        a text; ``{class}`` is replaced by each image's class name
``weights``       trained | random: the same U-Net architecture re-initialised from :data:`RANDOM_WEIGHTS_SEED`

and two keys that only narrow the run (scope, not a cause): ``layers`` (a list of layer names, or ``paper``) and
``crops`` (the cropped variants for the corner/border control), and one that only adds outputs: ``harm: true``
(the run's harm tables, docs/harm.md). An experiment's effective extraction is the
baseline's with these applied (:func:`effective_extraction`); keys the mode decides (``noise``, ``pixel_range``,
``latent``) default to what the mode does, so the baseline itself needs none of them.

This module imports nothing from the package but :mod:`diffaudit.layout` (where a run's outputs are:
:func:`~diffaudit.layout.run_suffix`), so every rule and task may use it.
"""
from __future__ import annotations

import re

from .layout import BASELINE

#: Keys that change a cause, with their allowed values (a tuple) or type.
CAUSES: dict[str, object] = {
    "padding_mode": ("zeros", "reflect", "replicate", "circular"),
    "padding_scope": ("denoiser", "vae", "both"),
    "noise": ("shared", "independent"),
    "timestep": int,
    "seed": int,
    "pixel_range": ("unit", "symmetric"),
    "latent": ("sample", "mean"),
    "resolution": int,
    "prompt": str,
    "weights": ("trained", "random"),
}
#: Keys that narrow the run.
SCOPE: dict[str, object] = {"layers": (str, list), "crops": bool}
#: Keys that add outputs without changing the extraction: ``harm: true`` also measures the harm of the run
#: (docs/harm.md).
OUTPUTS: dict[str, object] = {"harm": bool}
KEYS = {**CAUSES, **SCOPE, **OUTPUTS}

#: What each extraction mode does for the keys a mode decides.
MODE_DEFAULTS: dict[str, dict[str, str]] = {
    "paper": {"noise": "shared", "pixel_range": "unit", "latent": "sample"},
    "corrected": {"noise": "independent", "pixel_range": "symmetric", "latent": "mean"},
}
#: What every extraction does unless an experiment says otherwise.
DEFAULTS: dict[str, object] = {"padding_mode": "zeros", "padding_scope": "denoiser", "weights": "trained"}

#: Seed of the re-initialised U-Net of ``weights: random`` (recorded in the stores as ``weights_seed``).
RANDOM_WEIGHTS_SEED = 0
#: Resolutions must be whole multiples of this (VAE factor 8 x three U-Net downsamplings).
RESOLUTION_MULTIPLE = 64
#: An experiment name: also a folder and part of DVC stage names.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
RESERVED = (BASELINE,)
#: The placeholder of ``prompt`` that names each image's class.
CLASS_PLACEHOLDER = "{class}"


class ExperimentError(ValueError):
    """An experiment's configuration is invalid; the message names the key (one line)."""


def _check_value(name: str, key: str, value) -> None:
    where = f"experiments.{name}.{key}"
    rule = KEYS[key]
    if isinstance(rule, tuple) and all(isinstance(r, str) for r in rule):
        if value not in rule:
            raise ExperimentError(f"{where}: {value!r} is not one of {', '.join(rule)}")
        return
    if rule is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ExperimentError(f"{where}: expected an integer, got {value!r}")
        if key == "timestep" and not 0 <= value <= 999:
            raise ExperimentError(f"{where}: {value} is outside 0..999")
        if key == "seed" and value < 0:
            raise ExperimentError(f"{where}: a seed must be >= 0, got {value}")
        if key == "resolution" and (value <= 0 or value % RESOLUTION_MULTIPLE):
            raise ExperimentError(f"{where}: {value} is not a positive multiple of {RESOLUTION_MULTIPLE} pixels")
        return
    if rule is str:
        if not isinstance(value, str):
            raise ExperimentError(f"{where}: expected a text, got {value!r}")
        if "{" in value.replace(CLASS_PLACEHOLDER, ""):
            raise ExperimentError(f"{where}: the only placeholder is {CLASS_PLACEHOLDER}, got {value!r}")
        return
    if rule is bool:
        if not isinstance(value, bool):
            raise ExperimentError(f"{where}: expected true or false, got {value!r}")
        return
    # layers: "paper" or a list of names
    if not (value == "paper" or (isinstance(value, list) and value and all(isinstance(v, str) for v in value))):
        raise ExperimentError(f"{where}: expected `paper` or a non-empty list of layer names, got {value!r}")


def validate(experiments: dict | None) -> dict:
    """Check every experiment's name, keys and values; the first problem is one line naming the key."""
    experiments = experiments or {}
    if not isinstance(experiments, dict):
        raise ExperimentError(f"experiments: expected a mapping of names to overrides, got {experiments!r}")
    for name, overrides in experiments.items():
        if not isinstance(name, str) or not NAME.match(name):
            raise ExperimentError(f"experiments.{name}: a name is letters, digits, '_' and '-', starting with a "
                                  "letter or digit")
        if name in RESERVED:
            raise ExperimentError(f"experiments.{name}: {name!r} is reserved for the run without overrides")
        if not isinstance(overrides, dict) or not overrides:
            raise ExperimentError(f"experiments.{name}: expected a non-empty mapping of overrides, got {overrides!r}")
        for key, value in overrides.items():
            if key not in KEYS:
                raise ExperimentError(f"experiments.{name}.{key}: unknown key (one of {', '.join(KEYS)})")
            _check_value(name, key, value)
        problem = padding_scope_problem(overrides)
        if problem:
            raise ExperimentError(f"experiments.{name}.padding_scope: {problem}")
    return experiments


def padding_scope_problem(switches: dict) -> str | None:
    """Why ``padding_scope`` cannot apply to ``switches`` (set without a ``padding_mode`` other than zeros: there
    would be nothing to change), or ``None``."""
    if switches.get("padding_scope") is None or switches.get("padding_mode", "zeros") != "zeros":
        return None
    return (f"{switches['padding_scope']!r} needs a padding_mode (reflect, replicate or circular); with zero padding "
            "there is nothing to change")


def effective_extraction(extraction: dict, overrides: dict | None) -> dict:
    """The ``extraction`` section of an experiment: the baseline's with the cause keys applied. Keys the mode
    decides stay absent unless overridden (the baseline's stores and fingerprints do not change)."""
    out = dict(extraction)
    for key, value in (overrides or {}).items():
        if key == "crops":
            out["crops"] = value
        elif key in CAUSES:
            out[key] = value
    return out


def resolved(extraction: dict) -> dict:
    """Every cause key of an (effective) extraction section with its value, the mode's defaults filled in."""
    out = {**DEFAULTS, **MODE_DEFAULTS[extraction["mode"]]}
    out.update({k: extraction[k] for k in CAUSES if k in extraction})
    return out


def extraction_overrides(overrides: dict | None) -> dict:
    """An experiment's overrides without the keys that only add outputs (:data:`OUTPUTS`): what its extraction
    depends on."""
    return {k: v for k, v in (overrides or {}).items() if k not in OUTPUTS}


def layers_of(layers, overrides: dict | None):
    """The experiment's layer list (``layers`` override, or the run's)."""
    return (overrides or {}).get("layers", layers)


def class_prompt(template: str, label_name: str) -> str:
    """``prompt`` with ``{class}`` replaced by the image's class name (file suffixes and underscores dropped)."""
    name = str(label_name)
    for suffix in (".png", ".jpg", ".jpeg"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return template.replace(CLASS_PLACEHOLDER, name.replace("_", " "))


def baseline_noise(extraction: dict) -> str:
    """The noise of the baseline run (``shared`` or ``independent``): what its mode does, unless it says otherwise."""
    return str(resolved(extraction)["noise"])


def independent_noise_experiment(experiments: dict | None) -> str | None:
    """The first experiment (configuration order) whose only cause is ``noise: independent`` (scope keys allowed):
    the run that tells the position probe's result apart from the shared noise tensor (docs/credibility.md);
    None if there is none."""
    for name, overrides in (experiments or {}).items():
        if {k: v for k, v in (overrides or {}).items() if k in CAUSES} == {"noise": "independent"}:
            return name
    return None
