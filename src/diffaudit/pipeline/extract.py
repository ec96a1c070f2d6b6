"""Rule ``extract``: U-Net representations of one model (or one shard of its images) into Zarr stores."""
from __future__ import annotations

from pathlib import Path

from . import common


def run(cfg: dict, model: str, dataset_dir: str | Path, out_dir: str | Path, progress: bool = True,
        stop_after: int | None = None, shard: int | None = None, lock_file: str | Path | None = None) -> Path:
    """Extract all variants of ``model`` for the dataset into ``out_dir`` (resumable): see
    :func:`diffaudit.model_extraction.extract_model`."""
    from ..model_extraction import extract_model

    return extract_model(cfg, model, dataset_dir, out_dir, progress=progress, stop_after=stop_after, shard=shard,
                         lock_file=lock_file)


def from_snakemake(smk):
    return run(common.task_config(smk), smk.wildcards.model, smk.input.dataset, smk.output[0], shard=smk.params.shard,
               lock_file=smk.input.lock)
