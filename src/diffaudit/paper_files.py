"""The authors' published files: fetched from their repository, checksum-verified, cached, parsed into our tidy tables.

Source: ``JonasLoos/sd-representation-anomalies`` at commit :data:`COMMIT` (its only commit). Per model
(sd15, sd21, sdturbo) the repository holds

=====================  ==========================================  ==============================================
kind                   repository path                             content
=====================  ==========================================  ==============================================
``accuracies``         ``data/accuracies_cls_{m}.pt``              tensor [45 layers, 5 epochs, 4 granularities
                                                                   8/16/32/64], per-axis probe test accuracy
``group_similarities`` ``data/results_group_similarities_{m}.pt``  dict layer -> [R_crop, R_full_ring], 3 x 3
                                                                   group matrices (corner, border, other)
``anomaly_norms_mean`` ``data/up1_anomaly_norms_mean_{m}.pt``      numpy float64 (45,): mean relative norm
``anomaly_norms_std``  ``data/up1_anomaly_norms_std_{m}.pt``       numpy float64 (45,): population std
``labels``             ``labeler/high_norm_anomalies_{m}.npy``     int64 (K, 3) hand labels (image, x, y)
=====================  ==========================================  ==============================================

:func:`fetch` downloads a file into a cache folder (flat file names, as in the repository's folders) and verifies
its sha256 against :data:`PAPER_FILES`; a cached file with the right checksum is used without network access, so
an offline machine works with pre-placed files. The ``.pt`` files are pickles: they are only ever loaded with
``torch.load(..., weights_only=True)`` (PyTorch's restricted unpickler), with exactly the four numpy globals
that the anomaly-norm files reference allowlisted (:data:`NUMPY_SAFE_GLOBALS`).

:func:`paper_position_probe`, :func:`paper_token_group_similarity` and :func:`paper_anomaly_rel_norm` return
DataFrames with the leading columns of our ``position_probe.csv``, ``token_group_similarity.csv`` and
``anomaly_rel_norm.csv`` (the schemas of :mod:`diffaudit.tables`);
:func:`diffaudit.analyses.paper_comparison.compare_with_paper` lines ours up against them (``paper_comparison.csv``).

Rule ``paper_reference`` copies the files that apply to a run into ``{results_dir}/{model}/paper_reference/`` with
its verdict in ``status.json``: :func:`read_status` and :func:`paper_file` read that folder (for the tasks, the
label sources and the explorer). :data:`diffaudit.layout.PAPER_CACHE` is the download cache of the workflow.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from .analyses.similarity import ratio_columns
from .errors import DiffauditError
from .families.sd import PAPER_LAYERS, layer_shape
from .hubcache import sha256_file  # the one streamed file hash (also the weights lock's)
from .tables import PAPER_TABLES, PROBE_COLUMNS, RELNORM_COLUMNS, SIMILARITY_COLUMNS

REPO = "JonasLoos/sd-representation-anomalies"
COMMIT = "1230d5395ce8f321eac557da56f0934dfd7cfc63"
URL_BASE = f"https://raw.githubusercontent.com/{REPO}/{COMMIT}"

PAPER_MODELS: tuple[str, ...] = ("sd15", "sd21", "sdturbo")
KINDS: tuple[str, ...] = ("accuracies", "group_similarities", "anomaly_norms_mean", "anomaly_norms_std", "labels")
_PATTERNS = {
    "accuracies": "data/accuracies_cls_{m}.pt",
    "group_similarities": "data/results_group_similarities_{m}.pt",
    "anomaly_norms_mean": "data/up1_anomaly_norms_mean_{m}.pt",
    "anomaly_norms_std": "data/up1_anomaly_norms_std_{m}.pt",
    "labels": "labeler/high_norm_anomalies_{m}.npy",
}
_SHA256 = {
    ("sd15", "accuracies"): "db20563f0aed66d70f02798612dbd1cc37ecac85e969005277df0526feced571",
    ("sd21", "accuracies"): "5e76c5d9ad99b77a43a209763ff5d0184c48cb5dc3b2b1bf338f201fc7f84285",
    ("sdturbo", "accuracies"): "0171de280ac801103058034bae1258c10dc9bf4c38114db408ea8f1fbefdc54f",
    ("sd15", "group_similarities"): "3816e66db857d2d8496fc014eddc795f50e7f1b4ef7bec984c6cc6de532b4587",
    ("sd21", "group_similarities"): "73727191508bbd78757c95a38ede2c20b0c5949a25c2e854da98153a660d4140",
    ("sdturbo", "group_similarities"): "43583f1b5fe5afb206bc1e8b9b31d91011e9dc4ae68d70960bd6b61d18da17ac",
    ("sd15", "anomaly_norms_mean"): "d9a44fa070f7b6f21cf2051df1160ca1932de63aea5a304cff6950e906f73168",
    ("sd21", "anomaly_norms_mean"): "c51c25fd1098fe66eb934808a17d633924d9705d11b6f08bcd63187bb4335105",
    ("sdturbo", "anomaly_norms_mean"): "5a9b88abc17ea7074da45fa51bb1323b911e7007f3e81bd1e2b1b36786b1c19e",
    ("sd15", "anomaly_norms_std"): "9548d2da70e95daa177bda33fa8c9d3da62bba1370943f39f71f34ff37d8fb76",
    ("sd21", "anomaly_norms_std"): "787ade18d8708e31a1901ffa276d4b650e7fe81dbf62555c9635b0cf5bf6c2b3",
    ("sdturbo", "anomaly_norms_std"): "85b0ceb947034a4c63c3124f9623a0eefd29064678ee62282be2c21beb8e0473",
    ("sd15", "labels"): "d58bfd5bafda94491b6cb9938523507612e52ce57e0c001acc014ac8fd4db444",
    ("sd21", "labels"): "82e739bb6cfbf8dd2d29ce3ea224b7ca2d12c7491fdfd8e8410d039d8768592d",
    ("sdturbo", "labels"): "242f5de1e02cb56c18b9016c8599d018b22017e6a7510f49f5c2cd9125e176c6",
}
#: (model, kind) -> (path in the authors' repository, sha256 of the file at :data:`COMMIT`).
PAPER_FILES: dict[tuple[str, str], tuple[str, str]] = {
    (m, k): (_PATTERNS[k].format(m=m), _SHA256[(m, k)]) for m in PAPER_MODELS for k in KINDS
}


GRANULARITIES: tuple[int, ...] = (8, 16, 32, 64)  # last axis of accuracies_cls
PAPER_SEED = 42

#: Table name (file stem of our CSVs) -> the columns the published table has (:data:`diffaudit.tables.PAPER_TABLES`).
TABLES = PAPER_TABLES

#: The verdict that rule ``paper_reference`` writes into its folder.
STATUS = "status.json"


def paper_applies(cfg: dict, model: str) -> bool:
    """The published numbers are comparable: one of the authors' models on the paper's image set."""
    return model in PAPER_MODELS and cfg["dataset"]["source"] == "imagenet_subset"


class ReferenceFetchError(DiffauditError, RuntimeError):
    """A reference file could not be obtained."""


class ReferenceChecksumError(ReferenceFetchError):
    """A downloaded file does not have the expected sha256."""


# ---------------------------------------------------------------------------------------------
# Download with checksum verification (generic)
# ---------------------------------------------------------------------------------------------

def download_verified(url: str, dest, sha256: str, *, timeout: float = 60.0, what: str | None = None,
                      fetch_error: type[Exception] = ReferenceFetchError,
                      checksum_error: type[Exception] = ReferenceChecksumError) -> Path:
    """``dest`` with sha256 ``sha256``, downloaded from ``url`` if needed.

    A file already at ``dest`` whose checksum matches is returned without touching the network. Otherwise
    ``url`` (any urllib URL, ``file://`` included) is downloaded to a temporary file next to ``dest``, verified
    and moved into place atomically (``os.replace``). On a checksum mismatch the download is deleted and
    ``checksum_error`` raised; when the download fails, ``fetch_error`` is raised with a one-line message that
    names ``url`` and ``dest``. A file at ``dest`` with a wrong checksum is never used: it is replaced by a good
    download, or deleted when the download fails. ``what`` names the file in messages.
    """
    dest = Path(dest)
    what = what or dest.name
    stale = ""
    if dest.is_file():
        got = sha256_file(dest)
        if got == sha256:
            return dest
        stale = f"; the file that was at {dest} had sha256 {got} and was removed"
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    ok = False
    try:
        try:
            with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as r:
                shutil.copyfileobj(r, f)
        except (urllib.error.URLError, OSError, ValueError) as e:
            msg = " ".join(str(e).split())
            raise fetch_error(f"{what} needs network access to download {url} ({type(e).__name__}: {msg}) "
                              f"or a pre-placed file at {dest} with sha256 {sha256}{stale}") from None
        got = sha256_file(tmp)
        if got != sha256:
            raise checksum_error(f"{url}: sha256 {got} does not match the expected {sha256}; "
                                 f"the download was discarded{stale}")
        os.replace(tmp, dest)
        ok = True
    finally:
        tmp.unlink(missing_ok=True)
        if not ok and stale:
            try:
                dest.unlink(missing_ok=True)
            except OSError:
                pass
    return dest


def cache_name(model: str, kind: str) -> str:
    """File name of a reference file in the cache folder (its repository file name)."""
    return PurePosixPath(PAPER_FILES[(model, kind)][0]).name


def fetch(model: str, kind: str, cache_dir, *, url_base: str | None = None, timeout: float = 60.0) -> Path:
    """The authors' file ``kind`` for ``model`` in ``cache_dir`` (flat file name), downloaded and verified.

    ``url_base`` defaults to :data:`URL_BASE` (raw GitHub at :data:`COMMIT`); the repository path is appended.
    """
    if (model, kind) not in PAPER_FILES:
        if model not in PAPER_MODELS:
            raise ReferenceFetchError(f"no published reference for model {model!r}; the authors published "
                                      f"{', '.join(PAPER_MODELS)}")
        raise ReferenceFetchError(f"unknown reference kind {kind!r}; use one of {', '.join(KINDS)}")
    repo_path, sha = PAPER_FILES[(model, kind)]
    base = (URL_BASE if url_base is None else url_base).rstrip("/")
    dest = Path(cache_dir) / cache_name(model, kind)
    return download_verified(f"{base}/{repo_path}", dest, sha, timeout=timeout,
                             what=f"the paper reference {repo_path} ({model})")


def fetch_all(model: str, cache_dir, **fetch_kw) -> list[Path]:
    """Every published file of ``model`` in ``cache_dir``, downloaded and verified (see :func:`fetch`)."""
    return [fetch(model, kind, cache_dir, **fetch_kw) for kind in KINDS]


def read_status(paper_dir: str | Path) -> dict:
    """The verdict written by rule ``paper_reference`` into ``paper_dir`` (``applies``, ``reason``, ...)."""
    return json.loads((Path(paper_dir) / STATUS).read_text())


def paper_file(paper_dir: str | Path, model: str, kind: str) -> Path:
    """The authors' file ``kind`` (see :data:`KINDS`) of ``model`` inside ``paper_dir``."""
    return Path(paper_dir) / cache_name(model, kind)


# ---------------------------------------------------------------------------------------------
# Safe loading
# ---------------------------------------------------------------------------------------------

def _numpy_reconstruct():
    try:
        return importlib.import_module("numpy._core.multiarray")._reconstruct
    except ImportError:  # numpy < 1.26 has no numpy._core
        return importlib.import_module("numpy.core.multiarray")._reconstruct


#: Exactly the globals the anomaly-norm pickles reference (numpy float64 arrays written by numpy 2).
NUMPY_SAFE_GLOBALS = [
    (_numpy_reconstruct(), "numpy._core.multiarray._reconstruct"),
    np.ndarray,
    np.dtype,
    np.dtypes.Float64DType,
]


def load_pt(path):
    """``torch.load(path, weights_only=True)`` with :data:`NUMPY_SAFE_GLOBALS` allowlisted; never a full unpickle."""
    import torch

    with torch.serialization.safe_globals(NUMPY_SAFE_GLOBALS):
        return torch.load(path, weights_only=True, map_location="cpu")


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


# ---------------------------------------------------------------------------------------------
# Layer geometry (SD-1.5 / SD-2.x at 512 x 512)
# ---------------------------------------------------------------------------------------------

def paper_layer_shape(name: str, image_size: int = 512) -> tuple[int, int] | None:
    """(channels, spatial) of a U-Net layer output of the SD-1.5 / SD-2.x U-Net (docs/method.md §1.3).

    Handles conv_in / conv_out, ``{down,up}_blocks[i].{resnets,attentions,downsamplers,upsamplers}[j]``,
    ``mid_block.*`` and the block outputs ``down_blocks[i]``, ``mid_block``, ``up_blocks[i]``; spatial scales
    with ``image_size`` (64 latent tokens at 512 px). Other names (e.g. sub-modules inside an attention block,
    whose outputs are not feature maps) give ``None``.
    """
    return layer_shape(name, image_size)  # the SD family's geometry (diffaudit.families.sd)


def _layer_meta(model: str) -> list[tuple]:
    out = []
    for i, name in enumerate(PAPER_LAYERS):
        c, s = paper_layer_shape(name)
        out.append((model, i, name, c, s))
    return out


# ---------------------------------------------------------------------------------------------
# Parsers: the authors' files -> our tidy tables
# ---------------------------------------------------------------------------------------------

def parse_accuracies(path, model: str) -> pd.DataFrame:
    """``accuracies_cls_{m}.pt`` ([45, epochs, 4]) -> long ``position_probe`` table (per_axis, seed 42)."""
    a = _to_numpy(load_pt(path)).astype(np.float64)
    if a.ndim != 3 or a.shape[0] != len(PAPER_LAYERS) or a.shape[2] != len(GRANULARITIES):
        raise ValueError(f"{path}: expected an accuracy tensor [{len(PAPER_LAYERS)}, epochs, "
                         f"{len(GRANULARITIES)}], got shape {a.shape}")
    rows = []
    for meta, acc in zip(_layer_meta(model), a):
        for e in range(a.shape[1]):
            for gi, g in enumerate(GRANULARITIES):
                rows.append((*meta, e + 1, g, "per_axis", PAPER_SEED, float(acc[e, gi])))
    return pd.DataFrame(rows, columns=PROBE_COLUMNS)


def parse_group_similarities(path, model: str) -> pd.DataFrame:
    """``results_group_similarities_{m}.pt`` -> ``token_group_similarity`` table (diagonals and their ratios)."""
    d = load_pt(path)
    if not isinstance(d, Mapping):
        raise ValueError(f"{path}: expected a dict layer -> [R_crop, R_full_ring], got {type(d).__name__}")
    index = {n: i for i, n in enumerate(PAPER_LAYERS)}
    rows = []
    for name, mats in d.items():
        if name not in index:
            raise ValueError(f"{path}: unexpected layer {name!r}")
        rc, rf = (_to_numpy(m).astype(np.float64) for m in mats)
        if rc.shape != (3, 3) or rf.shape != (3, 3):
            raise ValueError(f"{path}: {name}: expected two 3x3 matrices, got {rc.shape} and {rf.shape}")
        c, s = paper_layer_shape(name)
        rows.append({"model": model, "layer_index": index[name], "layer": name, "channels": c, "spatial": s,
                     **ratio_columns(rc, rf)})
    return (pd.DataFrame(rows, columns=list(SIMILARITY_COLUMNS)).sort_values("layer_index", kind="stable")
            .reset_index(drop=True))


def parse_anomaly_norms(mean_path, std_path, labels_path, model: str) -> pd.DataFrame:
    """``up1_anomaly_norms_{mean,std}_{m}.pt`` + the label file -> ``anomaly_rel_norm`` table (source paper)."""
    mean = _to_numpy(load_pt(mean_path)).astype(np.float64).reshape(-1)
    std = _to_numpy(load_pt(std_path)).astype(np.float64).reshape(-1)
    if mean.shape != (len(PAPER_LAYERS),) or std.shape != mean.shape:
        raise ValueError(f"{mean_path}, {std_path}: expected ({len(PAPER_LAYERS)},) arrays, "
                         f"got {mean.shape} and {std.shape}")
    n = int(np.load(labels_path, allow_pickle=False).shape[0])
    rows = [(*meta, "paper", float(m), float(s), n) for meta, m, s in zip(_layer_meta(model), mean, std)]
    return pd.DataFrame(rows, columns=RELNORM_COLUMNS)


def paper_position_probe(model: str, cache_dir, **fetch_kw) -> pd.DataFrame:
    """The published probe accuracies as a ``position_probe`` table (epochs 1..5, granularities 8..64)."""
    return parse_accuracies(fetch(model, "accuracies", cache_dir, **fetch_kw), model)


def paper_token_group_similarity(model: str, cache_dir, **fetch_kw) -> pd.DataFrame:
    """The published corner/border/other similarities as a ``token_group_similarity`` table."""
    return parse_group_similarities(fetch(model, "group_similarities", cache_dir, **fetch_kw), model)


def paper_anomaly_rel_norm(model: str, cache_dir, **fetch_kw) -> pd.DataFrame:
    """The published anomaly relative norms as an ``anomaly_rel_norm`` table (label_source ``paper``)."""
    return parse_anomaly_norms(fetch(model, "anomaly_norms_mean", cache_dir, **fetch_kw),
                               fetch(model, "anomaly_norms_std", cache_dir, **fetch_kw),
                               fetch(model, "labels", cache_dir, **fetch_kw), model)


def paper_tables(model: str, cache_dir, **fetch_kw) -> dict[str, pd.DataFrame]:
    """All three published tables of ``model``, keyed like our CSV file stems (:data:`TABLES`)."""
    return {"position_probe": paper_position_probe(model, cache_dir, **fetch_kw),
            "token_group_similarity": paper_token_group_similarity(model, cache_dir, **fetch_kw),
            "anomaly_rel_norm": paper_anomaly_rel_norm(model, cache_dir, **fetch_kw)}
