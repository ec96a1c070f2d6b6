"""The extraction of one model: a dataset folder's images through the model into Zarr stores, with the run's
provenance (the body of rule ``extract``), shared by the rule's task (:mod:`diffaudit.pipeline.extract`) and
``diffaudit extract``. The extraction itself (hooks, passes, store writing) is
:func:`diffaudit.extract.run_extraction`.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from .devices import resolve_device
from .errors import UserError


def extract_model(cfg: dict, model: str, dataset_dir: str | Path, out_dir: str | Path, progress: bool = True,
                  stop_after: int | None = None, shard: int | None = None, lock_file: str | Path | None = None
                  ) -> Path:
    """Extract all variants of ``model`` for the dataset into ``out_dir`` (resumable).

    With ``extraction.shards`` > 1, ``shard`` selects one of the batch-aligned image ranges
    (:func:`diffaudit.store.shard_ranges`); the shards together equal the unsharded extraction.
    ``cfg["experiment"]`` (the overrides of one experiment, :mod:`diffaudit.experiments`) changes the extraction.
    Before anything is loaded, the model's files are checked against the weights lock ``lock_file`` (default
    :data:`diffaudit.lock.LOCK_FILE`; :func:`diffaudit.lock.check`), and the store records their hashes.
    """
    from . import experiments
    from .datasets import load_images, load_index, load_label_names
    from .extract import ExtractionSettings, run_extraction
    from .families.registry import family_of
    from .layers import expand_layers
    from . import lock
    from .models import compute_dtype, embedded_model, load_pipeline, resolve_model, resolve_snapshot
    from .store import shard_ranges

    overrides = cfg.get("experiment") or {}
    ex = experiments.effective_extraction(cfg["extraction"], overrides)
    settings = ExtractionSettings(mode=ex["mode"], timestep=ex["timestep"], seed=ex["seed"],
                                  batch_size=ex["batch_size"], prompt=ex["prompt"], precision=ex["precision"],
                                  store_dtype=ex["store_dtype"], crops=ex["crops"], sigma=ex.get("sigma"),
                                  nonfinite=ex.get("nonfinite", "stop"),
                                  **{k: ex[k] for k in experiments.CAUSES if k in ex and k not in (
                                      "timestep", "seed", "prompt")})
    index = load_index(dataset_dir)
    n_req = int(cfg["dataset"]["n_images"])
    if len(index) < n_req:
        raise UserError(f"dataset {dataset_dir} has {len(index)} images but dataset.n_images={n_req}; "
                         "rebuild the dataset or lower dataset.n_images")
    index = index.iloc[:n_req]
    first = 0
    if shard is not None:
        first, last = shard_ranges(n_req, ex["batch_size"], ex["shards"])[shard]
        index = index.iloc[first:last]
    spec = resolve_model(model, cfg["model_sources"])
    device = resolve_device(cfg["extraction"]["device"])
    snapshot = resolve_snapshot(spec)
    if embedded_model(spec.source):  # built from seeded code by the workflow: nothing to lock, cheap to hash
        files = lock.file_hashes(snapshot.path)
    else:
        files = lock.check(model, snapshot, lock.LOCK_FILE if lock_file is None else lock_file)
    pipe = load_pipeline(spec, device=device, dtype=compute_dtype(device, ex["precision"]),
                         offload=bool(ex.get("offload", False)), snapshot=snapshot)
    family = family_of(pipe)
    layers = expand_layers(experiments.layers_of(cfg["layers"], overrides), family.paper_layers(family.backbone(pipe)))
    index_sha = hashlib.sha256((Path(dataset_dir) / "index.csv").read_bytes()).hexdigest()
    # the hub id the files came from (a mirror if the main id failed) and the resolved commit
    provenance = {"model": model, "model_source": snapshot.source,
                  "model_revision": snapshot.commit or snapshot.revision or spec.revision,
                  "dataset": str(cfg["dataset"]["source"]), "dataset_index_sha256": index_sha}
    if snapshot.mirror:
        provenance["model_source_requested"] = spec.source
    if files:
        provenance["model_files"] = files
    if overrides:
        provenance["experiment"] = dict(overrides)
    if shard is not None:
        provenance.update(shard=f"{shard + 1}/{ex['shards']}", image_range=[first, first + len(index)])
    return run_extraction(
        pipe, dataset_images=lambda a, b: load_images(dataset_dir, index, a, b), index_offset=first,
        image_ids=list(index["id"].astype(str)), labels=list(index["label"].astype(int)), layers=layers,
        settings=settings, out_dir=out_dir, provenance=provenance, image_size=int(cfg["dataset"]["size"]),
        progress=progress, stop_after=stop_after, label_names=load_label_names(dataset_dir))
