"""Helpers shared by the task modules: the declared config, device choice, atomic CSV writes, table reading.

Every task module imports this one, so every DVC stage depends on it: it imports nothing else from the package
(a helper that needs more belongs to the task module that uses it)."""
from __future__ import annotations

from pathlib import Path

# Rule params that describe the job, not the configuration.
JOB_PARAMS = ("shard",)

# The tidy tables of one model that the summaries and figures read.
TABLES = ("position_probe", "token_group_similarity", "anomaly_rel_norm", "channel_outliers")


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
    """``extraction.device``, with ``auto`` = the first CUDA device if there is one, else the CPU."""
    from ..devices import default_device

    dev = cfg["extraction"]["device"]
    return default_device() if dev == "auto" else dev


def write_csv(df, out: str | Path) -> Path:
    """Write atomically (a reader never sees half a table)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    df.to_csv(tmp, index=False, float_format="%.6g")
    tmp.replace(out)
    return out


def read_tables(table_dir: str | Path) -> dict:
    """The tidy tables of one model (a missing or empty table is None)."""
    import pandas as pd

    out = {}
    for name in TABLES:
        path = Path(table_dir) / f"{name}.csv"
        try:
            out[name] = pd.read_csv(path) if path.is_file() else None
        except pd.errors.EmptyDataError:
            out[name] = None
    return out


def stem(path: str | Path) -> str:
    """A figure output without its suffix (figures are written as .png and .svg)."""
    return str(Path(path).with_suffix(""))
