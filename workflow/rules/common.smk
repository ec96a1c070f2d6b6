# Shared definitions: config validation, model resolution, output paths.
from pathlib import Path

from diffaudit.config import ConfigError, validate
from diffaudit.models import ModelLoadError, resolve_model

try:
    validate(config)
    for _m in config["models"]:
        resolve_model(_m, config["model_sources"])
except (ConfigError, ModelLoadError) as _e:
    raise WorkflowError(f"invalid configuration: {_e}")

RESULTS = config["results_dir"].rstrip("/")
MODELS = list(config["models"])
MINI_DIR = "resources/models/mini"
DATASET_DIR = f"{RESULTS}/dataset"
REPR_DIR = f"{RESULTS}/{{model}}/representations"

wildcard_constraints:
    model="|".join(map(str, MODELS)),


def model_inputs(wildcards):
    """The locally built model directory, when the model is the embedded one."""
    spec = resolve_model(wildcards.model, config["model_sources"])
    return [MINI_DIR] if os.path.normpath(spec.source) == MINI_DIR else []
