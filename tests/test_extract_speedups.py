"""Extraction speed-ups change no stored value: the U-Net pass stopped after the last layer a variant needs, the
conversion to the store dtype before the copy, one writer thread for all variants, glibc heap reuse on the CPU."""
import numpy as np
import pytest
import torch

from conftest import random_images
from diffaudit import extract
from diffaudit.extract import (
    ExtractionSettings,
    Extractor,
    _BackgroundWriter,
    cpu_heap_reuse,
    crop_image,
    hooked_pass,
    plan_variants,
    run_extraction,
)
from diffaudit.families.sd import PAPER_LAYERS
from diffaudit.store import ReprStore

PX = 128  # mini at 128 px: 16x16 latents, crop variants of 8 and 16 px tokens


def _hooks(unet) -> int:
    return sum(len(m._forward_hooks) for m in unet.modules())


def _complete(ex: Extractor, *args, **kw):
    """``run_batch`` with a complete U-Net pass (what the extractor knows about its layers forgotten first)."""
    ex._runs = None
    return ex.run_batch(*args, **kw)


@pytest.mark.parametrize("mode", ["paper", "corrected"])
def test_stopped_pass_equals_complete_pass_for_every_variant(mini_pipe, mode):
    images = random_images(2, PX, seed=11)
    ex = Extractor(mini_pipe, list(PAPER_LAYERS), ExtractionSettings(mode=mode))
    plan = plan_variants(ex.layer_shapes, list(PAPER_LAYERS), PX)
    assert [v.name for v in plan] == ["full", "crop8", "crop16"]
    assert ex._runs is None  # the probes ran on the meta device; the first real pass (full, all layers) is complete
    calls = []
    handle = mini_pipe.unet.conv_out.register_forward_hook(lambda *a: calls.append(1))
    try:
        for v in plan:
            imgs = [crop_image(im, v.crop_px) for im in images] if v.crop_px else images
            kw = dict(layers=v.layers, crop_px=v.crop_px, full_size=PX if v.crop_px else None)
            calls.clear()
            stopped = ex.run_batch(imgs, [0, 1], **kw)
            ran_to_the_end = bool(calls)
            assert ex._runs is not None and set(ex._runs.values()) == {1}
            complete = _complete(ex, imgs, [0, 1], **kw)
            assert list(stopped) == list(complete) == v.layers
            for layer in v.layers:
                assert stopped[layer].dtype == torch.float32
                assert torch.equal(stopped[layer], complete[layer]), (v.name, layer)
            # the crop of 16 px tokens needs no layer of the last up block: its pass stops before conv_out
            assert ran_to_the_end == (v.name in ("full", "crop8")), v.name
            half = ex.run_batch(imgs, [0, 1], out_dtype=torch.float16, **kw)
            for layer in v.layers:
                assert half[layer].dtype == torch.float16
                assert np.array_equal(half[layer].numpy().view(np.uint16),
                                      complete[layer].numpy().astype(np.float16).view(np.uint16)), (v.name, layer)
    finally:
        handle.remove()
    assert _hooks(mini_pipe.unet) == 0


@pytest.mark.parametrize("padding_mode", [None, "circular"])
def test_meta_probe_shapes_equal_the_real_passes(mini_pipe, padding_mode):
    settings = ExtractionSettings(padding_mode=padding_mode)
    ex = Extractor(mini_pipe, list(PAPER_LAYERS), settings)
    real = Extractor(mini_pipe, list(PAPER_LAYERS), settings)
    real._meta = False  # no meta model: the U-Net itself is probed
    calls = []
    for px in (PX, PX - 16, 96):
        handle = mini_pipe.unet.conv_in.register_forward_hook(lambda *a: calls.append(1))
        try:
            meta = ex.layer_shapes(px)
        finally:
            handle.remove()
        assert meta == real.layer_shapes(px)
    assert calls == []  # the real U-Net did not run for the meta probes
    assert ex._meta_runs is not None and set(ex._meta_runs.values()) == {1}  # later meta probes stop early
    assert ex._shape_model() is not None and real._shape_model() is None
    assert next(ex._shape_model()[0].parameters()).device.type == "meta"
    assert _hooks(mini_pipe.unet) == 0


def test_meta_probe_reports_a_padding_too_large_as_the_real_pass_does(mini_pipe):
    ex = Extractor(mini_pipe, ["conv_out"], ExtractionSettings(padding_mode="reflect"))
    with pytest.raises(RuntimeError, match="Padding size should be less"):
        ex.layer_shapes(64)
    assert {m.padding_mode for m in mini_pipe.unet.modules() if isinstance(m, torch.nn.Conv2d)} == {"zeros"}
    assert _hooks(mini_pipe.unet) == 0


def test_store_dtype_conversion_before_the_copy_equals_numpy_astype():
    """fp32 -> fp16 in torch (in the hook) is bitwise numpy's astype (what the store did): rounding to nearest even,
    ties, subnormals, overflow to inf, signed zeros."""
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.standard_normal(100_000).astype(np.float32) * np.float32(10.0) ** rng.integers(-9, 6, 100_000),
        np.array([0.0, -0.0, 65504.0, 65519.99, 65520.0, -70000.0, 6e-8, 3e-8, 2.9802322e-08, 1e-45, np.inf, -np.inf],
                 dtype=np.float32),
        # exact halfway cases between neighbouring fp16 values (ties to even)
        (np.arange(1024, 2048, dtype=np.float32) + np.float32(0.5)) * np.float32(2.0 ** -10),
    ])
    ours = torch.from_numpy(x).to("cpu", dtype=torch.float16).numpy()
    with np.errstate(over="ignore"):
        theirs = x.astype(np.float16)
    assert np.array_equal(ours.view(np.uint16), theirs.view(np.uint16))


def test_hooks_removed_after_errors_and_stops(mini_pipe):
    unet = mini_pipe.unet
    ex = Extractor(mini_pipe, ["conv_in", "mid_block", "conv_out"], ExtractionSettings())
    images = random_images(1, 64, seed=2)
    ex.run_batch(images, [0])  # complete pass: learns that every layer runs once
    assert ex._runs == {"conv_in": 1, "mid_block": 1, "conv_out": 1}
    assert _hooks(unet) == 0
    ex.run_batch(images, [0], layers=["conv_in"])  # stopped right after conv_in
    assert _hooks(unet) == 0

    def boom(name, out):
        raise KeyError(name)

    with pytest.raises(KeyError, match="mid_block"):
        hooked_pass(unet, ex.modules, ["mid_block"], boom, ex._runs, *_inputs(ex, 64))
    assert _hooks(unet) == 0
    # reflect padding on too small maps: translated error, hooks gone, padding modes restored
    bad = Extractor(mini_pipe, ["conv_out"], ExtractionSettings(padding_mode="reflect"))
    with pytest.raises(ValueError, match="needs every feature map larger than its padding"):
        bad.run_batch(images, [0])
    assert _hooks(unet) == 0 and bad._runs is None
    assert {m.padding_mode for m in unet.modules() if isinstance(m, torch.nn.Conv2d)} == {"zeros"}


def _inputs(ex, px):
    lat = torch.zeros((1, ex.unet.config.in_channels, px // 8, px // 8))
    return lat, torch.tensor(50), ex._encode([""])


def test_a_module_that_runs_twice_is_never_cut_short():
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

        def forward(self, x):
            return self.a(self.b(self.a(x)))

    net = Twice()
    modules = {"a": net.a, "b": net.b}
    got = {}
    x = torch.ones(1, 2)
    runs = hooked_pass(net, modules, ["a", "b"], got.__setitem__, None, x)
    assert runs == {"a": 2, "b": 1}
    last = got["a"].clone()
    got.clear()
    assert hooked_pass(net, modules, ["a"], got.__setitem__, runs, x) is not None  # not stopped: "a" runs again
    assert torch.equal(got["a"], last)
    assert hooked_pass(net, {"b": net.b}, ["b"], got.__setitem__, runs, x) is None  # stopped after "b"
    assert sum(len(m._forward_hooks) for m in net.modules()) == 0


def test_run_extraction_stores_equal_complete_passes(mini_pipe, tmp_path):
    """End to end: every stored map is the float16 of a complete U-Net pass (numpy's astype), all variants."""
    images = random_images(3, PX, seed=5)
    settings = ExtractionSettings(batch_size=2)
    out = run_extraction(mini_pipe, dataset_images=lambda a, b: images[a:b], image_ids=["a", "b", "c"],
                         labels=[0, 1, 2], layers=list(PAPER_LAYERS), settings=settings, out_dir=tmp_path / "r",
                         provenance={"model": "mini"}, image_size=PX, progress=False)
    ref = Extractor(mini_pipe, list(PAPER_LAYERS), settings)
    plan = plan_variants(ref.layer_shapes, list(PAPER_LAYERS), PX)
    for v in plan:
        store = ReprStore(out / f"{v.name}.zarr")
        for start in (0, 2):
            imgs = images[start:start + 2]
            imgs = [crop_image(im, v.crop_px) for im in imgs] if v.crop_px else imgs
            reps = _complete(ref, imgs, range(start, start + len(imgs)), layers=v.layers, crop_px=v.crop_px,
                             full_size=PX if v.crop_px else None)
            for layer in v.layers:
                want = reps[layer].numpy().astype(np.float16)
                got = np.asarray(store.array(layer)[start:start + len(imgs)])
                assert got.dtype == np.float16
                assert np.array_equal(got.view(np.uint16), want.view(np.uint16)), (v.name, layer)
    assert _hooks(mini_pipe.unet) == 0


def test_background_writer_serves_several_stores_and_reraises(tmp_path):
    class Fake:
        def __init__(self, fail=False):
            self.calls, self.fail = [], fail

        def write_batch(self, start, batch):
            if self.fail:
                raise OSError("disk full")
            self.calls.append(("write", start, sorted(batch)))

        def finalize(self):
            self.calls.append(("finalize",))

    a, b = Fake(), Fake()
    bg = _BackgroundWriter()
    bg.put(0, {"x": np.zeros(1)}, writer=a)
    bg.finalize(a)
    bg.put(0, {"y": np.zeros(1)}, writer=b)
    bg.put(1, {"y": np.zeros(1)}, writer=b)
    bg.close()
    assert a.calls == [("write", 0, ["x"]), ("finalize",)]
    assert b.calls == [("write", 0, ["y"]), ("write", 1, ["y"])]

    bad, after = Fake(fail=True), Fake()
    bg = _BackgroundWriter(bad)
    with pytest.raises(OSError, match="disk full"):  # raised by the next call (put, finalize or close)
        try:
            bg.put(0, {})
            bg.finalize()
            bg.put(0, {}, writer=after)
        finally:
            bg.close()
    assert after.calls == []  # nothing written after an error
    assert not bg.thread.is_alive()


def test_cpu_heap_reuse_sets_and_restores_glibc_thresholds(monkeypatch):
    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

        def malloc_trim(self, pad):
            calls.append(("trim", pad))
            return 1

    monkeypatch.setattr(extract.memory, "_glibc", lambda: FakeLibc())
    with cpu_heap_reuse():
        with cpu_heap_reuse():  # nested: set once, restored once
            pass
        assert calls == list(extract.memory._HEAP_REUSE.items())
    assert calls[2:] == [*extract.memory._HEAP_AFTER.items(), ("trim", 0)]
    calls.clear()
    with cpu_heap_reuse(enabled=False):
        pass
    assert calls == []
    with pytest.raises(RuntimeError):
        with cpu_heap_reuse():
            raise RuntimeError
    assert calls[-1] == ("trim", 0)
