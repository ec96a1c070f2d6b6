"""``dvc.yaml``: one templated stage per Snakemake rule, written from :data:`STAGES`, and what checks it.

The file uses DVC's own templating: values from ``params.yaml`` (``${results_dir}``) and, for the rules that run
per model, ``foreach: ${models}`` (stage ``position_probe@sd15``, ...). So changing ``models``, ``results_dir`` or
``extraction.shards`` in params.yaml (by hand or with ``dvc exp run -S``) needs no new dvc.yaml; only a change of
the rules or of the package's imports does:

    diffaudit dvc-yaml > dvc.yaml

Each stage runs exactly its rule through Snakemake (``--allowed-rules``; ``--nolock``, as DVC's own lock covers
the run); its deps are the rule's inputs, the rule file, the task script and the package modules that the rule's
task reaches (static import analysis); its params are the config keys the rule declares; its outs the rule's
outputs (figures as image plots, JSON summaries as metrics). ``tests/test_dvc.py`` fails when the committed file
differs from :func:`render`, and when the stages that DVC resolves for a configuration differ from the jobs of
the Snakemake DAG (outputs, inputs, params, code).
"""
from __future__ import annotations

import ast
from pathlib import Path

import yaml

from .pipeline.common import TABLES as MODEL_TABLES

PACKAGE = Path(__file__).resolve().parent
HEADER = ("# Written by `diffaudit dvc-yaml > dvc.yaml` from the workflow's rules (see diffaudit.dvcgen); do not edit.\n"
          "# ${...} are values from params.yaml, so changing models, results_dir or extraction.shards there needs\n"
          "# no new file. Each stage runs one Snakemake rule; see README.md (Reproducing with DVC).\n")
FIGURE_SUFFIXES = (".png", ".svg")


def snakemake_jobs(configfiles=("params.yaml",), snakefile="Snakefile") -> list[dict]:
    """The jobs of the full DAG (as if nothing existed yet) for the given config files."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import (ConfigSettings, DAGSettings, OutputSettings, ResourceSettings,
                                          StorageSettings)

    with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
        wf = api.workflow(resource_settings=ResourceSettings(cores=1),
                          config_settings=ConfigSettings(configfiles=[Path(c) for c in configfiles]),
                          storage_settings=StorageSettings(), snakefile=Path(snakefile))
        dag_api = wf.dag(dag_settings=DAGSettings(forceall=True))
        workflow = dag_api.workflow_api._workflow  # the DAG itself has no public accessor
        workflow.dag_settings = dag_api.dag_settings
        workflow._prepare_dag(forceall=True, ignore_incomplete=True, lock_warn_only=True)
        workflow._build_dag()
        jobs = []
        for job in workflow.dag.jobs:
            rule = job.rule
            if rule.name == "all":
                continue
            rule_file = Path(rule.snakefile).resolve()
            script = (rule_file.parent / rule.script).resolve() if rule.script else None
            jobs.append({"rule": rule.name, "wildcards": dict(job.wildcards_dict),
                         "inputs": [str(i) for i in job.input], "outputs": [str(o) for o in job.output],
                         "params": list(rule.params._names), "rule_file": rule_file, "script": script})
    return sorted(jobs, key=lambda j: (j["rule"], sorted(j["wildcards"].items())))


# ---------------------------------------------------------------------------------------------
# Which package modules a rule's script reaches (static, from the source)
# ---------------------------------------------------------------------------------------------

def _module_file(name: str) -> Path | None:
    rel = name.split(".")[1:]
    base = PACKAGE.joinpath(*rel) if rel else PACKAGE
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(tree: ast.AST, module: str) -> set[str]:
    """``diffaudit`` modules imported anywhere in ``tree`` (module or function level)."""
    pkg = module.rsplit(".", 1)[0]  # a package's __init__ (``a.b.__init__``) and its modules (``a.b.c``): ``a.b``
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "diffaudit":
                continue
            for alias in node.names:  # `from . import reference` imports a module
                sub = f"{base}.{alias.name}"
                out.add(sub if _module_file(sub) else base)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "diffaudit"}
    return {m for m in out if _module_file(m)}


def _closure(start: set[str]) -> set[str]:
    """``start`` and every package module they import (at module or function level), transitively."""
    seen: set[str] = set()
    todo = list(start)
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        path = _module_file(mod)
        name = mod if path.name != "__init__.py" else mod + ".__init__"
        todo += _imports(ast.parse(path.read_text()), name) - seen
        parts = mod.split(".")  # importing a.b.c runs the __init__ of a and a.b first
        todo += [p for p in (".".join(parts[:k]) for k in range(1, len(parts))) if p not in seen]
    return seen


TASK_SCRIPT = "task.py"  # workflow/scripts/task.py runs diffaudit.pipeline.<rule>


def task_module(rule: str) -> str:
    """The module that does the work of ``rule`` (by convention named after it)."""
    name = f"diffaudit.pipeline.{rule}"
    if _module_file(name) is None:
        raise FileNotFoundError(f"rule {rule!r} runs {TASK_SCRIPT} but has no task module "
                                f"src/diffaudit/pipeline/{rule}.py")
    return name


def code_deps(script: Path, rule: str) -> list[str]:
    """Package source files (relative to the repository) that the rule's script can execute: the script's own
    imports and, for the shared task script, the rule's task module, each with everything it imports."""
    direct = _imports(ast.parse(script.read_text()), "workflow_script")
    if script.name == TASK_SCRIPT:
        direct.add(task_module(rule))
    files = {_module_file(m) for m in _closure(direct)}
    # package data the code reads
    files |= {PACKAGE / "params.schema.json"} if PACKAGE / "config.py" in files else set()
    root = PACKAGE.parent.parent
    return sorted(str(f.relative_to(root)) for f in files if f is not None)


# ---------------------------------------------------------------------------------------------
# dvc.yaml
# ---------------------------------------------------------------------------------------------

R, M = "${results_dir}", "${item}"
FIG = f"{R}/figures"
TABLES = [f"{R}/{M}/{t}.csv" for t in MODEL_TABLES]
REPR = f"{R}/{M}/representations"
PAPER_REF = f"{R}/{M}/paper_reference"
SUMMARY_DIR = f"{R}/experiment_summary"
RUN_TABLES = ("position_probe_summary", "token_group_similarity", "anomaly_rel_norm")
QUALITATIVE = [f"{FIG}/{M}/qualitative_{v}.{e}" for v in ("token_similarity", "corner", "norms", "pca")
               for e in ("png", "svg")]
# The extraction stage also builds the embedded model when the model is `mini` (a Snakemake intermediate,
# deterministic from `mini.seed`): its rule is allowed there, and its code and params are the stage's too.
EXTRA_RULES = {"extract": ["build_mini"]}

#: rule -> (per model, input paths, config keys, outputs). Config keys as the rule declares them ("model_source"
#: = the model's registry entry); outputs as Snakemake writes them (for `extract`: the folder that holds every
#: shard; its command runs every shard job of the model, see `diffaudit dvc-extract`).
STAGES: dict[str, tuple[bool, list[str], list[str], list[str]]] = {
    "dataset": (False, [], ["dataset"], [f"{R}/dataset"]),
    "extract": (True, [f"{R}/dataset"], ["layers", "extraction", "dataset", "mini", "model_source", "experiment"],
                [REPR]),
    "paper_reference": (True, [REPR], ["paper_reference", "extraction", "dataset", "model_source", "experiment"],
                        [PAPER_REF]),
    "position_probe": (True, [REPR], ["probe", "bootstrap", "extraction.device", "dataset.source",
                                      "dataset.imagenet.classes"],
                       [f"{R}/{M}/position_probe.csv", f"{R}/{M}/position_probe_summary.csv"]),
    "token_group_similarity": (True, [REPR], ["similarity", "bootstrap"], [f"{R}/{M}/token_group_similarity.csv"]),
    "anomalies": (True, [REPR, PAPER_REF], ["anomalies", "bootstrap"],
                  [f"{R}/{M}/anomaly_rel_norm.csv", f"{R}/{M}/anomaly_detector.json"]),
    "channel_outliers": (True, [REPR], ["channels"], [f"{R}/{M}/channel_outliers.csv"]),
    "credibility": (True, TABLES, ["credibility"], [f"{R}/{M}/credibility.csv", f"{R}/layer_summary/{M}.csv"]),
    "quantitative_figure": (True, TABLES, [], [f"{FIG}/quantitative_{M}.png", f"{FIG}/quantitative_{M}.svg"]),
    "paper_comparison": (True, TABLES + [PAPER_REF], [],
                         [f"{R}/{M}/paper_comparison.csv", f"{FIG}/paper_comparison_{M}.png",
                          f"{FIG}/paper_comparison_{M}.svg"]),
    "qualitative_figures": (True, [REPR, f"{R}/dataset", PAPER_REF], ["anomalies"], QUALITATIVE),
    "cross_model_figure": (False, [f"{R}/layer_summary"], ["models"],
                           [f"{FIG}/cross_model.png", f"{FIG}/cross_model.svg"]),
    "run_summary": (True, [f"{R}/{M}/{t}.csv" for t in RUN_TABLES], ["probe.interior_k"],
                    [f"{SUMMARY_DIR}/{M}/baseline.csv"]),
    # the folder of the model's run summaries: the baseline's is always there, an experiment adds its own
    "experiment_comparison": (True, [f"{SUMMARY_DIR}/{M}"], ["experiments"],
                              [f"{R}/{M}/experiments.csv", f"{FIG}/experiments_{M}.png", f"{FIG}/experiments_{M}.svg"]),
}
#: Rules that also run for every experiment (params.yaml `experiments`): one more stage each, ``<rule>_experiment``,
#: over DVC's matrix of models x experiments (stage ``position_probe_experiment@sd15-circular``), whose paths are
#: the experiment's (:func:`experiment_stage`). With no experiments the matrix is empty: no stages.
EXPERIMENT_RULES = ("extract", "paper_reference", "position_probe", "token_group_similarity", "anomalies",
                    "channel_outliers", "run_summary")
EXPERIMENT_SUFFIX = "_experiment"
SNAKEFILE_RULE_FILES = {"build_mini": "models.smk", "dataset": "data.smk", "extract": "extract.smk",
                        "paper_reference": "reference.smk", "cross_model_figure": "figures.smk",
                        "credibility": "figures.smk", "quantitative_figure": "figures.smk",
                        "paper_comparison": "figures.smk", "qualitative_figures": "figures.smk",
                        "run_summary": "experiments.smk", "experiment_comparison": "experiments.smk"}


def dvc_param(key: str) -> str | None:
    """A rule's declared key as DVC names it (``model_source`` is the model's ``model_sources`` entry;
    ``experiment``, the overrides of an experiment, is none for the baseline)."""
    return f"model_sources.{M}" if key == "model_source" else None if key == "experiment" else key


def rule_file(rule: str) -> str:
    return f"workflow/rules/{SNAKEFILE_RULE_FILES.get(rule, 'analyses.smk')}"


def stage(rule: str) -> dict:
    per_model, inputs, keys, outputs = STAGES[rule]
    rules = [rule] + EXTRA_RULES.get(rule, [])
    script = PACKAGE.parent.parent / "workflow" / "scripts" / TASK_SCRIPT
    code = sorted(set().union(*(code_deps(script, r) for r in rules)))
    if rule == "extract":
        cmd = f"diffaudit dvc-extract {M}"
    else:
        cmd = f"snakemake --cores all --nolock --allowed-rules {rule} -- {' '.join(outputs)}"
    body: dict = {"cmd": cmd,
                  "deps": inputs + sorted({rule_file(r) for r in rules}) + [f"workflow/scripts/{TASK_SCRIPT}"] + code}
    params = [p for p in (dvc_param(k) for k in keys) if p]
    if params:
        body["params"] = params
    outs = [o for o in outputs if not o.endswith(FIGURE_SUFFIXES + (".json",))]
    metrics = [o for o in outputs if o.endswith(".json")]  # cached like every output: push/pull move them
    plots = [o for o in outputs if o.endswith(FIGURE_SUFFIXES)]
    for name, paths in (("outs", outs), ("metrics", metrics), ("plots", plots)):
        if paths:
            body[name] = paths
    return {"foreach": "${models}", "do": body} if per_model else body


# `dvc plots`: the quantities of the paper's three panels, one plot per model (per file of the summary folder;
# DVC keeps one definition per path, so the three panels share one plot).
SUMMARY_PLOT = {"template": "linear", "x": "layer_index",
                "y": ["acc_8x8", "acc_16x16", "acc_32x32", "acc_64x64", "corner_ratio", "border_ratio",
                      "rel_norm_mean"],
                "title": "per layer: probe accuracy per axis, corner/border similarity ratio, anomaly relative norm",
                "x_label": "layer index", "y_label": "value"}


def experiment_stage(rule: str) -> dict:
    """The stage of ``rule`` for one (model, experiment) of the matrix: the baseline's with the experiment's paths
    (``{results_dir}/{model}/experiments/{name}/...``; its run summary ``experiment_summary/{model}/{name}.csv``),
    its overrides as a param and, for the extraction, ``--experiment``."""
    body = stage(rule)["do"]
    model, name = "${item.model}", "${item.experiment}"

    def swap(text: str) -> str:
        text = text.replace(f"{SUMMARY_DIR}/{M}/baseline.csv", f"{SUMMARY_DIR}/{model}/{name}.csv")
        text = text.replace(f"{R}/{M}/", f"{R}/{model}/experiments/{name}/")
        return text.replace(f"{R}/{M}", f"{R}/{model}/experiments/{name}").replace(M, model)

    out = {"matrix": {"model": "${models}", "experiment": "${experiments}"}}
    for key, value in body.items():
        out[key] = [swap(v) for v in value] if isinstance(value, list) else swap(value)
    if rule == "extract":
        out["cmd"] = f"diffaudit dvc-extract {model} --experiment {name}"
    if "experiment" in STAGES[rule][2]:
        out["params"] = out.get("params", []) + [f"experiments.{name}"]
    return out


def render() -> str:
    doc = {"stages": {rule: stage(rule) for rule in STAGES}}
    doc["stages"].update({rule + EXPERIMENT_SUFFIX: experiment_stage(rule) for rule in EXPERIMENT_RULES})
    doc["plots"] = [{f"{R}/layer_summary": SUMMARY_PLOT}]
    return HEADER + yaml.safe_dump(doc, sort_keys=False, width=120)
