"""Resumable extraction: an interrupted run continues to exactly the stores of an uninterrupted run."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from conftest import random_images
from diffaudit.extract import ExtractionSettings, run_extraction
from diffaudit.store import ReprStore, StoreMismatchError

LAYERS = ["conv_in", "down_blocks[1].attentions[0]", "mid_block", "up_blocks[1].upsamplers[0]", "conv_out"]


def _run(pipe, images, out, stop_after=None, seed=42):
    return run_extraction(
        pipe, dataset_images=lambda a, b: images[a:b], image_ids=[f"{i:06d}" for i in range(len(images))],
        labels=[i % 3 for i in range(len(images))], layers=LAYERS,
        settings=ExtractionSettings(batch_size=3, seed=seed), out_dir=out, provenance={"model": "mini"},
        image_size=128, progress=False, stop_after=stop_after)


def _stores_equal(a: Path, b: Path):
    va = sorted(p.name for p in a.glob("*.zarr"))
    assert va == sorted(p.name for p in b.glob("*.zarr")) and va
    for name in va:
        sa, sb = ReprStore(a / name), ReprStore(b / name)
        assert sa.layers == sb.layers and list(sa.image_ids) == list(sb.image_ids)
        for layer in sa.layers:
            assert np.array_equal(sa.array(layer)[:], sb.array(layer)[:]), (name, layer)


def test_interrupted_extraction_resumes_to_identical_stores(mini_pipe, tmp_path):
    images = random_images(8, 128, seed=5)
    ref = _run(mini_pipe, images, tmp_path / "ref")
    assert ref == tmp_path / "ref" and not (tmp_path / "ref.partial").exists()
    # 128 px images: 16x16 maps -> crop8, 8x8 -> crop16; the 2x2 mid_block map is too small to crop
    assert sorted(p.name for p in ref.glob("*.zarr")) == ["crop16.zarr", "crop8.zarr", "full.zarr"]

    out = tmp_path / "run"
    partial = _run(mini_pipe, images, out, stop_after=2)  # two batches of 3, then "killed"
    assert partial == tmp_path / "run.partial" and not out.exists()
    root = zarr.open_group(str(partial / "full.zarr"), mode="r")
    assert root.attrs["n_complete"] == 6 and root.attrs["complete"] is False
    with pytest.raises(Exception, match="incomplete"):
        ReprStore(partial / "full.zarr")
    done = _run(mini_pipe, images, out)
    assert done == out and not partial.exists()
    _stores_equal(ref, out)


def test_resume_refuses_a_different_configuration(mini_pipe, tmp_path):
    images = random_images(6, 128, seed=6)
    _run(mini_pipe, images, tmp_path / "run", stop_after=1)
    with pytest.raises(StoreMismatchError, match=r"seed.*rm -rf"):
        _run(mini_pipe, images, tmp_path / "run", seed=1)


def test_store_is_readable_as_xarray(mini_pipe, tmp_path):
    images = random_images(4, 128, seed=7)
    out = _run(mini_pipe, images, tmp_path / "x")
    store = ReprStore(out / "full.zarr")
    assert store.attrs["mode"] == "paper" and store.attrs["seed"] == 42 and store.attrs["complete"]
    assert store.attrs["library_versions"]["torch"]
    ds = store.dataset("up_blocks[1].upsamplers[0]")
    assert ds["repr"].dims == ("image", "channel", "y", "x") and ds["repr"].dtype == np.float16
    assert list(ds["image"].values) == [f"{i:06d}" for i in range(4)] and list(ds["label"].values) == [0, 1, 2, 0]
    tree = store.to_datatree()
    assert "mid_block" in tree.children and tree["conv_out"].attrs["layer_index"] == 4
    arr = store.array("mid_block")
    assert arr.chunks[0] == 1 and arr.shards[0] == 3  # chunk per image, shard per batch
    crop = ReprStore(out / "crop16.zarr")
    assert crop.layers == ["down_blocks[1].attentions[0]", "up_blocks[1].upsamplers[0]"]
    assert crop.shape("up_blocks[1].upsamplers[0]")[-1] == 6  # 8x8 map -> 112 px crop -> 6x6


@pytest.mark.slow
def test_kill_9_mid_extraction_then_rerun(mini_dir, image_folder, tmp_path):
    """A real SIGKILL during `diffaudit extract`, then a re-run: identical to an uninterrupted run."""
    from diffaudit.datasets import build_folder

    ds = build_folder(image_folder(9, 128), tmp_path / "ds", size=128)
    cfg = {"models": ["mini"], "model_sources": {"mini": str(mini_dir)},
           "dataset": {"source": "folder", "path": str(ds), "n_images": 9, "size": 128},
           "layers": LAYERS, "extraction": {"batch_size": 1, "crops": False}}
    override = tmp_path / "cfg.yaml"
    override.write_text(yaml.safe_dump(cfg))
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "diffaudit.cli", "extract", "mini", str(ds)]
    cfgs = ["--configfile", str(repo / "params.yaml"), str(override)]
    subprocess.run(cmd + [str(tmp_path / "ref")] + cfgs, check=True, capture_output=True)

    out = tmp_path / "run"
    proc = subprocess.Popen(cmd + [str(out)] + cfgs, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    full = tmp_path / "run.partial" / "full.zarr"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if zarr.open_group(str(full), mode="r").attrs.get("n_complete", 0) >= 3:
                break
        except Exception:  # noqa: BLE001 - store not created yet
            pass
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the killed run must not leave a complete-looking output"
    n = zarr.open_group(str(full), mode="r").attrs["n_complete"]
    assert 3 <= n < 9
    subprocess.run(cmd + [str(out)] + cfgs, check=True, capture_output=True)
    _stores_equal(tmp_path / "ref", out)


def test_a_planted_infinite_activation_stops_the_run_naming_layer_and_image(mini_pipe, tmp_path):
    """An inf in the second image's map of one layer stops the run, before that batch is written, with one line that
    names the model, the layer and the image."""
    from diffaudit.extract import NonFiniteError
    from diffaudit.layers import resolve_layers

    layer = "mid_block"  # a tensor output
    module = resolve_layers(mini_pipe.unet, [layer])[layer]

    def plant(_module, _inputs, output):
        if output.shape[0] > 1:
            output = output.clone()
            output[1, 0, 0, 0] = float("inf")
        return output

    handle = module.register_forward_hook(plant)
    try:
        with pytest.raises(NonFiniteError, match=rf"^non-finite values \(inf/NaN\) in layer {re.escape(layer)} of "
                                                 r"image 000001 of model mini; .*bfloat16 or float32$"):
            _run(mini_pipe, random_images(6, 128, seed=3), tmp_path / "rep")
    finally:
        handle.remove()
    assert not (tmp_path / "rep").exists()
