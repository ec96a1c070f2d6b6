"""Every rule declares the config its task reads: a task sees only the declared values (so Snakemake's and DVC's
change detection see every value a result depends on), and reading anything else fails loudly."""
import ast
from types import SimpleNamespace

import pytest

from conftest import REPO
from diffaudit.pipeline.common import DeclaredConfig, UndeclaredConfigKey, task_config

PIPELINE = REPO / "src" / "diffaudit" / "pipeline"


class Params(dict):
    """Snakemake's params object, as far as task_config uses it."""

    def __getattr__(self, name):
        return self[name]


def smk(rule, model="sd15", **params):
    return SimpleNamespace(rule=rule, params=Params(params), wildcards=SimpleNamespace(model=model))


def test_task_config_holds_the_declared_values_and_nothing_else():
    cfg = task_config(smk("position_probe", probe={"mode": "paper"}, extraction__device="cpu",
                          model_source={"id": "a/b"}, shard=None))
    assert cfg["probe"]["mode"] == "paper" and cfg["extraction"]["device"] == "cpu"
    assert cfg["model_sources"]["sd15"] == {"id": "a/b"} and "shard" not in cfg
    with pytest.raises(UndeclaredConfigKey, match="rule position_probe reads config key extraction.seed"):
        cfg["extraction"]["seed"]
    with pytest.raises(UndeclaredConfigKey, match="config key dataset,"):
        cfg["dataset"]


def test_undeclared_reads_are_bugs_not_user_errors():
    from diffaudit.errors import DiffauditError

    assert not issubclass(UndeclaredConfigKey, DiffauditError)  # keeps its traceback
    assert isinstance(DeclaredConfig({"a": {"b": 1}}, "r")["a"], DeclaredConfig)


@pytest.mark.parametrize("module", sorted(p.stem for p in PIPELINE.glob("*.py") if p.stem not in ("__init__",
                                                                                                   "common")))
def test_no_task_reads_the_whole_config(module):
    """A task gets its config only through task_config(smk): `smk.config` (everything) is never read."""
    tree = ast.parse((PIPELINE / f"{module}.py").read_text())
    reads = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "config"
             and isinstance(n.value, ast.Name) and n.value.id == "smk"]
    assert not reads, f"pipeline/{module}.py reads smk.config at lines {reads}"
