"""Helpers shared by the task modules: the declared config, device choice, and the table helpers of
:mod:`diffaudit.tables` (atomic CSV writes, table reading) under their task-side names.

Every task module imports this one, so every DVC stage depends on it: it imports only small library modules
(a helper that needs more belongs to a library module that the tasks that need it import)."""
from __future__ import annotations

from pathlib import Path

from ..layout import JOB_PARAMS
from ..tables import read_table, read_tables, write_csv  # noqa: F401  (the tasks' table reading and atomic writing)


class UndeclaredConfigKey(KeyError):
    """A task read a config value that its rule does not declare (a bug in the rule's ``params``)."""


class DeclaredConfig(dict):
    """The part of the configuration that a rule declares; reading any other key raises
    :class:`UndeclaredConfigKey` naming the rule and the key, so a task cannot depend on a value that
    Snakemake's and DVC's change detection do not see."""

    def __init__(self, data: dict, rule: str, prefix: str = ""):
        super().__init__({k: DeclaredConfig(v, rule, f"{prefix}{k}.") if isinstance(v, dict) else v
                          for k, v in data.items()})
        self.rule, self.prefix = rule, prefix

    def __missing__(self, key):
        raise UndeclaredConfigKey(f"rule {self.rule} reads config key {self.prefix}{key}, which its params do not "
                                  f"declare: add it to the rule's declare(...) and to its stage's params in dvc.yaml")


def task_config(smk) -> DeclaredConfig:
    """The config a task may read: the rule's params named ``section`` or ``section__key`` (from ``declare`` in
    workflow/rules/common.smk) as a nested mapping, and ``model_sources.<model>`` from ``model_source``
    (:data:`JOB_PARAMS` are not config)."""
    data: dict = {}
    for name in smk.params.keys():
        if name == "model_source":
            data.setdefault("model_sources", {})[smk.wildcards.model] = smk.params.model_source
            continue
        if name in JOB_PARAMS:
            continue
        parts = name.split("__")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = smk.params[name]
    return DeclaredConfig(data, smk.rule)


def device(cfg: dict) -> str:
    """``extraction.device``, with ``auto`` = the first CUDA device if there is one, else the CPU
    (:func:`diffaudit.devices.resolve_device`)."""
    from ..devices import resolve_device

    return resolve_device(cfg["extraction"]["device"])


def stem(path: str | Path) -> str:
    """A figure output without its suffix (figures are written as .png and .svg)."""
    return str(Path(path).with_suffix(""))
