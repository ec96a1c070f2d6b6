"""Rule ``extract_harm``: the harm pairs' images through the run's model with the run's own extraction settings
(an experiment's overrides included) into ``<run>/harm/representations``, full maps only (no crop variants) and as
one job. No pair (``harm.enabled: false``): an empty folder, and the log says so."""
from __future__ import annotations

import logging
from pathlib import Path

from . import common


def settings(cfg: dict, n_images: int) -> dict:
    """The run's configuration for the pairs' extraction: all ``n_images`` pair images, no crops, one shard."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in cfg.items()}
    out["dataset"] = {**cfg["dataset"], "n_images": int(n_images)}
    out["extraction"] = {**cfg["extraction"], "crops": False, "shards": 1}
    if out.get("experiment"):
        out["experiment"] = {**cfg["experiment"], "crops": False}
    return out


def run(cfg: dict, model: str, pairs_dir: str | Path, out_dir: str | Path, lock_file: str | Path | None = None
        ) -> Path:
    from ..datasets import load_index
    from ..harm.pairs import load_pairs
    from ..model_extraction import extract_model

    pairs, _ = load_pairs(pairs_dir)
    n = 0 if pairs.empty else len(load_index(pairs_dir))
    if n == 0:
        logging.getLogger(__name__).info("%s: no harm pair (harm.enabled is false): nothing to extract", model)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        return Path(out_dir)
    return extract_model(settings(cfg, n), model, pairs_dir, out_dir, lock_file=lock_file)


def from_snakemake(smk):
    return run(common.task_config(smk), smk.wildcards.model, smk.input.pairs, smk.output[0], lock_file=smk.input.lock)
