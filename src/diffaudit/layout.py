"""Where everything goes: every path of a results directory (and of the embedded models and the authors' files),
built and parsed here and nowhere else.

The workflow's rules (workflow/rules/*.smk), :mod:`diffaudit.dvcgen`, the CLI, the explorer and the library all
ask this module; it imports nothing from the package, so anything may import it. A results directory
(``results_dir``) holds::

    dataset/                                   the image set (index.csv, PNGs, dataset.json)
    <model>/                                   a model's baseline run
      representations/                         its extraction: the stores, or one folder per shard
        <variant>.zarr                         variant ``full`` or ``crop<t>`` (t = token size in pixels)
        shard<i>of<n>/<variant>.zarr           with ``extraction.shards`` = n > 1 (i from 1)
      paper_reference/                         the authors' files for this run and status.json
      <table>.csv, anomaly_detector.json       the analyses' tables, credibility.csv, paper_comparison.csv
      <table>_per_image.csv, anomaly_labels.csv  per-image aggregates and label positions (paired comparison)
      experiments.csv                          the runs of the model compared
      experiments/<name>/                      an experiment's run: representations/, paper_reference/, tables
      harm/representations/                    the harm pairs' images extracted with the run's settings
      harm.csv, mitigations.csv                the harm metrics and the mitigated artifact measures (docs/harm.md)
      harm_summary.json                        their means over layers (DVC metrics)
      credibility_validation.csv               the credibility axes against the measured harm (baseline)
    harm_pairs/                                the harm tasks' image pairs (a dataset, pairs.csv, the disparity)
    layer_summary/<model>.csv                  the figure's per-layer quantities (``dvc plots``, cross-model figure)
    experiment_summary/<model>/<run>.csv       one summary per run (``baseline`` or an experiment's name)
    figures/                                   every figure (per-model qualitative views in figures/<model>/)
    logs/                                      one log per job

A run is ``baseline`` or an experiment's name; its *suffix* (the workflow's ``exp`` wildcard) is ``""`` for the
baseline and ``/experiments/<name>`` for an experiment, so its folder is ``<results_dir>/<model><suffix>``.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

#: The run every model has (the configuration without experiment overrides); not allowed as an experiment name.
BASELINE = "baseline"
#: The store variant of the whole images (all layers); the others are ``crop<t>``.
FULL = "full"
CROP_PREFIX = "crop"
STORE_SUFFIX = ".zarr"

DATASET = "dataset"
REPRESENTATIONS = "representations"
PAPER_REFERENCE = "paper_reference"
EXPERIMENTS = "experiments"
FIGURES = "figures"
LOGS = "logs"
LAYER_SUMMARY = "layer_summary"
EXPERIMENT_SUMMARY = "experiment_summary"
#: The table comparing a model's runs, in the model's folder.
EXPERIMENTS_TABLE = "experiments.csv"
#: Where a model's weights came from, per file (rule ``model_files``), in the model's folder.
MODEL_FILES_TABLE = "model_files.csv"
#: The label positions a run's anomaly analysis used (per source), in the run's folder: its experiments' anomaly
#: analyses evaluate them on their own stores (the paired anomaly comparison).
ANOMALY_LABELS = "anomaly_labels.csv"
#: The analyses whose per-image aggregates are kept (``<table>_per_image.csv`` in the run's folder) for the paired
#: bootstrap of the experiments' comparison.
PER_IMAGE_TABLES = ("position_probe", "token_group_similarity", "anomaly_rel_norm")

#: The harm analysis (diffaudit.harm): a run's folder of the pair images' stores, its tables, and the pairs' folder.
HARM = "harm"
HARM_PAIRS = "harm_pairs"
HARM_TABLE = "harm.csv"
MITIGATIONS_TABLE = "mitigations.csv"
HARM_SUMMARY = "harm_summary.json"
CREDIBILITY_VALIDATION_TABLE = "credibility_validation.csv"

#: Where the workflow builds the embedded models (rule build_mini; ``model_sources.<name>`` in params.yaml).
EMBEDDED_ROOT = "resources/models"
#: The weights lock (``diffaudit lock``, :mod:`diffaudit.lock`), at the repository root, committed.
MODELS_LOCK = "models.lock"
#: Downloaded reference files of the authors (sha256-checked; git-ignored).
PAPER_CACHE = Path("resources/paper")


# -- runs ----------------------------------------------------------------------------------------------------------

def run_suffix(run: str) -> str:
    """The folder suffix of a run below its model's folder: ``""`` for the baseline, ``"/experiments/<name>"`` for an
    experiment (the workflow's ``exp`` wildcard)."""
    return "" if run == BASELINE else f"/{EXPERIMENTS}/{run}"


def run_name(suffix: str) -> str:
    """The run of a folder suffix (inverse of :func:`run_suffix`)."""
    return suffix.split("/")[-1] if suffix else BASELINE


def _in(results_dir: str | Path, name: str) -> str:
    """``results_dir/name`` as the rules spell it (no doubled slash)."""
    return f"{str(results_dir).rstrip('/')}/{name}"


def run_dir(results_dir: str | Path, model: str, suffix: str = "") -> str:
    """Where a model's run keeps its stores and tables: the baseline's (``suffix`` ""), or an experiment's."""
    return _in(results_dir, f"{model}{suffix}")


def experiments_dir(model_dir: str | Path) -> Path:
    """The folder of a model's experiment runs."""
    return Path(model_dir) / EXPERIMENTS


def per_image_table(table: str) -> str:
    """The file name of the per-image aggregates of an analysis table (``position_probe`` ->
    ``position_probe_per_image.csv``), next to the table in the run's folder."""
    if table not in PER_IMAGE_TABLES:
        raise ValueError(f"no per-image aggregates for table {table!r}; one of {PER_IMAGE_TABLES}")
    return f"{table}_per_image.csv"


def paper_reference_dir(run_folder: str | Path) -> str:
    """A run's folder of the authors' files (status.json: whether they apply to this run)."""
    return f"{run_folder}/{PAPER_REFERENCE}"


def dataset_dir(results_dir: str | Path) -> str:
    return _in(results_dir, DATASET)


def harm_pairs_dir(results_dir: str | Path) -> str:
    """The harm tasks' image pairs of a results directory (one for every model: they depend on the images only)."""
    return _in(results_dir, HARM_PAIRS)


def harm_dir(run_folder: str | Path) -> str:
    """A run's folder of the harm pairs' extraction."""
    return f"{run_folder}/{HARM}"


def figures_dir(results_dir: str | Path) -> str:
    return _in(results_dir, FIGURES)


def logs_dir(results_dir: str | Path) -> str:
    return _in(results_dir, LOGS)


def layer_summary_dir(results_dir: str | Path) -> str:
    """The folder of the per-model layer summaries (``<model>.csv``)."""
    return _in(results_dir, LAYER_SUMMARY)


def experiment_summary_dir(results_dir: str | Path) -> str:
    """The folder of the run summaries (``<model>/<run>.csv``)."""
    return _in(results_dir, EXPERIMENT_SUMMARY)


def run_summary_path(results_dir: str | Path, model: str, run: str) -> str:
    """The summary of one run (``experiment_summary/<model>/<run>.csv``)."""
    return f"{experiment_summary_dir(results_dir)}/{model}/{run}.csv"


#: Folders of a results directory that hold no store or table (figures, logs, tool state).
NON_RESULT_DIRS = frozenset({LOGS, FIGURES})


# -- representation stores ---------------------------------------------------------------------------------------

#: Rule params that name the job's part of the work (its shard), not the configuration (dvcgen and the tasks skip them).
JOB_PARAMS = ("shard",)


def representation_parts(n_shards: int) -> list[str]:
    """A model's representation directories, relative to its run folder: ``representations``, or with
    ``extraction.shards`` = n > 1 one directory per shard inside it (``representations/shard1ofn``, ...), so
    that the whole extraction of a model is one folder (one DVC output) either way."""
    if n_shards == 1:
        return [REPRESENTATIONS]
    return [f"{REPRESENTATIONS}/{shard_name(i, n_shards)}" for i in range(n_shards)]


def part_pattern() -> str:
    """A regular expression of the representation directory names :func:`representation_parts` gives."""
    return f"{REPRESENTATIONS}(/shard[0-9]+of[0-9]+)?"


def run_suffix_pattern(experiments: Iterable[str]) -> str:
    """A regular expression of the run suffixes of the baseline and ``experiments`` (names as given)."""
    import re

    names = list(experiments)
    return f"(/{EXPERIMENTS}/(" + "|".join(map(re.escape, names)) + "))?" if names else "(?:)"


def shard_name(index: int, n_shards: int) -> str:
    """The folder of 0-based shard ``index`` of ``n_shards``: ``shard<index + 1>of<n_shards>``."""
    return f"shard{index + 1}of{n_shards}"


def shard_index(part: str) -> int | None:
    """0-based shard of a representation directory name (``representations/shard2of3`` -> 1), None unsharded."""
    return None if part == REPRESENTATIONS else int(part.split("shard")[1].split("of")[0]) - 1


def _shard_order(path: Path) -> int:
    number = path.name[len("shard"):].split("of")[0]
    return int(number) if number.isdigit() else 0


def crop_variant(token_size: int) -> str:
    """The store variant of the images cropped by one ring of ``token_size``-pixel tokens."""
    return f"{CROP_PREFIX}{token_size}"


def crop_token_size(variant: str) -> int | None:
    """The token size of a ``crop<t>`` variant, None for any other variant."""
    return int(variant[len(CROP_PREFIX):]) if variant.startswith(CROP_PREFIX) else None


def store_path(rep_dir: str | Path, variant: str) -> Path:
    """The store of ``variant`` in one representation directory."""
    return Path(rep_dir) / f"{variant}{STORE_SUFFIX}"


def list_variants(rep_dir: str | Path) -> list[str]:
    """The variants stored in one representation directory, sorted."""
    return sorted(p.name[:-len(STORE_SUFFIX)] for p in Path(rep_dir).glob(f"*{STORE_SUFFIX}"))


def stored_rep_dirs(rep: str | Path) -> list[Path] | None:
    """The representation directories of one run's ``representations`` folder that hold a ``full`` store (the
    folder itself, or its shard folders in order), None if none."""
    rep = Path(rep)
    if store_path(rep, FULL).is_dir():
        return [rep]
    shards = sorted(rep.glob("shard*of*"), key=_shard_order)
    shards = [s for s in shards if store_path(s, FULL).is_dir()]
    return shards or None


def stored_runs(model_dir: str | Path) -> dict[str, tuple[list[Path], Path]]:
    """The runs of one model folder that hold stores: run name -> (representation directories, run folder); the
    baseline first, then the experiments by name."""
    model_dir = Path(model_dir)
    out: dict[str, tuple[list[Path], Path]] = {}
    dirs = stored_rep_dirs(model_dir / REPRESENTATIONS)
    if not dirs:
        return out
    out[BASELINE] = (dirs, model_dir)
    exp_root = experiments_dir(model_dir)
    if exp_root.is_dir():
        for e in sorted(p for p in exp_root.iterdir() if p.is_dir()):
            d = stored_rep_dirs(e / REPRESENTATIONS)
            if d:
                out[e.name] = (d, e)
    return out


# -- embedded models -----------------------------------------------------------------------------------------------

def embedded_dir(name: str) -> str:
    """Where the embedded model ``name`` is built."""
    return f"{EMBEDDED_ROOT}/{name}"


def embedded_name(source: str, names: Iterable[str]) -> str | None:
    """The embedded model (of ``names``) whose build directory a ``model_sources`` value is, else None."""
    import os

    norm = os.path.normpath(str(source))
    for name in names:
        if norm == embedded_dir(name):
            return name
    return None
