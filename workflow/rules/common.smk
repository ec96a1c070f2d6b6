# Shared definitions: config validation, model resolution, output paths (built by diffaudit.layout, the one home of
# the results layout), input functions, and `declare`, which gives a task the config values it reads as params (the
# task sees nothing else; see diffaudit.pipeline.common.task_config).
import re
from pathlib import Path

from diffaudit import layout
from diffaudit.config import validate
from diffaudit.errors import DiffauditError
from diffaudit.models import EMBEDDED_MODELS, embedded_model, resolve_model
from diffaudit.store import shard_ranges

try:
    validate(config)
    config.setdefault("experiments", {})  # no key = none (the outputs are the same)
    for _m in config["models"]:
        resolve_model(_m, config["model_sources"])
        if _m not in config["model_sources"]:  # DVC's stages track each model's registry entry
            raise DiffauditError(f"models: {_m!r} is not a key of model_sources; register it there "
                                 "(as a hub id with a revision, or a local diffusers directory)")
    N_SHARDS = config["extraction"]["shards"]
    shard_ranges(config["dataset"]["n_images"], config["extraction"]["batch_size"], N_SHARDS)
except (DiffauditError, ValueError) as _e:
    raise WorkflowError(f"invalid configuration: {_e}")

RESULTS = config["results_dir"].rstrip("/")
MODELS = list(config["models"])
# Experiments (diffaudit.experiments): each model's baseline lives in {RESULTS}/{model}, an experiment's run in
# {RESULTS}/{model}/experiments/{name}; the per-run rules match both with the wildcard `exp` ("" for the
# baseline, the slash-prefixed experiments/{name} for an experiment).
EXPERIMENTS = list(config.get("experiments") or {})
RUNS = [layout.BASELINE] + EXPERIMENTS
DATASET_DIR = layout.dataset_dir(RESULTS)
# A model's extraction is one folder: the stores, or one sub-folder per shard (batch-aligned image ranges,
# separate jobs), read back by the analyses as one dataset.
REPR_DIR = f"{layout.run_dir(RESULTS, '{model}', '{exp}')}/{{part}}"
REPR_PARTS = layout.representation_parts(N_SHARDS)
# The authors' files for a model (sha256-checked) and status.json: whether they apply to this run.
PAPER_REF_DIR = layout.paper_reference_dir(layout.run_dir(RESULTS, "{model}", "{exp}"))
LOGS = layout.logs_dir(RESULTS)
EMBEDDED_PATTERN = "|".join(map(re.escape, EMBEDDED_MODELS))


def _gpu_jobs_get_cuda(device):
    """Whether the jobs that can use a GPU (extract, position_probe) will run on a CUDA device of this machine: never
    with `extraction.device: cpu`, always with `cuda`/`cuda:N`, with `auto` when torch sees one. (Snakemake cannot
    tell here whether jobs will run elsewhere: profiles/slurm asks for their GPUs itself, with `gpu: 1`.)"""
    if device == "cpu":
        return False
    if device != "auto":
        return True
    from diffaudit.devices import default_device

    return default_device() != "cpu"


# The `gpu` resource of those jobs, decided once: 1 when they will use a CUDA device (profiles/default then runs one
# of them at a time), else 0 (on the CPU they run side by side like every other job, within --cores).
GPU_JOB = 1 if _gpu_jobs_get_cuda(config["extraction"]["device"]) else 0

wildcard_constraints:
    model="|".join(map(str, MODELS)),
    exp=layout.run_suffix_pattern(EXPERIMENTS),
    run="|".join(map(re.escape, RUNS)),
    part=layout.part_pattern(),


def declare(*keys):
    """The config values at ``keys`` (dotted, e.g. "extraction.device") as a rule's params, one per key, named
    with "__" for "." (Snakemake re-runs a job when one changes; DVC's stages list the same keys)."""
    out = {}
    for key in keys:
        value = config
        for part in key.split("."):
            value = value[part]
        out[key.replace(".", "__")] = value
    return out


def model_source(wildcards):
    """The model's registry entry (params model_source, in DVC model_sources.<model>)."""
    return config["model_sources"][wildcards.model]


def experiment_overrides(wildcards):
    """The experiment's overrides of the extraction (params `experiment`, in DVC experiments.<name>; without the
    keys that only add outputs, such as `harm`); {} for the baseline."""
    from diffaudit.experiments import extraction_overrides

    exp = wildcards.get("exp", "")
    return extraction_overrides(config["experiments"][exp.split("/")[-1]]) if exp else {}


def run_dir(model, exp=""):
    """Where a model's run keeps its stores and tables: the baseline's, or an experiment's (``exp``: the run's
    suffix, see diffaudit.layout.run_suffix)."""
    return layout.run_dir(RESULTS, model, exp)


def repr_dirs(wildcards):
    """All representation directories of the run; the analyses read their shards as one dataset."""
    return [f"{run_dir(wildcards.model, wildcards.get('exp', ''))}/{part}" for part in REPR_PARTS]


def paper_ref_dir(wildcards):
    """The run's paper_reference folder (status.json: whether the authors' files apply to this run)."""
    return layout.paper_reference_dir(run_dir(wildcards.model, wildcards.get("exp", "")))


shard_index = layout.shard_index  # 0-based shard of a representation directory name, or None when unsharded


def model_inputs(wildcards):
    """The locally built model directory, when the model is an embedded one."""
    name = embedded_model(resolve_model(wildcards.model, config["model_sources"]).source)
    return [layout.embedded_dir(name)] if name else []


def label_files(wildcards):
    """User label files (a change re-runs the analysis); the authors' labels come from paper_reference."""
    from diffaudit.label_sources import user_label_files

    return user_label_files(config["anomalies"])


# The run summaries (rules in experiments.smk): one per run, in one folder per model (DVC tracks the folder;
# diffaudit.layout.run_summary_path).
RUN_TABLES = {"probe": "position_probe_summary.csv", "similarity": "token_group_similarity.csv",
              "anomalies": "anomaly_rel_norm.csv"}


def run_tables(wildcards):
    """The tables a run's summary reads (the baseline's, or an experiment's), its per-image aggregates and, for an
    experiment, the baseline's per-image aggregates (the paired differences)."""
    folder = run_dir(wildcards.model, layout.run_suffix(wildcards.run))
    out = {key: f"{folder}/{table}" for key, table in RUN_TABLES.items()}
    out["per_image"] = [f"{folder}/{layout.per_image_table(t)}" for t in layout.PER_IMAGE_TABLES]
    if wildcards.run != layout.BASELINE:
        out["base_per_image"] = [f"{run_dir(wildcards.model)}/{layout.per_image_table(t)}"
                                 for t in layout.PER_IMAGE_TABLES]
    return out


def baseline_anomaly_labels(wildcards):
    """An experiment's anomaly analysis reads the baseline's label positions (none for the baseline)."""
    return [f"{run_dir(wildcards.model)}/{layout.ANOMALY_LABELS}"] if wildcards.get("exp", "") else []


def harm_runs():
    """The runs (suffixes) whose harm tables the workflow writes: the baseline (its tables are empty, and the logs
    say why, when harm.enabled is false; so Snakemake's jobs and DVC's stages agree), and every experiment that says
    `harm: true`."""
    return [""] + [layout.run_suffix(name) for name, ov in config["experiments"].items() if ov.get("harm")]


def baseline_first(wildcards):
    """A job's scheduling priority: the baseline's extraction and anomaly analysis before any experiment's (the
    longest chain of the workflow, to the harm analysis, hangs off them; on 2 cores this keeps the demo's extractions
    side by side instead of the baseline's last)."""
    return 20 if not wildcards.get("exp", "") else 0
