"""``dvc.yaml``: one templated stage per Snakemake rule, read off the Snakemake DAG, and what checks it.

The file uses DVC's own templating: values from ``params.yaml`` (``${results_dir}``) and, for the rules that run
per model, ``foreach: ${models}`` (stage ``position_probe@sd15``, ...). So changing ``models``, ``results_dir`` or
``extraction.shards`` in params.yaml (by hand or with ``dvc exp run -S``) needs no new dvc.yaml; only a change of
the rules or of the package's imports does:

    diffaudit dvc-yaml > dvc.yaml

Nothing here restates a rule: :func:`stages` builds Snakemake's DAG of params.yaml with placeholder models, results
folder and experiment (:func:`snakemake_dag`) and turns each job into its stage. Each stage runs exactly its rule
through Snakemake (``--allowed-rules``; ``--nolock``, as DVC's own lock covers the run); its deps are the job's
inputs (files that several jobs of one rule write into one folder, one per model or run, as that folder), the rule
file, the rule's script and the package modules that the rule's task reaches (static import analysis); its params
are the config keys the rule declares; its outs the job's outputs (figures as image plots, JSON summaries as
metrics). ``tests/test_dvc.py`` fails when the committed file differs from :func:`render`, and when the stages
that DVC resolves for a configuration differ from the jobs of the Snakemake DAG (outputs, inputs, params, code).
"""
from __future__ import annotations

import ast
from pathlib import Path, PurePosixPath

import yaml

from . import layout
from .layout import JOB_PARAMS

PACKAGE = Path(__file__).resolve().parent
HEADER = ("# Written by `diffaudit dvc-yaml > dvc.yaml` from the workflow's rules (see diffaudit.dvcgen); do not edit.\n"
          "# ${...} are values from params.yaml, so changing models, results_dir or extraction.shards there needs\n"
          "# no new file. Each stage runs one Snakemake rule; see README.md (Reproducing with DVC).\n")
FIGURE_SUFFIXES = (".png", ".svg")


def snakemake_dag(configfiles=("params.yaml",), snakefile="Snakefile", config: dict | None = None
                  ) -> tuple[list[dict], dict[str, dict]]:
    """The jobs of the full DAG (as if nothing existed yet) for the given config files (and ``config``, applied on
    top of them as Snakemake's ``--config`` would), and every rule of the workflow in definition order: name ->
    its rule file, script and params' names."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import (ConfigSettings, DAGSettings, OutputSettings, ResourceSettings,
                                          StorageSettings)

    def script_of(rule) -> Path | None:
        return (Path(rule.snakefile).resolve().parent / rule.script).resolve() if rule.script else None

    with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
        wf = api.workflow(resource_settings=ResourceSettings(cores=1),
                          config_settings=ConfigSettings(configfiles=[Path(c) for c in configfiles],
                                                         config=dict(config or {})),
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
            jobs.append({"rule": rule.name, "wildcards": dict(job.wildcards_dict),
                         "inputs": [str(i) for i in job.input], "outputs": [str(o) for o in job.output],
                         "params": list(rule.params._names), "rule_file": Path(rule.snakefile).resolve(),
                         "script": script_of(rule)})
        rules = {rule.name: {"rule_file": Path(rule.snakefile).resolve(), "script": script_of(rule),
                             "params": list(rule.params._names)} for rule in workflow.rules if rule.name != "all"}
    return sorted(jobs, key=lambda j: (j["rule"], sorted(j["wildcards"].items()))), rules


def snakemake_jobs(configfiles=("params.yaml",), snakefile="Snakefile", config: dict | None = None) -> list[dict]:
    """The jobs of the full DAG (as if nothing existed yet) for the given config files."""
    return snakemake_dag(configfiles, snakefile, config)[0]


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
    pkg = module.rsplit(".", 1)[0]  # the package a relative import starts from (a.b for a.b.c and a.b.__init__)
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


def module_imports(name: str) -> set[str]:
    """The package modules that module ``name`` (``diffaudit.x.y``; a package stands for its ``__init__``) imports
    anywhere in its source, itself left out. The one import walker: the stages' code dependencies here, and the
    tests of the package's shape (no cycle, imports that point down)."""
    path = _module_file(name)
    key = f"{name}.__init__" if path.name == "__init__.py" else name  # relative imports start from the package
    return _imports(ast.parse(path.read_text()), key) - {name}


def _closure(start: set[str]) -> set[str]:
    """``start`` and every package module they import (at module or function level), transitively."""
    seen: set[str] = set()
    todo = list(start)
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        todo += module_imports(mod) - seen
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
#: The values of DVC's matrix stages (a model and an experiment of params.yaml).
MATRIX_MODEL, MATRIX_EXPERIMENT = "${item.model}", "${item.experiment}"
# The extraction stage also builds the embedded model when the model is `mini` (a Snakemake intermediate,
# deterministic from `mini.seed`): its rule is allowed there, and its code and params are the stage's too.
EXTRA_RULES = {"extract": ["build_mini"], "extract_harm": ["build_mini"]}
#: Stages whose command is not "Snakemake, this rule, these outputs": the extraction's one folder holds every shard,
#: and `diffaudit dvc-extract` runs every shard job of the model (``extraction.shards``).
COMMANDS = {"extract": "diffaudit dvc-extract {model}{experiment}"}
#: Rules that also run for every experiment (params.yaml `experiments`) get one more stage each,
#: ``<rule>_experiment``, over DVC's matrix of models x experiments (stage ``position_probe_experiment@sd15-circular``),
#: whose paths are the experiment's. With no experiments the matrix is empty: no stages.
EXPERIMENT_SUFFIX = "_experiment"
#: Rule params that are no config key of their own: the model's registry entry (in DVC ``model_sources.<model>``)
#: and an experiment's overrides (``experiments.<name>``; none for the baseline).
MODEL_SOURCE, EXPERIMENT = "model_source", "experiment"

# The stages are read off the DAG of params.yaml with placeholders for what dvc.yaml templates: the results folder,
# the models (two: a rule that gathers one file per model or per run, e.g. the cross-model figure, reads a folder)
# and one experiment (to see which rules run per experiment). Of the rest of params.yaml only files that a rule reads
# from the configuration (user label files in `anomalies.labels`) reach a stage, as deps.
_RESULTS, _MODEL, _OTHER_MODEL, _EXPERIMENT = "dvcgen-results", "dvcgen-model-a", "dvcgen-model-b", "dvcgen-exp"
_TEMPLATE_CONFIG = {"results_dir": _RESULTS, "models": [_MODEL, _OTHER_MODEL],
                    "model_sources": {m: {"id": f"dvcgen/{m}", "revision": "main"} for m in (_MODEL, _OTHER_MODEL)},
                    "experiments": {_EXPERIMENT: {"seed": 1}}, "extraction": {"shards": 1},
                    # the harm stages exist whatever harm.enabled says; switched off, they write empty tables
                    "harm": {"enabled": True}}


def dvc_param(key: str, model: str = M, experiment: str | None = None) -> str | None:
    """A rule's declared param as DVC names the config key (``model_source`` is the model's ``model_sources``
    entry; ``experiment``, the overrides of an experiment, is none for the baseline)."""
    if key == MODEL_SOURCE:
        return f"model_sources.{model}"
    if key == EXPERIMENT:
        return f"experiments.{experiment}" if experiment else None
    return key.replace("__", ".")


def _run_of(wildcards: dict) -> str:
    if "exp" in wildcards:
        return layout.run_name(wildcards["exp"])
    return wildcards.get("run", layout.BASELINE)


def _templated(path: str, model: str, experiment: str | None) -> str:
    """A path of the placeholder DAG with DVC's templates for the results folder, the model and the experiment."""
    if path == _RESULTS or path.startswith(_RESULTS + "/"):
        path = R + path[len(_RESULTS):]
    path = path.replace(_MODEL, model)
    return path.replace(_EXPERIMENT, experiment) if experiment else path


def _gathered(job: dict, producers: dict[str, tuple[str, tuple]]) -> list[str]:
    """The job's inputs, where files of one folder made by several jobs of one rule (a file per model or per run)
    become that folder (DVC tracks it: a new model or experiment needs no new dvc.yaml)."""
    groups: dict[tuple[str, str], set] = {}
    for i in job["inputs"]:
        if i in producers:
            rule, wildcards = producers[i]
            groups.setdefault((rule, str(PurePosixPath(i).parent)), set()).add(wildcards)
    out = []
    for i in job["inputs"]:
        folder = str(PurePosixPath(i).parent)
        gathered = i in producers and len(groups[(producers[i][0], folder)]) > 1
        path = folder if gathered else i
        if path not in out:
            out.append(path)
    return out


def _body(job: dict, rules: dict[str, dict], producers: dict, model: str, experiment: str | None) -> dict:
    """The stage of one job of the placeholder DAG (``model``/``experiment``: DVC's templates for them)."""
    rule = job["rule"]
    root = PACKAGE.parent.parent
    names = [rule] + EXTRA_RULES.get(rule, [])
    code = sorted(set().union(*(code_deps(rules[r]["script"], r) for r in names)))
    outputs = [_templated(o, model, experiment) for o in job["outputs"]]
    inputs = [_templated(i, model, experiment) for i in _gathered(job, producers)]
    if rule in COMMANDS:
        cmd = COMMANDS[rule].format(model=model, experiment=f" --experiment {experiment}" if experiment else "")
    else:
        cmd = f"snakemake --cores all --nolock --allowed-rules {' '.join(names)} -- {' '.join(outputs)}"
    rule_files = sorted({str(rules[r]["rule_file"].relative_to(root)) for r in names})
    scripts = list(dict.fromkeys(str(rules[r]["script"].relative_to(root)) for r in names))
    body: dict = {"cmd": cmd, "deps": inputs + rule_files + scripts + code}
    # the rule's own config keys, those of the rules it brings along, then the model's and experiment's entries
    own = [p for p in rules[rule]["params"] if p not in JOB_PARAMS]
    keys = ([p for p in own if p not in (MODEL_SOURCE, EXPERIMENT)]
            + [p for r in names[1:] for p in rules[r]["params"] if p not in JOB_PARAMS + (MODEL_SOURCE, EXPERIMENT)]
            + [p for p in own if p in (MODEL_SOURCE, EXPERIMENT)])
    params = [p for p in (dvc_param(k, model, experiment) for k in keys) if p]
    if params:
        body["params"] = params
    outs = [o for o in outputs if not o.endswith(FIGURE_SUFFIXES + (".json",))]
    metrics = [o for o in outputs if o.endswith(".json")]  # cached like every output: push/pull move them
    plots = [o for o in outputs if o.endswith(FIGURE_SUFFIXES)]
    for name, paths in (("outs", outs), ("metrics", metrics), ("plots", plots)):
        if paths:
            body[name] = paths
    return body


def stages() -> dict[str, dict]:
    """Every stage of dvc.yaml, in the order of the workflow's rules: per rule the stage of its job (``foreach`` over
    the models when it runs per model), then ``<rule>_experiment`` (the matrix) for each rule that runs per
    experiment. Read off Snakemake's DAG of params.yaml with placeholder models and experiment
    (:data:`_TEMPLATE_CONFIG`): the rules decide every path, param and piece of code."""
    root = PACKAGE.parent.parent
    jobs, rules = snakemake_dag([root / "params.yaml"], root / "Snakefile", _TEMPLATE_CONFIG)
    producers = {o: (j["rule"], tuple(sorted(j["wildcards"].items()))) for j in jobs for o in j["outputs"]}
    order = {name: k for k, name in enumerate(rules)}
    extra = {r for rs in EXTRA_RULES.values() for r in rs}
    baseline: dict[str, dict] = {}
    experiment: dict[str, dict] = {}
    for job in sorted(jobs, key=lambda j: order[j["rule"]]):
        rule, wildcards = job["rule"], job["wildcards"]
        if rule in extra or wildcards.get("model", _MODEL) != _MODEL:
            continue
        if _run_of(wildcards) == _EXPERIMENT:
            experiment[rule + EXPERIMENT_SUFFIX] = {
                "matrix": {"model": "${models}", "experiment": "${experiments}"},
                **_body(job, rules, producers, MATRIX_MODEL, MATRIX_EXPERIMENT)}
        elif "model" in wildcards:
            baseline[rule] = {"foreach": "${models}", "do": _body(job, rules, producers, M, None)}
        else:
            baseline[rule] = _body(job, rules, producers, M, None)
    return {**baseline, **experiment}


# `dvc plots`: the quantities of the paper's three panels, one plot per model (per file of the summary folder;
# DVC keeps one definition per path, so the three panels share one plot).
SUMMARY_PLOT = {"template": "linear", "x": "layer_index",
                "y": ["acc_8x8", "acc_16x16", "acc_32x32", "acc_64x64", "corner_ratio", "border_ratio",
                      "rel_norm_mean"],
                "title": "per layer: probe accuracy per axis, corner/border similarity ratio, anomaly relative norm",
                "x_label": "layer index", "y_label": "value"}


def render() -> str:
    doc = {"stages": stages(), "plots": [{f"{R}/{layout.LAYER_SUMMARY}": SUMMARY_PLOT}]}
    return HEADER + yaml.safe_dump(doc, sort_keys=False, width=120)
