"""Rule ``credibility_validation``: the credibility axes against the measured harm, across a model's layers
(:func:`diffaudit.harm.validation.validate`)."""
from __future__ import annotations

from pathlib import Path

from . import common


def run(cfg: dict, credibility_csv: str | Path, harm_csv: str | Path, out_csv: str | Path) -> Path:
    from ..analyses.bootstrap import Bootstrap
    from ..harm.validation import validate

    return common.write_csv(validate(common.read_table(credibility_csv), common.read_table(harm_csv),
                                     Bootstrap.from_config(cfg["bootstrap"])), out_csv)


def from_snakemake(smk):
    return run(common.task_config(smk), smk.input.credibility, smk.input.harm, smk.output[0])
