"""Extraction settings and their validation (:class:`ExtractionSettings`), and how the stores describe them in words
(:func:`describe_switches`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .. import experiments

MODES = ("paper", "corrected")
NONFINITE = ("stop", "count")
#: Settings that do not enter the stores' config (and so not their fingerprint).
NOT_RECORDED = ("nonfinite",)


@dataclass(frozen=True)
class ExtractionSettings:
    mode: str = "paper"
    timestep: int = 50
    seed: int = 42
    batch_size: int = 20
    prompt: str = ""
    precision: str = "auto"  # auto = fp16 on CUDA, fp32 on CPU (the paper's rule)
    store_dtype: str = "float16"
    crops: bool = True
    # Experiment switches (diffaudit.experiments); None = what the mode does (and no entry in the stores' config).
    padding_mode: str | None = None
    padding_scope: str | None = None
    noise: str | None = None
    pixel_range: str | None = None
    latent: str | None = None
    resolution: int | None = None
    weights: str | None = None
    # Diffusion transformers, corrected mode: the flow-matching noise level (None: as noisy as ``timestep``).
    sigma: float | None = None
    # What a map with an inf or NaN does: ``stop`` the run (naming model, layer and image) or ``count`` it into the
    # store's layer attributes. Not part of the stores' config (a run that completes writes the same maps either way).
    nonfinite: str = "stop"

    @property
    def switches(self) -> dict:
        """Every experiment switch with its value, the mode's defaults filled in."""
        return experiments.resolved({k: v for k, v in asdict(self).items() if v is not None})

    def config(self) -> dict:
        """The settings as the stores record them (unset switches left out, so a baseline's config is what it was
        before experiments existed)."""
        return {k: v for k, v in asdict(self).items() if v is not None and k not in NOT_RECORDED}

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"extraction mode must be one of {MODES}, got {self.mode!r}")
        for key, value in asdict(self).items():
            allowed = experiments.CAUSES.get(key)
            if value is not None and isinstance(allowed, tuple) and value not in allowed:
                raise ValueError(f"extraction {key} must be one of {allowed}, got {value!r}")
        if not 0 <= int(self.timestep) <= 999:
            raise ValueError(f"timestep must be in [0, 999], got {self.timestep}")
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.sigma is not None and not 0 < float(self.sigma) <= 1:
            raise ValueError(f"sigma must be in (0, 1], got {self.sigma}")
        if self.nonfinite not in NONFINITE:
            raise ValueError(f"extraction nonfinite must be one of {NONFINITE}, got {self.nonfinite!r}")
        problem = experiments.padding_scope_problem(self.config())
        if problem:
            raise ValueError(f"extraction padding_scope {problem}")



def describe_switches(settings: ExtractionSettings, switches: dict | None = None,
                      scales_model_input: bool = True) -> dict:
    """What the extraction did, in words, for the stores' attributes (the switches an experiment set are in the
    config as well). ``switches``: what the extractor used, where the family changes a mode default;
    ``scales_model_input``: whether the family's paper mode applies the scheduler's input scaling (a U-Net's does; a
    flow-matching transformer's does not)."""
    sw, paper = switches or settings.switches, settings.mode == "paper"
    out = {"pixel_range": "[0, 1] (x/255)" if sw["pixel_range"] == "unit" else "[-1, 1]",
           "latent": "VAE posterior sample" if sw["latent"] == "sample" else "VAE posterior mean",
           "noise": ("one tensor shared by a batch, torch.manual_seed(seed) per batch" if paper and sw["noise"] == "shared"
                     else "one tensor shared by every image, CPU generator seeded by seed" if sw["noise"] == "shared"
                     else "independent per image, CPU generator seeded by seed*1000003+image_index"
                     + ("; posterior sample likewise, seed*1000003+image_index+2**31" if sw["latent"] == "sample"
                        else "")),
           "scale_model_input": paper and scales_model_input}
    if settings.padding_mode is not None:
        out["padding_mode"] = sw["padding_mode"]
    if settings.padding_scope is not None:
        out["padding_scope"] = {"denoiser": "the backbone's convolutions",
                                "vae": "the VAE encoder's convolutions and downsampler pads",
                                "both": "the backbone's and the VAE encoder's convolutions and downsampler pads",
                                }[sw["padding_scope"]]
    if settings.nonfinite == "count":
        out["nonfinite"] = "counted per layer (layer attribute nonfinite), not stopped"
    if sw["weights"] == "random":
        out["weights_seed"] = experiments.RANDOM_WEIGHTS_SEED
    return out


