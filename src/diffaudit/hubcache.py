"""A Hugging Face hub cache written from a local diffusers directory, offline.

The hub's cache (``HF_HUB_CACHE``, by default ``~/.cache/huggingface/hub``) keeps a repository as
``models--<owner>--<name>/`` with ``blobs/<sha256>`` (each large file once, named by its content hash; small files
by their git blob hash, here also their sha256), ``snapshots/<commit>/<path>`` (links into ``blobs``) and
``refs/<branch>`` (the commit a branch points to). :func:`write_snapshot` writes that layout from a directory
written by ``save_pretrained``, so that ``from_pretrained("<owner>/<name>")`` with ``HF_HUB_OFFLINE=1`` loads it
exactly as it loads a downloaded model: by id, by branch or by commit. The tests use it for the hub path, and the
full-size rehearsal for its seeded pipelines.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def repo_folder(cache_dir: str | Path, repo_id: str) -> Path:
    """The cache folder of a model repository: ``models--owner--name``."""
    return Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_snapshot(src: str | Path, cache_dir: str | Path, repo_id: str, branch: str = "main",
                   commit: str | None = None, link: bool = False) -> str:
    """Put the files of ``src`` (a diffusers directory) into ``cache_dir`` as repository ``repo_id`` at ``branch``;
    returns the commit (40 hex digits; by default derived from the files' paths and hashes, so the same files give
    the same commit). ``link``: hard-link the blobs to ``src``'s files instead of copying them (same file system;
    full-size models)."""
    src = Path(src)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    hashes = {p.relative_to(src).as_posix(): sha256_file(p) for p in files}
    if commit is None:
        commit = hashlib.sha1("".join(f"{k}\0{v}\n" for k, v in hashes.items()).encode()).hexdigest()
    repo = repo_folder(cache_dir, repo_id)
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap = repo / "snapshots" / commit
    for rel, digest in hashes.items():
        blob = repo / "blobs" / digest
        if not blob.exists():
            if link:
                os.link(src / rel, blob)
            else:
                shutil.copyfile(src / rel, blob)
        entry = snap / rel
        entry.parent.mkdir(parents=True, exist_ok=True)
        if entry.is_symlink() or entry.exists():
            entry.unlink()
        os.symlink(os.path.relpath(blob, entry.parent), entry)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / branch).write_text(commit)
    return commit
