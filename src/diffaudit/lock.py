"""The weights lock (``models.lock``): which files, byte for byte, each configured model was computed from.

``diffaudit lock`` (on a machine with the hub) resolves every configured model the way the extraction does
(:func:`diffaudit.models.resolve_snapshot`: the main id, then its mirrors) and writes, per model, the hub id
actually used, the revision asked for, the resolved commit, and the sha256 and size of every file of the
snapshot that the pipeline loads. The lock is committed with the repository and is an input of the extraction,
which checks the snapshot it is about to load against it before its first batch (:func:`check`): a differing,
missing or unexpected file stops the run with one line naming the file, both hashes and how to re-lock; a model
without an entry runs with a warning. The hub cache names each large (LFS) file by its sha256 (``blobs/<sha256>``),
so a check reads the link, not the gigabytes; small files (configs, tokenizers) are hashed. The embedded models
are built from seeded code by the workflow itself and are not locked.

The file is YAML: ``models: {<model>: {source, requested, revision, commit, files: {<path>: {sha256, size}}}}``.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import yaml

from .errors import UserError
from .hubcache import sha256_file
from .layout import MODELS_LOCK

#: The lock file, at the repository root (an input of rule ``extract``).
LOCK_FILE = MODELS_LOCK
#: Files a snapshot may hold that ``from_pretrained(..., use_safetensors=True)`` never loads: left out of the lock.
NOT_LOADED = (".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".pb", ".gguf")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
HEADER = ("# The weights lock: the files each model was computed from (sha256 and size), written by `diffaudit lock`\n"
          "# on a machine with the Hugging Face hub. Commit it; the extraction checks every model against it.\n")
log = logging.getLogger(__name__)


class LockMismatch(UserError):
    """A model's files differ from ``models.lock`` (the message is one line naming the file)."""


def file_digest(path: Path) -> str:
    """The sha256 of a snapshot file: the hub cache's blob name when the file links to one named by its sha256
    (the large LFS files), else hashed."""
    if path.is_symlink():
        target = Path(os.readlink(path))
        if _SHA256.match(target.name):
            return target.name
    return sha256_file(path)


def snapshot_files(folder: str | Path) -> dict[str, dict]:
    """``{relative path: {sha256, size}}`` of the files of a snapshot (or local diffusers directory) that the
    pipeline loads (every file but those :data:`NOT_LOADED`)."""
    folder = Path(folder)
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_dir() or rel.endswith(NOT_LOADED) or any(part.startswith(".") for part in Path(rel).parts):
            continue
        out[rel] = {"sha256": file_digest(p), "size": p.stat().st_size}
    return out


def file_hashes(folder: str | Path) -> dict[str, str]:
    """``{relative path: sha256}`` of :func:`snapshot_files`."""
    return {k: v["sha256"] for k, v in snapshot_files(folder).items()}


def _key(f: dict | None) -> tuple | None:
    return None if f is None else (f["sha256"], int(f["size"]))


def lock_entry(spec, snapshot) -> dict:
    """The lock entry of a model: where its files came from and their hashes."""
    return {"source": snapshot.source, "requested": spec.source, "revision": snapshot.revision,
            "commit": snapshot.commit, "files": snapshot_files(snapshot.path)}


def read_lock(path: str | Path = LOCK_FILE) -> dict:
    """The lock's ``models`` mapping (empty when the file does not exist or locks nothing)."""
    path = Path(path)
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    models = data.get("models") or {}
    if not isinstance(models, dict):
        raise UserError(f"{path}: expected `models:` to map model names to entries; re-write it with `diffaudit lock`")
    return models


def write_lock(entries: dict, path: str | Path = LOCK_FILE, keep: bool = True) -> Path:
    """Write (or with ``keep`` update) the lock with ``entries`` (model -> :func:`lock_entry`)."""
    path = Path(path)
    models = {**(read_lock(path) if keep else {}), **entries}
    path.write_text(HEADER + yaml.safe_dump({"models": dict(sorted(models.items()))}, sort_keys=True, width=120))
    return path


def lock_models(cfg: dict, models: list[str] | None = None, path: str | Path = LOCK_FILE) -> Path:
    """Resolve each model (default: the configured ``models``) and write their entries into the lock (the other
    entries stay). Embedded models are skipped (built from code)."""
    from .models import embedded_model, resolve_model, resolve_snapshot

    entries = {}
    for model in models or cfg["models"]:
        spec = resolve_model(model, cfg["model_sources"])
        if embedded_model(spec.source):
            log.info("%s: an embedded model, built from seeded code by the workflow; not locked", model)
            continue
        snap = resolve_snapshot(spec)
        entries[model] = lock_entry(spec, snap)
        log.info("%s: %s @ %s, %d files", model, snap.source, snap.commit, len(entries[model]["files"]))
    return write_lock(entries, path)


def _describe(f: dict | None, absent: str) -> str:
    return absent if f is None else f"sha256 {f['sha256']} ({f['size']} bytes)"


def check(model: str, snapshot, path: str | Path = LOCK_FILE) -> dict[str, str]:
    """Check ``snapshot``'s files against the lock entry of ``model``; returns ``{file: sha256}`` of the files
    (what the store records). No entry: a warning, and the hashes of a hub snapshot are returned as they are (those
    of a local directory only when locked: hashing it would re-read every weight). A differing, missing or
    unlocked file raises :class:`LockMismatch` (one line)."""
    entry = read_lock(path).get(model)
    if entry is None:
        log.warning("%s: no entry in %s, so its weights are not checked; lock them with `diffaudit lock` (on a "
                    "machine with the hub) and commit %s", model, path, path)
        return file_hashes(snapshot.path) if snapshot.commit else {}
    files = snapshot_files(snapshot.path)
    locked = entry.get("files") or {}
    fix = (f"if the new files are intended, re-lock with `diffaudit lock --models {model}` and commit {path}; "
           f"otherwise pin model_sources.{model}.revision to the locked commit {entry.get('commit')}")
    for name in sorted(set(locked) | set(files)):
        have, want = files.get(name), locked.get(name)
        if _key(have) != _key(want):
            raise LockMismatch(f"model {model}: {name} {_describe(have, 'is absent')} in {snapshot.source} @ "
                               f"{snapshot.commit or snapshot.path} but {path} says "
                               f"{_describe(want, 'it is not part of the model')}; {fix}")
    return {k: v["sha256"] for k, v in files.items()}
