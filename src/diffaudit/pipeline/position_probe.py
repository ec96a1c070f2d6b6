"""Rule ``position_probe``: linear probes of token position per layer (``position_probe.csv``)."""
from __future__ import annotations

from pathlib import Path

from . import common


def run(cfg: dict, model: str, rep_dirs: str | Path | list, out_csv: str | Path,
        summary_csv: str | Path | None = None, per_image_csv: str | Path | None = None) -> Path:
    """Every run's accuracies with their bootstrap interval and interior accuracy (``out_csv``), their mean
    and sd over seeds with the seed mean's interval (``summary_csv``), and the final epoch's per-image accuracies
    (``per_image_csv``, for the experiments' paired comparison)."""
    from ..analyses.bootstrap import Bootstrap
    from ..analyses.paired import per_image_frame, store_image_size
    from ..analyses.probe import run_probe, summarize_probe
    from ..store import open_model_stores

    p = cfg["probe"]
    full, _ = open_model_stores(rep_dirs)
    records: list = []
    df = run_probe(full, mode=p["mode"], epochs=p["epochs"], batch_size=p["batch_size"], lr=p["lr"],
                   train_frac=p["train_frac"], seed=p["seed"], seeds=p["seeds"], granularities=p["granularities"],
                   device=common.device(cfg), model_name=model, progress=True,
                   class_names=(cfg["dataset"]["imagenet"]["classes"]
                                if cfg["dataset"]["source"] == "imagenet_subset" else None),
                   interior_k=int(p["interior_k"]), bootstrap=Bootstrap.from_config(cfg["bootstrap"]), image_records=records)
    if per_image_csv is not None:
        common.write_csv(per_image_frame(records, full.image_ids, store_image_size(full)), per_image_csv)
    if summary_csv is not None:
        common.write_csv(summarize_probe(df), summary_csv)
    return common.write_csv(df, out_csv)


def from_snakemake(smk):
    return run(common.task_config(smk), smk.wildcards.model, list(smk.input.rep), smk.output.table, smk.output.summary,
               smk.output.per_image)
