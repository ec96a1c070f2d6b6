"""params.yaml is read by two YAML readers: Snakemake's (PyYAML, YAML 1.1, through yte) and DVC's (ruamel,
YAML 1.2). Both must see the same values for every key. The stage params DVC records must be the values
Snakemake gives the rule. The merged configuration must validate, and bad keys must give a one-line error
that names the key. Basic merging and a few bad values are already covered in tests/test_config.py.
"""
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import REPO, copy_repo
from diffaudit.config import ConfigError, load_config, merge, validate
from diffaudit.dvcgen import EXTRA_RULES
from diffaudit.pipeline.common import JOB_PARAMS



# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def canonical(value):
    """Plain Python values with exact types (ruamel's float/str subclasses -> float/str; bool is not int)."""
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    for t in (bool, int, float, str):
        if isinstance(value, t):
            return t(value)
    return value


def leaves(cfg: dict, prefix: str = "") -> dict:
    """Dotted key -> (type name, value) for every scalar or list in the mapping."""
    out = {}
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(leaves(value, path + "."))
        else:
            value = canonical(value)
            out[path] = (type(value).__name__, value)
    return out


def differences(a: dict, b: dict) -> list[str]:
    la, lb = leaves(a), leaves(b)
    return [f"{k}: {la.get(k, '<missing>')} != {lb.get(k, '<missing>')}"
            for k in sorted(set(la) | set(lb)) if la.get(k) != lb.get(k)]


def snakemake_reads(path: Path) -> dict:
    """The way Snakemake reads a config file (`configfile:` and `--configfile`)."""
    from snakemake.common.configfile import load_configfile

    return load_configfile(str(path))


def dvc_reads(path: Path) -> dict:
    """The way DVC reads a params file."""
    from dvc.utils.serialize import load_yaml

    return load_yaml(str(path))


def snakemake_workflow(root: Path, configfiles: list[str], dag: bool = False):
    """Snakemake's API on the workflow in ``root``. Returns the final config, plus the DAG's jobs if ``dag``."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import (ConfigSettings, DAGSettings, OutputSettings, ResourceSettings,
                                          StorageSettings)

    with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
        wf = api.workflow(resource_settings=ResourceSettings(cores=1),
                          config_settings=ConfigSettings(configfiles=[root / c for c in configfiles]),
                          storage_settings=StorageSettings(), snakefile=root / "Snakefile", workdir=root)
        if not dag:
            return canonical(wf._workflow.config), None
        dag_api = wf.dag(dag_settings=DAGSettings(forceall=True))
        workflow = dag_api.workflow_api._workflow  # as in diffaudit.dvcgen: the DAG has no public accessor
        workflow.dag_settings = dag_api.dag_settings
        workflow._prepare_dag(forceall=True, ignore_incomplete=True, lock_warn_only=True)
        workflow._build_dag()
        jobs = [{"rule": job.rule.name, "wildcards": dict(job.wildcards_dict),
                 "params": {n: canonical(getattr(job.params, n)) for n in job.params._names}}
                for job in workflow.dag.jobs if job.rule.name != "all"]
        return canonical(workflow.config), jobs




def dvc_repo(root: Path):
    """The repository copy as DVC sees it (it carries .dvc/; DVC wants git around it)."""
    import subprocess

    from dvc.repo import Repo

    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return Repo(str(root))


# ---------------------------------------------------------------------------------------------
# the same values on both sides
# ---------------------------------------------------------------------------------------------

def test_snakemake_and_dvc_read_the_same_params_yaml(tmp_path):
    root = copy_repo(tmp_path / "repo")
    snake_file = snakemake_reads(root / "params.yaml")
    snake_run, _ = snakemake_workflow(root, [])  # the Snakefile's `configfile: "params.yaml"`
    dvc_file = dvc_reads(root / "params.yaml")
    with dvc_repo(root) as repo:
        shown = repo.params.show()[""]["data"]["params.yaml"]["data"]
    assert not differences(snake_file, dvc_file), differences(snake_file, dvc_file)
    assert not differences(snake_file, shown), differences(snake_file, shown)
    assert not differences(snake_file, snake_run), differences(snake_file, snake_run)
    assert len(leaves(snake_file)) > 40  # every key was compared, not just the sections


@pytest.mark.parametrize("text, snake, dvc", [
    ("a: on", True, "on"),              # YAML 1.1 booleans: on/off/yes/no/y/n
    ("a: no", False, "no"),
    ("a: 1e-3", "1e-3", 0.001),         # YAML 1.1 floats need a dot
    ("a: 010", 8, 10),                  # YAML 1.1 octal
    ("a: 0o10", "0o10", 8),             # YAML 1.2 octal
    ("a: 1:30", 90, "1:30"),            # YAML 1.1 sexagesimal
])
def test_the_comparison_sees_yaml_1_1_versus_1_2(tmp_path, text, snake, dvc):
    """The check above is not vacuous: these spellings mean different things to the two readers, so
    params.yaml must not use them (write 1.0e-3, quote 'on')."""
    p = tmp_path / "p.yaml"
    p.write_text(text + "\n")
    assert snakemake_reads(p)["a"] == snake and canonical(dvc_reads(p)["a"]) == dvc
    assert differences(snakemake_reads(p), dvc_reads(p))


def test_every_stage_param_is_what_snakemake_gives_the_rule(tmp_path):
    """The values DVC records for each stage (dvc.lock) are the `params:` values of that Snakemake job."""
    root = copy_repo(tmp_path / "repo")
    config, jobs = snakemake_workflow(root, [], dag=True)
    by_stage = {j["rule"] + (f"@{j['wildcards']['model']}" if "model" in j["wildcards"] else ""): j for j in jobs}
    checked = {}
    with dvc_repo(root) as repo:
        for stage in repo.index.stages:
            job = by_stage.pop(stage.name)
            expected = {}
            for name, value in job["params"].items():
                if name == "model_source":  # the rule resolves the model's registry entry
                    expected[f"model_sources.{job['wildcards']['model']}"] = value
                elif name == "experiment":  # an experiment's overrides; the baseline has none (and no DVC param)
                    assert value == {} and not job["wildcards"].get("exp"), stage.name
                elif name not in JOB_PARAMS:
                    expected[name.replace("__", ".")] = value
            if job["rule"] in EXTRA_RULES:  # the stage may also build the embedded model
                expected["mini"] = canonical(config["mini"])
            (dep,) = [d for d in stage.deps if d.def_path == "params.yaml"] or [None]
            seen = canonical(dep.read_params()) if dep is not None else {}
            assert seen == expected, stage.name
            checked[job["rule"]] = checked.get(job["rule"], 0) + len(seen)
    assert not by_stage, f"jobs without a DVC stage: {sorted(by_stage)}"
    n_models = len(config["models"])
    assert checked["extract"] == 5 * n_models and checked["position_probe"] == 5 * n_models


def test_the_demo_params_file_of_the_dvc_tests_is_read_alike(tmp_path):
    """tests/test_dvc*.py write the merged demo config into params.yaml with yaml.safe_dump: DVC and
    Snakemake must read that file back as Snakemake's own merge of params.yaml and config/demo.yaml."""
    root = copy_repo(tmp_path / "repo")
    merged, _ = snakemake_workflow(root, ["params.yaml", "config/demo.yaml"])
    (root / "params.yaml").write_text(yaml.safe_dump(load_config(root / "params.yaml", root / "config" / "demo.yaml"),
                                                     sort_keys=False))
    assert not differences(merged, snakemake_reads(root / "params.yaml"))
    assert not differences(merged, dvc_reads(root / "params.yaml"))


@pytest.mark.parametrize("override, key", [
    ("probe.lr=0.00001", "probe.lr"),           # ruamel writes 1e-05: a string to Snakemake
    ("extraction.prompt=yes", "extraction.prompt"),  # written bare: a boolean to Snakemake
    ("extraction.prompt=off", "extraction.prompt"),
])
def test_dvc_set_param_values_that_snakemake_reads_differently_fail_loudly(tmp_path, override, key):
    """`dvc exp run -S` writes params.yaml through ruamel (YAML 1.2). Where Snakemake would read the result
    differently, the schema rejects it with one line naming the key. Snakemake never silently runs with
    a different value than the one DVC records."""
    from dvc.utils.hydra import apply_overrides

    p = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", p)
    apply_overrides(p, [override])  # what `dvc exp run -S` does to params.yaml
    assert differences(snakemake_reads(p), dvc_reads(p))  # the readers disagree on this file
    validate(canonical(dvc_reads(p)))  # DVC's reading is a valid configuration ...
    with pytest.raises(ConfigError, match=rf"^config key {key}: [^\n]*$"):  # ... Snakemake's is refused
        validate(snakemake_reads(p))


@pytest.mark.parametrize("override", ["probe.lr=0.0005", "credibility.safe_below=0.3", "probe.seeds=[1,2]",
                                      "dataset.path=/data/imgs", "extraction.prompt='a photo'", "probe.epochs=2",
                                      "anomalies.labels=[auto]", "dataset.path=null", "anomalies.threshold=1.5e3"])
def test_dvc_set_param_round_trips_to_snakemake(tmp_path, override):
    from dvc.utils.hydra import apply_overrides

    p = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", p)
    apply_overrides(p, [override])
    assert not differences(snakemake_reads(p), dvc_reads(p))
    validate(snakemake_reads(p))


# ---------------------------------------------------------------------------------------------
# merging like Snakemake, and validation
# ---------------------------------------------------------------------------------------------

def test_demo_merged_by_snakemake_validates_and_matches_load_config(tmp_path):
    root = copy_repo(tmp_path / "repo")
    merged, _ = snakemake_workflow(root, ["params.yaml", "config/demo.yaml"])
    validate(merged)
    assert not differences(merged, load_config(REPO / "params.yaml", REPO / "config" / "demo.yaml"))
    assert merged["models"] == ["mini-cal"] and merged["dataset"]["n_images"] == 32
    assert merged["dataset"]["imagenet"] == snakemake_reads(REPO / "params.yaml")["dataset"]["imagenet"]


@pytest.mark.parametrize("override", [
    {"models": ["mymodel"], "model_sources": {"mymodel": "/abs/pipe"},
     "dataset": {"source": "folder", "path": "/abs/imgs", "n_images": 20}, "results_dir": "/abs/out"},
    {"probe": {"seeds": [1]}},                                     # lists are replaced, not appended
    {"model_sources": {"mini": {"id": "me/mini", "revision": None}}},  # a string entry becomes a mapping
    {"model_sources": {"sd15": "/local/sd15"}},                    # a mapping entry becomes a string
    {"layers": ["mid_block"], "dataset": {"imagenet": {"classes": [1]}}},
    {"dataset": {"path": None}},
    {"layers": {}},  # an empty mapping over a scalar: Snakemake keeps the scalar
])
def test_merge_is_snakemakes_merge(override):
    from snakemake.utils import update_config

    base = snakemake_reads(REPO / "params.yaml")
    theirs = yaml.safe_load(yaml.safe_dump(base))
    update_config(theirs, override)
    assert merge(base, override) == theirs


def _sections(cfg: dict, prefix: str = ""):
    """Every mapping whose keys the schema fixes (all but the model registry, and the experiments, whose names
    are free and whose keys diffaudit.experiments checks: tests/test_experiments.py), with its dotted key."""
    yield prefix or "<top level>", cfg
    for key, value in cfg.items():
        if isinstance(value, dict) and key not in ("model_sources", "experiments"):
            yield from _sections(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}")


def _closed_schema_objects(node=None, prefix="") -> set[str]:
    """Dotted keys of the schema's objects that allow no other keys."""
    from diffaudit.config import schema

    node = schema() if node is None else node
    out = {prefix or "<top level>"} if node.get("additionalProperties") is False else set()
    for key, sub in node.get("properties", {}).items():
        out |= _closed_schema_objects(sub, f"{prefix}.{key}" if prefix else key)
    return out


def _set(cfg: dict, dotted: str, value) -> dict:
    out = yaml.safe_load(yaml.safe_dump(cfg))
    node = out
    *parents, last = dotted.split(".")
    for p in parents:
        node = node[p]
    node[last] = value
    return out


@pytest.mark.parametrize("configs", [["params.yaml"], ["params.yaml", "config/demo.yaml"]], ids=["paper", "demo"])
def test_an_unknown_key_in_any_section_names_the_section(configs):
    cfg = load_config(*[REPO / c for c in configs])
    sections = list(_sections(cfg))
    assert {name for name, _ in sections} == _closed_schema_objects()
    for name, _ in sections:
        bad = yaml.safe_load(yaml.safe_dump(cfg))
        node = bad
        if name != "<top level>":
            for part in name.split("."):
                node = node[part]
        node["zz_typo"] = 1
        with pytest.raises(ConfigError) as err:
            validate(bad)
        msg = str(err.value)
        assert msg.startswith(f"config key {name}: unknown key") and "zz_typo" in msg and "\n" not in msg, msg


@pytest.mark.parametrize("configs", [["params.yaml"], ["params.yaml", "config/demo.yaml"]], ids=["paper", "demo"])
def test_a_wrong_type_for_any_key_names_that_key(configs):
    cfg = load_config(*[REPO / c for c in configs])
    keys = sorted(leaves(cfg))
    assert len(keys) > 40
    for key in keys:
        with pytest.raises(ConfigError) as err:
            validate(_set(cfg, key, {"not": "this"}))
        msg = str(err.value)
        named = msg.split(":", 1)[0].removeprefix("config key ")
        # a model registry entry is one choice (hub id mapping or path), reported at the entry; an empty
        # `experiments` given a mapping of a non-mapping is reported at that experiment
        ok = named == key or (key.startswith("model_sources.") and key.startswith(named + ".")) or (
            key == "experiments" and named == "experiments.not")
        assert ok and "\n" not in msg, (key, msg)


def test_snakemake_reports_a_bad_key_in_one_line(tmp_path):
    """The error reaches the user through `snakemake` itself (a dry run: nothing is built)."""
    import os
    import subprocess
    import sys

    root = copy_repo(tmp_path / "repo")
    bad = tmp_path / "bad.yaml"
    bad.write_text("probe:\n  epochs: five\n")
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--workflow-profile", "none",
                           "--configfile", "params.yaml", str(bad)], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "config key probe.epochs" in ln]
    assert lines and all("invalid configuration: config key probe.epochs: 'five' is not of type 'integer'" in ln
                         for ln in lines), proc.stderr[-3000:]
