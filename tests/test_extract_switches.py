"""Extraction switches and safeguards: the posterior sample under independent noise, the padding's scope, the paper
mode's last partial batch, counting non-finite maps, TF32 off in float32, SDXL-style latent statistics, float32
stores for every family, and random draws that do not depend on the device."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import random_images
from diffaudit import experiments
from diffaudit.extract import ExtractionSettings, Extractor, no_tf32, run_extraction
from diffaudit.extract.extractor import POSTERIOR_STREAM
from diffaudit.store import ReprStore

SF = 0.18215  # the mini VAE's scaling_factor


def _encode_dist(pipe, images, pixel_range="unit"):
    x = torch.tensor(np.array([np.asarray(im) for im in images]), dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
    if pixel_range == "symmetric":
        x = 2 * x - 1
    with torch.no_grad():
        return pipe.vae.encode(x).latent_dist


# ---------------------------------------------------------------------------------------------
# 3a: noise independent decorrelates the posterior sample too
# ---------------------------------------------------------------------------------------------

def test_independent_noise_draws_each_images_posterior_sample(mini_pipe):
    """The same pixels at dataset indices i and i + batch_size: with noise independent, other posterior samples
    (drawn from a CPU generator seeded by (seed, index) in a stream of its own); with shared noise (corrected mode)
    and in paper mode, the draws are exactly what they were: one per batch slot."""
    img = random_images(1, 64, seed=5)[0]
    pair = [img, img]
    ind = Extractor(mini_pipe, ["conv_in"], ExtractionSettings(mode="corrected", latent="sample", seed=7,
                                                                batch_size=2))
    a, b = ind.encode(pair, [0, 1]), ind.encode(pair, [2, 3])
    assert not torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1]) and not torch.equal(a[0], a[1])
    # the draw is the CPU generator's, seeded by (seed, index) apart from the forward noise's stream
    dist = _encode_dist(mini_pipe, pair, "symmetric")
    g = torch.Generator("cpu").manual_seed(7 * 1_000_003 + 3 + POSTERIOR_STREAM)
    eps = torch.randn(dist.mean.shape[1:], generator=g, dtype=torch.float32)
    assert torch.allclose(b[1], (dist.mean[1] + dist.std[1] * eps) * SF, atol=1e-6)
    assert not torch.allclose(ind.posterior_noise([3], eps.shape[-2:])[0], ind.corrected_noise([3], eps.shape[-2:])[0])

    # shared (corrected mode): one CPU draw seeded by the seed, so slot k of every batch gets the same noise
    shared = Extractor(mini_pipe, ["conv_in"], ExtractionSettings(mode="corrected", latent="sample", noise="shared",
                                                                   seed=7, batch_size=2))
    s0, s1 = shared.encode(pair, [0, 1]), shared.encode(pair, [2, 3])
    assert torch.equal(s0, s1)
    assert torch.equal(s0, dist.sample(generator=torch.Generator("cpu").manual_seed(7)) * SF)

    # paper mode: the global generator reseeded, as sdhelper draws it
    paper = Extractor(mini_pipe, ["conv_in"], ExtractionSettings(mode="paper", batch_size=2))
    p0 = paper.encode(pair, [0, 1])
    torch.manual_seed(42)
    assert torch.equal(p0, _encode_dist(mini_pipe, pair).sample() * SF)
    assert torch.equal(p0, paper.encode(pair, [2, 3]))


# ---------------------------------------------------------------------------------------------
# 3b: padding_scope
# ---------------------------------------------------------------------------------------------

def test_downsampler_zero_pad_takes_the_padding_mode():
    """diffusers' Downsample2D(padding=0) pads (0, 1, 0, 1) with zeros before its stride-2 convolution: under
    conv_padding that pad takes the mode; afterwards it is zeros again and no hook is left."""
    from diffusers.models.downsampling import Downsample2D

    from diffaudit.extract import conv_padding

    torch.manual_seed(0)
    ds = Downsample2D(3, use_conv=True, padding=0).eval()
    x = torch.randn(2, 3, 8, 8)
    w, b = ds.conv.weight, ds.conv.bias
    with torch.no_grad():
        zero = ds(x)
        assert torch.equal(zero, F.conv2d(F.pad(x, (0, 1, 0, 1)), w, b, stride=2))
        for mode in ("circular", "reflect", "replicate"):
            with conv_padding(ds, mode):
                out = ds(x)
            assert torch.allclose(out, F.conv2d(F.pad(x, (0, 1, 0, 1), mode=mode), w, b, stride=2), atol=1e-6)
            assert not torch.allclose(out, zero)
        assert torch.equal(ds(x), zero) and not ds.conv._forward_pre_hooks


def test_padding_scope_vae_changes_the_vae_and_denoiser_leaves_the_latents(mini_pipe):
    imgs = random_images(2, 64, seed=2)
    base = Extractor(mini_pipe, ["conv_in"], ExtractionSettings()).encode(imgs, [0, 1])
    den = Extractor(mini_pipe, ["conv_in"], ExtractionSettings(padding_mode="circular"))
    assert torch.equal(den.encode(imgs, [0, 1]), base)  # the default scope: the backbone only

    # what the VAE downsamplers' convolutions receive: their padded input (last row and column = the pad)
    from diffaudit.extract.hooks import _zero_padded_downsamplers

    downs = _zero_padded_downsamplers(mini_pipe.vae.encoder)
    assert len(downs) == 3
    seen = []
    handles = [m.conv.register_forward_hook(lambda _m, args, _o: seen.append(args[0])) for m in downs]
    try:
        vae = Extractor(mini_pipe, ["conv_in"], ExtractionSettings(padding_mode="circular", padding_scope="vae"))
        lat = vae.encode(imgs, [0, 1])
        circ = list(seen)
        seen.clear()
        den.encode(imgs, [0, 1])
    finally:
        for h in handles:
            h.remove()
    assert lat.shape == base.shape and not torch.allclose(lat, base)
    assert len(circ) == 3 and all(torch.equal(x[..., -1, :], x[..., 0, :]) and torch.equal(x[..., :, -1], x[..., :, 0])
                                  for x in circ)
    assert len(seen) == 3 and all(not x[..., -1, :].any() and not x[..., :, -1].any() for x in seen)
    convs = [m for m in mini_pipe.vae.modules() if isinstance(m, torch.nn.Conv2d)]
    assert {m.padding_mode for m in convs} == {"zeros"} and not any(m.conv._forward_pre_hooks for m in downs)
    # the scope both pads the VAE as the scope vae does
    both = Extractor(mini_pipe, ["conv_in"], ExtractionSettings(padding_mode="circular", padding_scope="both"))
    assert torch.equal(both.encode(imgs, [0, 1]), lat)


def test_padding_scope_needs_a_padding_mode():
    for mode in (None, "zeros"):
        with pytest.raises(ValueError, match=r"^extraction padding_scope 'vae' needs a padding_mode \(reflect, "
                                             r"replicate or circular\); with zero padding there is nothing to change$"):
            ExtractionSettings(padding_mode=mode, padding_scope="vae")
    with pytest.raises(ValueError, match="padding_scope must be one of"):
        ExtractionSettings(padding_mode="circular", padding_scope="unet")
    assert experiments.validate({"v": {"padding_mode": "reflect", "padding_scope": "vae"}})


# ---------------------------------------------------------------------------------------------
# 3d: the paper mode's last partial batch
# ---------------------------------------------------------------------------------------------

def test_paper_mode_last_partial_batch_gets_other_noise(mini_pipe, monkeypatch):
    """sdhelper reseeds and draws the posterior sample (B images) before the shared noise, so the noise comes from a
    generator state that depends on B: a last batch of 3 after batches of 4 keeps the posterior draws of slots 0-2
    (the CPU generator's stream is a prefix) but gets another noise tensor than every full batch: the draw that
    follows 3 posterior draws. Our paper mode does exactly this (as test_extract's parity test with 25 = 20 + 5
    images checks against sdhelper)."""
    imgs = random_images(4, 64, seed=4)
    ex = Extractor(mini_pipe, ["conv_in"], ExtractionSettings(mode="paper", batch_size=4))
    seen = []
    add_noise = ex.family.add_noise
    monkeypatch.setattr(ex.family, "add_noise", lambda e, lat, noise, t: seen.append((lat, noise))
                        or add_noise(e, lat, noise, t))
    ex.latents(imgs, [0, 1, 2, 3])
    ex.latents(imgs[:3], [4, 5, 6])
    (lat4, eps4), (lat3, eps3) = seen
    # the posterior sample: a prefix of the full batch's draw (the VAE's arithmetic differs in the last bits between
    # batch sizes, so close, not equal); a draw from another stream position would differ by O(std)
    assert torch.allclose(lat3, lat4[:3], atol=1e-5) and (lat4[:3] - lat4[1:]).abs().max() > 1e-2
    assert not torch.equal(eps3[0], eps4[0])  # the shared noise: another tensor
    for n, lat, eps in ((4, lat4, eps4), (3, lat3, eps3)):
        torch.manual_seed(42)
        torch.randn(lat.shape)  # the posterior draw of the batch's size
        # randn_like keeps the latents' memory layout (the VAE's output is not contiguous), as sdhelper's call does
        assert torch.equal(eps[0:1], torch.randn_like(lat[None, 0]))
        assert all(torch.equal(e, eps[0]) for e in eps)


# ---------------------------------------------------------------------------------------------
# 6a: non-finite maps counted into the store
# ---------------------------------------------------------------------------------------------

def _extract(pipe, images, out, layers, **settings):
    return run_extraction(
        pipe, dataset_images=lambda a, b: images[a:b], image_ids=[f"{i:06d}" for i in range(len(images))],
        labels=[0] * len(images), layers=layers, settings=ExtractionSettings(**settings), out_dir=out,
        provenance={"model": "m"}, image_size=images[0].size[0], progress=False)


def test_nonfinite_count_records_layer_and_images_in_the_store(mini_pipe, tmp_path):
    from diffaudit.extract import NonFiniteError
    from diffaudit.layers import resolve_layers

    layers = ["conv_in", "mid_block"]
    module = resolve_layers(mini_pipe.unet, ["mid_block"])["mid_block"]

    def plant(_module, _inputs, output):
        output = output.clone()
        if output.shape[0] > 1:
            output[1, 0, 0, :2] = float("inf")
            output[0, 1, 0, 0] = float("nan")
        return output

    handle = module.register_forward_hook(plant)
    images = random_images(5, 128, seed=1)  # mid_block: 2x2 maps
    try:
        with pytest.raises(NonFiniteError, match=r"^non-finite values \(inf/NaN\) in layer mid_block of image 000000 "
                                                 r"of model m; "):
            _extract(mini_pipe, images, tmp_path / "stop", layers, batch_size=2, crops=False)
        out = _extract(mini_pipe, images, tmp_path / "count", layers, batch_size=2, crops=False, nonfinite="count")
    finally:
        handle.remove()
    store = ReprStore(out / "full.zarr")
    from diffaudit.store import group_name

    mid = dict(store.root[group_name("mid_block")].attrs)["nonfinite"]
    # batches (0, 1), (2, 3), (4): images 0 and 2 hold one NaN each, 1 and 3 two infs each; image 4 is alone
    assert mid == {"count": 6, "images": ["000000", "000001", "000002", "000003"], "counts": [1, 2, 1, 2]}
    assert dict(store.root[group_name("conv_in")].attrs)["nonfinite"] == {"count": 0, "images": [], "counts": []}
    assert np.isinf(store.array("mid_block")[1, 0, 0, :2]).all()
    assert "nonfinite" not in store.attrs["config"]  # the policy is not part of the fingerprint
    ref = _extract(mini_pipe, images, tmp_path / "clean", layers, batch_size=2, crops=False)
    assert "nonfinite" not in dict(ReprStore(ref / "full.zarr").root[group_name("mid_block")].attrs)
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        ExtractionSettings(nonfinite="ignore")


# ---------------------------------------------------------------------------------------------
# 6b: TF32 off in float32
# ---------------------------------------------------------------------------------------------

def test_no_tf32_switches_tf32_off_and_restores_the_flags(mini_pipe, monkeypatch):
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, True
        with no_tf32():
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
        with no_tf32(enabled=False):
            assert torch.backends.cudnn.allow_tf32
        # a float32 extraction's pass runs with TF32 off
        ex = Extractor(mini_pipe, ["conv_in"], ExtractionSettings())
        assert ex.dtype == torch.float32
        seen = []
        handle = mini_pipe.unet.conv_in.register_forward_hook(
            lambda *_: seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)))
        try:
            ex.run_batch(random_images(1, 64), [0])
        finally:
            handle.remove()
        assert seen == [(False, False)]
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


# ---------------------------------------------------------------------------------------------
# 6c: latents_mean / latents_std
# ---------------------------------------------------------------------------------------------

def test_sdxl_vae_with_latent_statistics_is_standardised_as_its_pipeline_does():
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    from diffaudit.families import registry
    from diffaudit.families.sdxl import MINI_SDXL_VAE

    pipe = registry.get("sdxl").build_embedded("mini-sdxl")
    mean, std = (0.1, -0.2, 0.3, 0.05), (0.9, 1.1, 0.8, 1.3)
    vae = AutoencoderKL(**MINI_SDXL_VAE, latents_mean=mean, latents_std=std)  # SDXL's layout with the statistics
    vae.load_state_dict(pipe.vae.state_dict())
    stats = StableDiffusionXLPipeline(**{**pipe.components, "vae": vae.eval()})
    imgs = random_images(2, 64, seed=3)
    sf = pipe.vae.config.scaling_factor
    for mode in ("corrected", "paper"):
        plain = Extractor(pipe, ["conv_in"], ExtractionSettings(mode=mode)).encode(imgs, [0, 1])
        got = Extractor(stats, ["conv_in"], ExtractionSettings(mode=mode)).encode(imgs, [0, 1])
        if mode == "paper":  # sdhelper 1.0.0 scales by scaling_factor alone (two VAE objects: last-bit drift)
            assert torch.allclose(got, plain, atol=1e-6)
        else:
            m, s = (torch.tensor(v).view(1, 4, 1, 1) for v in (mean, std))
            assert torch.allclose(got, (plain / sf - m) * sf / s, atol=1e-5)
    # the SD-1/2 family's pipelines never read the statistics
    assert not registry.get("sd").standardises_latents and registry.get("sdxl").standardises_latents


# ---------------------------------------------------------------------------------------------
# 6d: float32 stores for every family
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mini", "mini-sdxl", "mini-sd3", "mini-flux", "mini-pixart"])
def test_store_dtype_float32_for_every_family(name, tmp_path):
    from diffaudit.families import registry

    fam = registry.embedded_family(name)
    pipe = fam.build_embedded(name)
    net = fam.backbone(pipe)
    layers = fam.paper_layers(net)[-1:]
    mode = "corrected" if fam.name == "pixart" else "paper"
    images = random_images(3, 64 if fam.kind == "U-Net" else 128, seed=6)
    out = _extract(pipe, images, tmp_path / name, layers, mode=mode, batch_size=2, crops=False,
                   store_dtype="float32")
    store = ReprStore(out / "full.zarr")
    ex = Extractor(pipe, layers, ExtractionSettings(mode=mode, batch_size=2))
    ref = torch.cat([ex.run_batch(images[a:a + 2], range(a, min(a + 2, 3)))[layers[0]] for a in (0, 2)])
    arr = store.array(layers[0])[:]
    assert arr.dtype == np.float32 and np.array_equal(arr, ref.numpy())


# ---------------------------------------------------------------------------------------------
# 6e: random draws on the CPU
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("noise", ["shared", "independent"])
def test_corrected_mode_draws_only_from_cpu_generators(mini_pipe, monkeypatch, noise):
    """Every draw of the corrected extraction (the posterior sample, the forward noise) comes from a CPU generator
    and is moved to the device afterwards, so the values do not depend on the device."""
    calls = []
    randn = torch.randn

    def spy(*args, generator=None, device=None, **kwargs):
        calls.append((None if generator is None else generator.device.type, device))
        return randn(*args, generator=generator, device=device, **kwargs)

    monkeypatch.setattr(torch, "randn", spy)
    ex = Extractor(mini_pipe, ["conv_in"], ExtractionSettings(mode="corrected", latent="sample", noise=noise))
    ex.run_batch(random_images(2, 64), [0, 1])
    assert len(calls) >= 2
    assert all(gen == "cpu" and (dev is None or torch.device(dev).type == "cpu") for gen, dev in calls), calls
