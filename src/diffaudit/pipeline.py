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
            stop_after: int | None = None, shard: int | None = None) -> Path:
    """Extract all variants of ``model`` for the dataset into ``out_dir`` (resumable).

    With ``extraction.shards`` > 1, ``shard`` selects one of the batch-aligned image ranges
    (:func:`diffaudit.store.shard_ranges`); the shards together equal the unsharded extraction.
    """
    from .datasets import load_images, load_index
    from .extract import ExtractionSettings, run_extraction
    from .models import compute_dtype, load_pipeline, model_revision, resolve_model
    from .store import shard_ranges

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
    first = 0
    if shard is not None:
        first, last = shard_ranges(n_req, ex["batch_size"], ex["shards"])[shard]
        index = index.iloc[first:last]
    spec = resolve_model(model, cfg["model_sources"])
    device = _device(cfg)
    pipe = load_pipeline(spec, device=device, dtype=compute_dtype(device, ex["precision"]))
    index_sha = hashlib.sha256((Path(dataset_dir) / "index.csv").read_bytes()).hexdigest()
    provenance = {"model": model, "model_source": spec.source, "model_revision": model_revision(spec, pipe),
                  "dataset": str(cfg["dataset"]["source"]), "dataset_index_sha256": index_sha}
    if shard is not None:
        provenance.update(shard=f"{shard + 1}/{ex['shards']}", image_range=[first, first + len(index)])
    return run_extraction(
        pipe, dataset_images=lambda a, b: load_images(dataset_dir, index, a, b), index_offset=first,
        image_ids=list(index["id"].astype(str)), labels=list(index["label"].astype(int)), layers=layers,
        settings=settings, out_dir=out_dir, provenance=provenance, image_size=int(cfg["dataset"]["size"]),
        progress=progress, stop_after=stop_after)


# ---------------------------------------------------------------------------------------------
# Analyses: each reads the model's representation directory and writes one tidy CSV
# ---------------------------------------------------------------------------------------------

def _open_stores(rep_dirs: str | Path | list):
    """The ``full`` store and the ``crop<t>`` stores of one model (several shard directories read as one)."""
    from .store import list_variants, open_variant

    dirs = [rep_dirs] if isinstance(rep_dirs, (str, Path)) else list(rep_dirs)
    full = open_variant(dirs, "full")
    crops = {int(v[4:]): open_variant(dirs, v) for v in list_variants(dirs[0]) if v.startswith("crop")}
    return full, crops


def _write_csv(df, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    df.to_csv(tmp, index=False, float_format="%.6g")
    tmp.replace(out)
    return out


def probe(cfg: dict, model: str, rep_dirs: str | Path | list, out_csv: str | Path) -> Path:
    from .analyses.probe import run_probe

    p = cfg["probe"]
    full, _ = _open_stores(rep_dirs)
    df = run_probe(full, mode=p["mode"], epochs=p["epochs"], batch_size=p["batch_size"], lr=p["lr"],
                   train_frac=p["train_frac"], seed=p["seed"], seeds=p["seeds"], granularities=p["granularities"],
                   device=_device(cfg), model_name=model, progress=True)
    return _write_csv(df, out_csv)


def similarity(cfg: dict, model: str, rep_dirs: str | Path | list, out_csv: str | Path) -> Path:
    from .analyses.similarity import token_group_similarity

    full, crops = _open_stores(rep_dirs)
    if not crops:
        raise ValueError(f"{full.path} has no cropped variants; set extraction.crops: true and re-extract")
    df = token_group_similarity(full, crops, layers=sorted(set().union(*(c.layers for c in crops.values())),
                                                           key=full.layers.index),
                                mode=cfg["similarity"]["mode"], image_size=int(cfg["dataset"]["size"]),
                                chunk_images=cfg["similarity"]["chunk_images"], model_name=model)
    return _write_csv(df, out_csv)


# Downloaded reference files of the authors (sha256-checked; git-ignored).
PAPER_CACHE = Path("resources/paper")


def label_sources(cfg: dict, model: str) -> dict[str, str | None]:
    """The anomaly label sources that apply to ``model``: name -> label file (None: computed here).

    ``auto`` is the detector; ``paper`` the authors' hand labels, which exist for sd15, sd21 and sdturbo and
    only mean something on the paper's image set (elsewhere they are skipped, so the table has no ``paper``
    rows); any other entry is a user's label file, named ``user:<file name>``.
    """
    from .analyses.anomalies import PAPER_LABELS

    spec = cfg["anomalies"]["labels"]
    out: dict[str, str | None] = {}
    for src in [spec] if isinstance(spec, str) else spec:
        if src == "auto":
            out["auto"] = None
        elif src == "paper":
            if model in PAPER_LABELS and cfg["dataset"]["source"] == "imagenet_subset":
                out["paper"] = str(PAPER_CACHE / f"high_norm_anomalies_{model}.npy")
        else:
            out[f"user:{Path(src).name}"] = src
    return out


def anomalies(cfg: dict, model: str, rep_dirs: str | Path | list, out_csv: str | Path,
              detector_json: str | Path | None = None) -> Path:
    """Relative norms of labelled anomalies for every label source, and the detector's precision/recall
    against each set of hand labels (``detector_json``)."""
    import json

    import pandas as pd

    from .analyses.anomalies import (detect_anomalies, fetch_paper_labels, load_label_file, precision_recall,
                                     relative_norms)

    a = cfg["anomalies"]
    full, _ = _open_stores(rep_dirs)
    if a["ref_layer"] not in full.layers:
        raise ValueError(f"anomalies.ref_layer {a['ref_layer']!r} was not extracted; add it to `layers`")
    tables, labels = [], {}
    for source, path in label_sources(cfg, model).items():
        if path is None:
            labels[source] = detect_anomalies(full, layer=a["ref_layer"], threshold=a["threshold"])
        else:
            if source == "paper":
                path = fetch_paper_labels(model, PAPER_CACHE)
            labels[source] = load_label_file(path, n_images=full.n_images)
        tables.append(relative_norms(full, labels[source], ref_layer=a["ref_layer"], mode=a["mode"],
                                     label_source=source, model_name=model))
    df = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    if detector_json is not None:
        evals = {f"auto_vs_{s}": precision_recall(labels["auto"], lab)
                 for s, lab in labels.items() if s != "auto" and "auto" in labels}
        summary = {"threshold": a["threshold"], "ref_layer": a["ref_layer"],
                   "n_labels": {s: int(len(v)) for s, v in labels.items()}, "detector_vs_hand_labels": evals}
        Path(detector_json).write_text(json.dumps(summary, indent=1, default=float))
    return _write_csv(df, out_csv)


def channels(cfg: dict, model: str, rep_dirs: str | Path | list, out_csv: str | Path) -> Path:
    from .analyses.channels import channel_outliers

    full, _ = _open_stores(rep_dirs)
    df = channel_outliers(full, model_name=model, ratio_threshold=cfg["channels"]["ratio_threshold"])
    return _write_csv(df, out_csv)


# ---------------------------------------------------------------------------------------------
# Summaries and figures: read only the tables (and, for the qualitative views, the stores)
# ---------------------------------------------------------------------------------------------

TABLES = ("position_probe", "token_group_similarity", "anomaly_rel_norm", "channel_outliers")


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


def paper_applies(cfg: dict, model: str) -> bool:
    """The published numbers are comparable: one of the authors' models on the paper's image set."""
    from .reference import PAPER_MODELS

    return model in PAPER_MODELS and cfg["dataset"]["source"] == "imagenet_subset"


def credibility(cfg: dict, model: str, table_dir: str | Path, out_csv: str | Path,
                summary_csv: str | Path | None = None) -> Path:
    """The per-layer hazard scores, and (``summary_csv``) the figure's quantities one row per layer."""
    from .analyses.credibility import credibility as score
    from .reference import per_layer_quantities

    t = read_tables(table_dir)
    df = score(t["position_probe"], t["token_group_similarity"], t["anomaly_rel_norm"], t["channel_outliers"],
               model=model, safe_threshold=cfg["credibility"]["safe_below"])
    if summary_csv is not None:
        _write_csv(per_layer_quantities(t), summary_csv)
    return _write_csv(df, out_csv)


def paper_comparison(cfg: dict, model: str, table_dir: str | Path, out_csv: str | Path, out_stem: str | Path):
    """Our tables next to the authors' published numbers (fetched, sha256-checked) and the overlay figure."""
    from .figures.quantitative import plot_quantitative
    from .reference import compare_with_paper, paper_tables

    t = read_tables(table_dir)
    paper = paper_tables(model, PAPER_CACHE)
    _write_csv(compare_with_paper(t, paper), out_csv)
    plot_quantitative(t["position_probe"], t["token_group_similarity"], t["anomaly_rel_norm"], out_stem,
                      model=f"{model}: ours vs paper", reference=paper)


def quantitative_figure(cfg: dict, model: str, table_dir: str | Path, out_stem: str | Path):
    from .figures.quantitative import plot_quantitative

    t = read_tables(table_dir)
    plot_quantitative(t["position_probe"], t["token_group_similarity"], t["anomaly_rel_norm"], out_stem, model=model)


def cross_model_figure(cfg: dict, table_dirs: dict[str, str | Path], out_stem: str | Path):
    from .figures.quantitative import plot_cross_model

    plot_cross_model({m: read_tables(d) for m, d in table_dirs.items()}, out_stem)


def qualitative_figures(cfg: dict, model: str, rep_dirs: str | Path | list, dataset_dir: str | Path, out_dir: str | Path):
    """Token similarity, corner similarity, norm maps (with the anomaly labels in use) and PCA-RGB."""
    from .analyses.anomalies import load_label_file
    from .figures.qualitative import render_all

    full, _ = _open_stores(rep_dirs)
    hand = {s: p for s, p in label_sources(cfg, model).items() if p is not None and Path(p).is_file()}
    labels = load_label_file(next(iter(hand.values())), n_images=full.n_images) if hand else None
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    render_all(full, dataset_dir, out_dir, labels=labels)
