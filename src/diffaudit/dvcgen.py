"""Generate ``dvc.yaml`` from the Snakemake DAG, so that DVC and Snakemake never drift apart.

One DVC stage per Snakemake job (rule, or rule and model): its command runs exactly that rule through
Snakemake (``--allowed-rules``; ``--nolock``, as DVC's own lock covers the run), its deps are the job's inputs,
the rule file, the rule's script and the package modules that script reaches, its params are the ``params.yaml``
sections the rule declares, its outs the job's outputs (figures as image plots, JSON summaries as metrics).

    diffaudit dvc-yaml > dvc.yaml          # after changing rules, models or results_dir in params.yaml

``tests/test_dvc.py`` regenerates the file and fails when it differs from the committed one.
"""
from __future__ import annotations

import ast
from pathlib import Path

import yaml

PACKAGE = Path(__file__).resolve().parent
HEADER = ("# Generated from the Snakemake DAG by `diffaudit dvc-yaml > dvc.yaml`; do not edit by hand.\n"
          "# Each stage runs one Snakemake job; see README.md (Reproducing with DVC).\n")
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
    pkg = module.rsplit(".", 1)[0] if not module.endswith("__init__") else module
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

def stage_name(job: dict) -> str:
    """``rule``, ``rule-model`` or, for extraction shards, ``extract-model-shard2of4``."""
    parts = [job["rule"]]
    for key, value in job["wildcards"].items():
        if key == "part":
            value = value.removeprefix("representations").lstrip("_")
        if value:
            parts.append(value)
    return "-".join(parts)


def _params(job: dict, config: dict) -> list[str]:
    out = []
    for name in job["params"]:
        if name == "source":  # the model's registry entry
            out.append(f"model_sources.{job['wildcards']['model']}")
        elif name in config:
            out.append(name)
    return out


def dvc_stages(configfiles=("params.yaml",), root: str | Path = ".") -> dict:
    from .config import load_config

    root = Path(root).resolve()
    config = load_config(*[root / c for c in configfiles])
    stages = {}
    for job in snakemake_jobs([root / c for c in configfiles], snakefile=root / "Snakefile"):
        rel = lambda p: str(Path(p).resolve().relative_to(root))  # noqa: E731
        deps = list(dict.fromkeys(job["inputs"] + [rel(job["rule_file"])]
                                  + ([rel(job["script"])] + code_deps(job["script"], job["rule"])
                                     if job["script"] else [])))
        outs, plots, metrics = [], [], []
        for o in job["outputs"]:
            if o.endswith(FIGURE_SUFFIXES):
                plots.append(o)
            elif o.endswith(".json"):  # cached like every output, so `dvc push`/`dvc pull` move them too
                metrics.append(o)
            else:
                outs.append(o)
        targets = " ".join(job["outputs"])
        # --nolock: `dvc repro` holds DVC's repository lock for the whole run, so Snakemake's own directory lock
        # adds no protection there; it would only outlive a kill -9 and make the re-run fail until --unlock
        stage = {"cmd": f"snakemake --cores all --nolock --allowed-rules {job['rule']} -- {targets}", "deps": deps}
        params = _params(job, config)
        if params:
            stage["params"] = params
        if outs:
            stage["outs"] = outs
        if metrics:
            stage["metrics"] = metrics
        if plots:
            stage["plots"] = plots
        stages[stage_name(job)] = stage
    return {"stages": stages}


# Top-level `dvc plots` drawn from each model's layer_summary.csv: the three panels of the paper's figure.
SUMMARY_PLOTS = (
    ("probe_accuracy", ["acc_8x8", "acc_16x16", "acc_32x32", "acc_64x64"], "test accuracy (per axis)"),
    ("corner_border_ratio", ["corner_ratio", "border_ratio"], "rel. similarity (cropped / full)"),
    ("anomaly_rel_norm", ["rel_norm_mean"], "rel. norm of labelled anomalies"),
)


def summary_plots(stages: dict) -> list[dict]:
    """Plot definitions for every ``layer_summary.csv`` that a stage writes."""
    plots = []
    for stage in stages.values():
        for out in stage.get("outs", []):
            if Path(out).name == "layer_summary.csv":
                model = Path(out).parent.name
                for name, columns, label in SUMMARY_PLOTS:
                    plots.append({f"{name}-{model}": {"template": "linear", "x": "layer_index",
                                                      "y": {out: list(columns)}, "title": f"{model}: {label}",
                                                      "x_label": "layer index", "y_label": label}})
    return plots


def render(configfiles=("params.yaml",), root: str | Path = ".") -> str:
    doc = dvc_stages(configfiles, root)
    plots = summary_plots(doc["stages"])
    if plots:
        doc["plots"] = plots
    return HEADER + yaml.safe_dump(doc, sort_keys=False, width=120)
