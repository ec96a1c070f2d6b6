# Shared definitions: config validation, model resolution, output paths.
from pathlib import Path

from diffaudit.config import validate
from diffaudit.errors import DiffauditError
from diffaudit.models import resolve_model
from diffaudit.store import shard_ranges

try:
    validate(config)
    for _m in config["models"]:
        resolve_model(_m, config["model_sources"])
    N_SHARDS = config["extraction"]["shards"]
    shard_ranges(config["dataset"]["n_images"], config["extraction"]["batch_size"], N_SHARDS)
except (DiffauditError, ValueError) as _e:
    raise WorkflowError(f"invalid configuration: {_e}")

RESULTS = config["results_dir"].rstrip("/")
MODELS = list(config["models"])
MINI_DIR = "resources/models/mini"
DATASET_DIR = f"{RESULTS}/dataset"
# Representation directories of a model: one, or one per shard (batch-aligned image ranges, separate jobs).
REPR_DIR = f"{RESULTS}/{{model}}/{{part}}"
REPR_PARTS = (["representations"] if N_SHARDS == 1
              else [f"representations_shard{i + 1}of{N_SHARDS}" for i in range(N_SHARDS)])

wildcard_constraints:
    model="|".join(map(str, MODELS)),
    part="representations(_shard[0-9]+of[0-9]+)?",


def repr_dirs(wildcards):
    """All representation directories of the model; the analyses read their shards as one dataset."""
    return [f"{RESULTS}/{wildcards.model}/{part}" for part in REPR_PARTS]


def shard_index(part):
    """0-based shard of a representation directory name, or None when unsharded."""
    return None if part == "representations" else int(part.split("shard")[1].split("of")[0]) - 1


def model_inputs(wildcards):
    """The locally built model directory, when the model is the embedded one."""
    spec = resolve_model(wildcards.model, config["model_sources"])
    return [MINI_DIR] if os.path.normpath(spec.source) == MINI_DIR else []
