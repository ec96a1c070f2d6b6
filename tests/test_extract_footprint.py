"""Extraction footprint (bytes estimated before the first batch vs bytes written, the disk-space stop, resumed
runs), the paper run's footprint table, and the cuDNN flags around extraction."""
import logging
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import random_images
from diffaudit.extract import (
    ExtractionSettings,
    Extractor,
    InsufficientDiskSpaceError,
    disk_margin,
    extraction_footprint,
    plan_variants,
    run_extraction,
)
from diffaudit.footprint import model_footprint
from diffaudit.store import ReprStore

# layers of every resolution of the mini model at 256 px: 32x32, 16x16, 8x8, 4x4 (no crop), and conv_out
LAYERS = ["conv_in", "down_blocks[0].attentions[1]", "down_blocks[1].resnets[0]", "down_blocks[2].attentions[0]",
          "mid_block", "up_blocks[1].upsamplers[0]", "up_blocks[3].attentions[2]", "conv_out"]
N, PX, BATCH = 7, 256, 3  # the last batch (and shard) is partial

Usage = namedtuple("Usage", "total used free")


def _run(pipe, images, out, settings=None, stop_after=None, images_fn=None):
    return run_extraction(
        pipe, dataset_images=images_fn or (lambda a, b: images[a:b]),
        image_ids=[f"n01440764_{i:05d}" for i in range(len(images))], labels=[i % 5 for i in range(len(images))],
        layers=LAYERS, settings=settings or ExtractionSettings(batch_size=BATCH), out_dir=out,
        provenance={"model": "mini"}, image_size=PX, progress=False, stop_after=stop_after)


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _fake_free(monkeypatch, free: int):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10 * free + 1, 9 * free, int(free)))


def _plan_and_configs(pipe, out, settings):
    """The footprint run_extraction computes (same plan and store configurations)."""
    ex = Extractor(pipe, LAYERS, settings)
    plan = plan_variants(ex.layer_shapes, LAYERS, PX, settings.crops)
    base = {"model": "mini", **settings.config(), "device": "cpu", "compute_dtype": "float32", "image_size": PX}
    configs = {v.name: {**base, "variant": v.name, **({"crop_px": v.crop_px} if v.crop_px else {})} for v in plan}
    ids = [f"n01440764_{i:05d}" for i in range(N)]
    work = Path(out).with_name(Path(out).name + ".partial")
    return plan, extraction_footprint(plan, work, ids, configs, settings)


def test_estimate_equals_bytes_written(mini_pipe, tmp_path, caplog):
    images = random_images(N, PX, seed=8)
    with caplog.at_level(logging.INFO, logger="diffaudit.extract"):
        out = _run(mini_pipe, images, tmp_path / "r")
    lines = [r.getMessage() for r in caplog.records if "extraction footprint" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0] and str(tmp_path / "r.partial") in lines[0]
    assert f"{N} images x {len(LAYERS)} layers, float16" in lines[0] and "free there" in lines[0]

    plan, fp = _plan_and_configs(mini_pipe, tmp_path / "other", ExtractionSettings(batch_size=BATCH))
    variants = sorted(p.name[:-5] for p in out.glob("*.zarr"))
    assert variants == sorted(fp.total) == ["crop16", "crop32", "crop8", "full"]
    assert fp.remaining == fp.total
    for v in plan:  # the planned shapes are those stored
        store = ReprStore(out / f"{v.name}.zarr")
        assert store.layers == v.layers
        assert {layer: store.shape(layer)[1:] for layer in v.layers} == v.shapes
    for name in variants:
        actual = _bytes(out / f"{name}.zarr")
        assert abs(fp.total[name] - actual) <= 0.03 * actual, (name, fp.total[name], actual)
    actual = sum(_bytes(out / f"{name}.zarr") for name in variants)
    assert actual <= fp.needed <= 1.02 * actual
    # the data term alone is exact: channels x height x width x images x itemsize
    s = plan[0].shapes
    data = N * 2 * sum(int(np.prod(x)) for x in s.values())
    written = sum(f.stat().st_size for f in (out / "full.zarr").rglob("*") if f.is_file() and "/repr/c/" in f.as_posix())
    index = len(s) * 3 * (16 * BATCH + 4)  # 3 shards of 3 images, each with a chunk index + checksum
    assert written == data + index


def test_not_enough_space_stops_before_anything_is_written(mini_pipe, tmp_path, monkeypatch, capsys):
    from diffaudit.errors import DiffauditError, run_task

    images = random_images(N, PX, seed=8)
    calls = []
    _fake_free(monkeypatch, 10**5)  # 0.1 MB: less than the ~3 MB this extraction needs
    out = tmp_path / "res" / "mini" / "representations"
    with pytest.raises(InsufficientDiskSpaceError) as e:
        _run(mini_pipe, images, out, images_fn=lambda a, b: calls.append((a, b)) or images[a:b])
    msg = str(e.value)
    assert isinstance(e.value, DiffauditError) and "\n" not in msg
    assert "not enough disk space" in msg and str(out.with_name("representations.partial")) in msg
    needed = float(msg.split("it needs ")[1].split(" MB")[0])
    assert 2 < needed < 5 and "0.1 MB free" in msg
    for hint in ("free space", "`layers`", "`dataset.n_images`", "`extraction.crops: false` (saves", "results_dir"):
        assert hint in msg, hint
    assert calls == [] and not (tmp_path / "res").exists()

    # through the workflow's task runner: one line on stderr, exit status 1
    with pytest.raises(SystemExit) as ex:
        run_task(_run, mini_pipe, images, out)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("diffaudit error:")]
    assert ex.value.code == 1 and len(errors) == 1 and errors[0].startswith("diffaudit error: not enough disk space")
    assert not (tmp_path / "res").exists()

    # without crops the need shrinks to the full store, and the message no longer suggests it
    with pytest.raises(InsufficientDiskSpaceError) as e:
        _fake_free(monkeypatch, 10**5)
        _run(mini_pipe, images, out, settings=ExtractionSettings(batch_size=BATCH, crops=False))
    assert "extraction.crops" not in str(e.value) and not (tmp_path / "res").exists()


def test_resumed_run_needs_only_the_remaining_bytes(mini_pipe, tmp_path, monkeypatch):
    images = random_images(N, PX, seed=8)
    settings = ExtractionSettings(batch_size=BATCH)
    out = tmp_path / "r"
    partial = _run(mini_pipe, images, out, stop_after=1)  # one batch of 3 images of the full variant
    _, fp = _plan_and_configs(mini_pipe, out, settings)
    assert fp.done == {"full": BATCH, "crop8": 0, "crop16": 0, "crop32": 0}
    per_image = 2 * sum(int(np.prod(s)) for s in _plan_and_configs(mini_pipe, out, settings)[0][0].shapes.values())
    done_bytes = fp.total["full"] - fp.remaining["full"]
    assert BATCH * per_image < done_bytes < BATCH * per_image * 1.1 + 20_000
    assert {k: v for k, v in fp.remaining.items() if k != "full"} == {k: v for k, v in fp.total.items() if k != "full"}
    assert _bytes(partial / "full.zarr") == pytest.approx(done_bytes, rel=0.05)
    # enough free space for what is left, not for the whole extraction: the resumed run goes through
    total = sum(fp.total.values())
    free = fp.needed + disk_margin(fp.needed) + 1
    assert free < total + disk_margin(total)
    _fake_free(monkeypatch, free)
    assert _run(mini_pipe, images, out) == out
    # the same space does not suffice for a fresh run
    with pytest.raises(InsufficientDiskSpaceError):
        _run(mini_pipe, images, tmp_path / "fresh")
    assert not (tmp_path / "fresh.partial").exists()


def test_cudnn_flags_are_restored_after_extraction(mini_pipe, tmp_path):
    images = random_images(4, 128, seed=9)
    seen = []
    handle = mini_pipe.unet.register_forward_hook(
        lambda *_: seen.append((torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)))
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
        settings = ExtractionSettings(batch_size=2, crops=False)
        run_extraction(mini_pipe, dataset_images=lambda a, b: images[a:b], image_ids=list("abcd"), labels=None,
                       layers=["mid_block"], settings=settings, out_dir=tmp_path / "r", provenance={},
                       image_size=128, progress=False)
        assert seen and set(seen) == {(True, False)}  # every U-Net pass ran deterministic, without autotuning
        assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (False, True)
        # also when the extraction fails midway, and after a bare Extractor batch
        with pytest.raises(RuntimeError, match="boom"):
            run_extraction(mini_pipe, dataset_images=lambda a, b: (_ for _ in ()).throw(RuntimeError("boom")),
                           image_ids=list("abcd"), labels=None, layers=["mid_block"], settings=settings,
                           out_dir=tmp_path / "s", provenance={}, image_size=128, progress=False)
        assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (False, True)
        Extractor(mini_pipe, ["mid_block"], settings).run_batch(images[:1], [0])
        assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (False, True)
    finally:
        handle.remove()
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def test_paper_footprint_from_the_real_architectures():
    """SD-1.5 and SD-2.1 (= SD-Turbo) share the layer shapes at 512 px; bytes, parameters and FLOPs are exact."""
    from test_extract import SD15_SPATIAL

    r15 = model_footprint("sd15", crops=False)
    rt = model_footprint("sdturbo", crops=False)
    # 45 layers, 500 images, float16: 29,671,424 values per image (docs/method.md §1.3 shapes)
    per_image = 29_671_424
    assert r15["disk_bytes"]["full"] == rt["disk_bytes"]["full"]
    assert 500 * 2 * per_image < r15["disk_bytes"]["full"] < 500 * 2 * per_image * 1.001
    assert r15["params"] == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    assert rt["params"] == {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840}
    assert r15["gpu_weights_bytes"] == 2 * sum(r15["params"].values())
    # one U-Net pass at 64x64 is ~0.80 TFLOP, one VAE encode at 512 px ~1.12 TFLOP
    assert r15["flops"] / 500 == pytest.approx(0.803e12 + 1.117e12, rel=0.01)
    assert 5e9 < r15["gpu_activation_bytes"] < 10e9  # batch 20: dominated by the VAE encoder at 512 px
    assert len(SD15_SPATIAL) == r15["n_layers"] == 45
