"""The workflow configuration: loading and merging like Snakemake, and schema validation."""
from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path

import yaml

from .errors import DiffauditError


class ConfigError(DiffauditError, ValueError):
    """The configuration is invalid; the message names the key."""


def merge(base: dict, override: dict) -> dict:
    """``override`` merged into a copy of ``base`` exactly as Snakemake merges several ``--configfile``s
    (``snakemake.utils.update_config``: mappings key by key, other values replaced)."""
    from snakemake.utils import update_config

    out = copy.deepcopy(base)
    update_config(out, copy.deepcopy(override))
    return out


def load_config(*paths: str | Path) -> dict:
    """Load and merge YAML config files in order, then validate."""
    cfg: dict = {}
    for path in paths:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read configuration: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at top level")
        cfg = merge(cfg, data)
    validate(cfg)
    return cfg


def schema() -> dict:
    return json.loads(resources.files("diffaudit").joinpath("params.schema.json").read_text())


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _dotted(text: str) -> str:
    """``1e-4`` -> ``1.0e-4`` (a float to YAML 1.1)."""
    mant, _, exp = text.lower().partition("e")
    return f"{mant if '.' in mant else mant + '.0'}{'e' + exp if exp else ''}"


def validate(cfg: dict) -> dict:
    """Validate against the JSON schema; the first error becomes one line naming the key."""
    import jsonschema

    validator = jsonschema.Draft7Validator(schema())
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        key = ".".join(str(p) for p in err.absolute_path) or "<top level>"
        msg = err.message
        if err.validator == "additionalProperties":
            msg = f"unknown key ({msg})"
        elif err.validator == "type" and isinstance(err.instance, str) and _looks_numeric(err.instance):
            # YAML 1.1 (PyYAML, used by Snakemake) reads 1e-4 as text: its floats need a dot
            msg += f"; YAML reads {err.instance} as text, write it with a dot, e.g. {_dotted(err.instance)}"
        raise ConfigError(f"config key {key}: {msg}")
    from .experiments import ExperimentError, validate as validate_experiments

    try:  # the experiments' keys and values (their names the schema checks)
        validate_experiments(cfg.get("experiments"))
    except ExperimentError as exc:
        raise ConfigError(f"config key {exc}") from exc
    for name, overrides in (cfg.get("experiments") or {}).items():
        if overrides.get("harm") and not cfg["harm"]["enabled"]:
            raise ConfigError(f"config key experiments.{name}.harm: true needs harm.enabled: true (the harm pairs "
                              "and the baseline's harm tables they are compared with)")
    return cfg
