"""Workflow tasks: one function per Snakemake rule, taking the merged config. Scripts stay thin."""
from __future__ import annotations

import hashlib
from pathlib import Path

from .config import validate
from .layers import expand_layers


def build_mini(cfg: dict, out_dir: str | Path) -> Path:
    from .models import save_mini_model

    return save_mini_model(out_dir, seed=int(cfg["mini"]["seed"]))


def build_dataset(cfg: dict, out_dir: str | Path) -> Path:
    from .datasets import build_dataset as _build

    return _build(cfg["dataset"], out_dir)


def _device(cfg: dict) -> str:
    from .models import default_device

    dev = cfg["extraction"]["device"]
    return default_device() if dev == "auto" else dev


def extract(cfg: dict, model: str, dataset_dir: str | Path, out_dir: str | Path, progress: bool = True,
            stop_after: int | None = None) -> Path:
    """Extract all variants of ``model`` for the dataset into ``out_dir`` (resumable)."""
    from .datasets import load_images, load_index
    from .extract import ExtractionSettings, run_extraction
    from .models import compute_dtype, load_pipeline, model_revision, resolve_model

    validate(cfg)
    ex = cfg["extraction"]
    settings = ExtractionSettings(mode=ex["mode"], timestep=ex["timestep"], seed=ex["seed"],
                                  batch_size=ex["batch_size"], prompt=ex["prompt"], precision=ex["precision"],
                                  store_dtype=ex["store_dtype"], crops=ex["crops"])
    layers = expand_layers(cfg["layers"])
    index = load_index(dataset_dir)
    n_req = int(cfg["dataset"]["n_images"])
    if len(index) < n_req:
        raise ValueError(f"dataset {dataset_dir} has {len(index)} images but dataset.n_images={n_req}; "
                         "rebuild the dataset or lower dataset.n_images")
    index = index.iloc[:n_req]
    spec = resolve_model(model, cfg["model_sources"])
    device = _device(cfg)
    pipe = load_pipeline(spec, device=device, dtype=compute_dtype(device, ex["precision"]))
    index_sha = hashlib.sha256((Path(dataset_dir) / "index.csv").read_bytes()).hexdigest()
    provenance = {"model": model, "model_source": spec.source, "model_revision": model_revision(spec, pipe),
                  "dataset": str(cfg["dataset"]["source"]), "dataset_index_sha256": index_sha}
    return run_extraction(
        pipe, dataset_images=lambda a, b: load_images(dataset_dir, index, a, b),
        image_ids=list(index["id"].astype(str)), labels=list(index["label"].astype(int)), layers=layers,
        settings=settings, out_dir=out_dir, provenance=provenance, image_size=int(cfg["dataset"]["size"]),
        progress=progress, stop_after=stop_after)
