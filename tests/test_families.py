"""Model families beyond SD-1/2: the SDXL U-Net (two text towers, pooled text + size conditioning) on the embedded
`mini-sdxl`, built offline and loaded back like a hub model; the layer list each family's `layers: paper` means."""
from __future__ import annotations

import types

import pytest
import torch

from conftest import assert_equals_sdhelper, extract_batched, random_images
from diffaudit.extract import ExtractionSettings, Extractor
from diffaudit.families import registry
from diffaudit.families.flow import sigma_for_ddpm_timestep
from diffaudit.families.sd import PAPER_LAYERS, build_mini_pipeline
from diffaudit.families.sdxl import sdxl_added_conditioning
from diffaudit.layers import expand_layers, resolve_layers
from diffaudit.models import ModelLoadError, ModelSpec, load_pipeline, pipeline_family, save_embedded_model


def paper_layers(net) -> list[str]:
    """``layers: paper`` of a backbone, asked of its family (SD-1/2 or SDXL U-Net, by the U-Net's layout)."""
    fam = registry.get("sdxl" if net.config.get("addition_embed_type") else "sd")
    return fam.paper_layers(net)


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return save_embedded_model("mini-sdxl", tmp_path_factory.mktemp("models") / "mini-sdxl")


@pytest.fixture(scope="module")
def sdxl_pipe(sdxl_dir):
    return load_pipeline(ModelSpec("mini-sdxl", str(sdxl_dir)), device="cpu")


def test_families_are_recognised_and_others_refused(sdxl_pipe, mini_pipe):
    assert pipeline_family(mini_pipe) == "sd" and pipeline_family(sdxl_pipe) == "sdxl"
    assert type(sdxl_pipe).__name__ == "StableDiffusionXLPipeline"
    other = types.SimpleNamespace(unet=types.SimpleNamespace(config={"addition_embed_type": "image"}), vae=None)
    with pytest.raises(ModelLoadError, match="added conditioning 'image' is not supported"):
        pipeline_family(other)
    with pytest.raises(ModelLoadError, match="not a latent diffusion pipeline with a U-Net"):
        pipeline_family(types.SimpleNamespace(transformer=None, vae=None))


def test_sdxl_vae_is_upcast_where_the_pipeline_upcasts_it(sdxl_dir):
    pipe = load_pipeline(ModelSpec("mini-sdxl", str(sdxl_dir)), device="cpu", dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16 and pipe.vae.dtype == torch.float32


def test_paper_layers_follow_the_layout(sdxl_pipe, mini_pipe):
    assert paper_layers(mini_pipe.unet) == list(PAPER_LAYERS)  # the authors' 45 (without up_blocks[0].resnets[2])
    assert expand_layers("paper", paper_layers(mini_pipe.unet)) == list(PAPER_LAYERS)
    layers = expand_layers("paper", paper_layers(sdxl_pipe.unet))
    assert len(layers) == 34 and layers[:4] == ["conv_in", "down_blocks[0].resnets[0]", "down_blocks[0].resnets[1]",
                                                "down_blocks[0].downsamplers[0]"]  # SDXL's first level: no attention
    assert "down_blocks[3].resnets[0]" not in layers and "up_blocks[0].resnets[2]" in layers
    assert not any(name.startswith("up_blocks[2].attentions") for name in layers)
    # the list is in execution order: the order the hooked modules run in one pass
    order = []
    handles = [m.register_forward_hook(lambda *_a, n=n: order.append(n))
               for n, m in resolve_layers(sdxl_pipe.unet, layers).items()]
    try:
        Extractor(sdxl_pipe, layers, ExtractionSettings(mode="corrected")).run_batch(random_images(1, 64), [0])
    finally:
        for h in handles:
            h.remove()
    assert order == layers


def test_sdxl_paper_mode_equals_sdhelper_img2repr(sdxl_dir, sdxl_pipe):
    """sdhelper 1.0.0 on an SDXL pipeline: both text towers' embeddings, no added conditioning
    (addition_embed_type = 'nothing_at_all'), Euler input scaling; <= 1e-5 x max|value| on every layer."""
    sdhelper = pytest.importorskip("sdhelper")
    layers = paper_layers(sdxl_pipe.unet)
    images = random_images(3, 128, seed=5)
    ours = extract_batched(Extractor(sdxl_pipe, layers, ExtractionSettings(mode="paper")), images, 3)
    assert sdxl_pipe.unet.config.addition_embed_type == "text_time"  # our quirk lasts for the pass only
    sd = sdhelper.SD(str(sdxl_dir), disable_progress_bar=True)
    ref = sd.img2repr(images, layers, 50, seed=42, batch_size=3)
    assert_equals_sdhelper(ours, ref, layers, "sdxl")


def test_sdxl_corrected_mode_passes_the_pipelines_added_conditioning(sdxl_pipe):
    """time_ids as StableDiffusionXLPipeline builds them (original = target = the image's size, crop (0, 0)), the
    pooled embedding of the second tower; the pass equals a direct U-Net call with them, and differs from the
    paper quirk's (no added conditioning) on the same latents."""
    pipe = sdxl_pipe
    emb, _, pooled, _ = pipe.encode_prompt(prompt=[""] * 2, device="cpu", num_images_per_prompt=1,
                                           do_classifier_free_guidance=False)
    cond = sdxl_added_conditioning(pooled, (12, 16), pipe.vae_scale_factor)
    want = pipe._get_add_time_ids((96, 128), (0, 0), (96, 128), dtype=pooled.dtype,
                                  text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert torch.equal(cond["time_ids"], want.expand(2, 6)) and torch.equal(cond["text_embeds"], pooled)

    images = random_images(2, 128, seed=6)
    layer = "mid_block.attentions[0]"
    ex = Extractor(pipe, [layer], ExtractionSettings(mode="corrected", seed=3))
    got = ex.run_batch(images, [0, 1])[layer]
    lat, t = ex.latents(images, [0, 1])
    seen = {}
    handle = ex.modules[layer].register_forward_hook(lambda _m, _i, out: seen.update(x=out[0]))
    try:
        pipe.unet(lat, t, encoder_hidden_states=emb,
                  added_cond_kwargs=sdxl_added_conditioning(pooled, lat.shape[-2:], pipe.vae_scale_factor))
        assert torch.allclose(got, seen["x"], atol=1e-6 * float(got.abs().max()))
        seen.clear()
        pipe.unet(lat, t, encoder_hidden_states=emb, added_cond_kwargs={"text_embeds": 0 * pooled,
                                                                         "time_ids": 0 * cond["time_ids"]})
        assert not torch.allclose(got, seen["x"], atol=1e-3 * float(got.abs().max()))
    finally:
        handle.remove()


def test_sdxl_crops_and_meta_shapes(sdxl_pipe):
    """The crop rings follow SDXL's three levels (8, 16, 32 px at 256 px); the meta-device shape probe equals a
    real pass, also with the added conditioning."""
    from diffaudit.extract import plan_variants

    layers = paper_layers(sdxl_pipe.unet)
    for mode in ("paper", "corrected"):
        ex = Extractor(sdxl_pipe, layers, ExtractionSettings(mode=mode))
        meta = ex.layer_shapes(256)
        assert ex._meta_runs is not None  # the meta twin ran (no silent fallback to the real U-Net)
        real = Extractor(sdxl_pipe, layers, ExtractionSettings(mode=mode))
        real._meta = False  # no meta twin: the real U-Net runs
        assert meta == real.layer_shapes(256)
    plan = plan_variants(ex.layer_shapes, layers, 256, True)
    assert [v.crop_px for v in plan] == [0, 8, 16, 32]
    assert {ex.layer_shapes(256)[n][-1] for n in plan[3].layers} == {8}


def test_sd_family_unchanged_by_the_family_code(mini_pipe):
    """SD-1/2 passes get no added conditioning and keep their config untouched."""
    ex = Extractor(mini_pipe, ["mid_block"], ExtractionSettings(mode="paper"))
    assert ex.family is registry.get("sd") and ex.family.name == "sd"
    out = ex.run_batch(random_images(1, 64), [0])["mid_block"]
    assert out.shape[0] == 1 and mini_pipe.unet.config.get("addition_embed_type") is None
    assert not hasattr(build_mini_pipeline().unet.config, "nothing_at_all")


# ---------------------------------------------------------------------------------------------
# Diffusion transformers (SD3, FLUX) through the extraction
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dit_pipes(tmp_path_factory):
    """mini-sd3 and mini-flux built as the workflow builds them and loaded through load_pipeline (fp32 on CPU)."""
    root = tmp_path_factory.mktemp("dit")
    return {f: load_pipeline(ModelSpec(f"mini-{f}", str(save_embedded_model(f"mini-{f}", root / f"mini-{f}"))),
                             device="cpu") for f in ("sd3", "flux")}


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_dit_paper_mode_equals_sdhelpers_recipe(family, dit_pipes):
    """The extraction's paper mode on a DiT is bitwise the family's paper_representations (which tests/test_dit.py
    holds equal to sdhelper 1.0.0's img2repr), on every layer incl. the patch embedding and FLUX's single blocks."""
    pipe = dit_pipes[family]
    fam = registry.family_of(pipe)
    assert pipeline_family(pipe) == family == fam.name
    layers = expand_layers("paper", fam.paper_layers(pipe.transformer))
    assert layers[0] == fam.patch_embedding and len(layers) == (4 if family == "sd3" else 5)
    images = random_images(3, 128, seed=8)
    ours = extract_batched(Extractor(pipe, layers, ExtractionSettings(mode="paper")), images, 3)
    ref = fam.paper_representations(pipe, images, layers, step=50, seed=42)
    for layer in layers:
        assert ours[layer].shape == (3, 32, 8, 8) and torch.equal(ours[layer], ref[layer]), layer


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_dit_noise_level_pixels_and_shapes(family, dit_pipes):
    """Corrected mode: sigma as noisy as the DDPM timestep (or extraction.sigma); [-1, 1] pixels in both modes;
    a token is 16 px (2x2 latent patch), so the only crop variant removes 16 px; meta shapes equal real ones."""
    from diffaudit.extract import plan_variants

    pipe = dit_pipes[family]
    layers = registry.get(family).paper_layers(pipe.transformer)
    ex = Extractor(pipe, layers, ExtractionSettings(mode="corrected", timestep=50))
    assert ex.sigma == pytest.approx(sigma_for_ddpm_timestep(50)) and ex.switches["pixel_range"] == "symmetric"
    assert Extractor(pipe, layers, ExtractionSettings(mode="corrected", sigma=0.3)).sigma == 0.3
    assert Extractor(pipe, layers, ExtractionSettings(mode="paper")).switches["pixel_range"] == "symmetric"
    lo = ex.run_batch(random_images(2, 64, seed=1), [0, 1])[layers[-1]]
    hi = Extractor(pipe, layers, ExtractionSettings(mode="corrected", sigma=0.9)).run_batch(
        random_images(2, 64, seed=1), [0, 1])[layers[-1]]
    assert not torch.allclose(lo, hi)
    meta = ex.layer_shapes(256)
    assert ex._meta_runs is not None and set(meta.values()) == {(32, 16, 16)}
    real = Extractor(pipe, layers, ExtractionSettings(mode="corrected"))
    real._meta = False
    assert real.layer_shapes(256) == meta
    assert [v.crop_px for v in plan_variants(ex.layer_shapes, layers, 256, True)] == [0, 16]
    assert ex.t5_used is True  # both tiny pipelines carry a T5 encoder


def test_dit_stores_record_family_noise_level_and_t5(dit_pipes, tmp_path):
    from diffaudit.extract import run_extraction
    from diffaudit.store import ReprStore

    images = random_images(2, 64, seed=2)
    out = run_extraction(dit_pipes["sd3"], dataset_images=lambda a, b: images[a:b], image_ids=["a", "b"],
                         labels=[0, 0], layers=["pos_embed", "transformer_blocks[2]"],
                         settings=ExtractionSettings(mode="corrected", crops=False), out_dir=tmp_path / "rep",
                         provenance={"model": "mini-sd3"}, image_size=64, progress=False)
    attrs = ReprStore(out / "full.zarr").attrs
    assert attrs["family"] == "sd3" and attrs["t5_used"] is True and attrs["pixel_range"] == "[-1, 1]"
    assert attrs["noise_level"]["from"] == "equal SNR with the DDPM timestep"
    assert attrs["noise_level"]["sigma"] == pytest.approx(0.18406, abs=1e-5)
    assert attrs["scale_model_input"] is False


def test_gpu_memory_check_and_offload_refusals(sdxl_dir, sdxl_pipe):
    """A device that cannot hold the weights is refused before anything moves, with what to do; with offload only the
    largest component must fit; offload needs CUDA."""
    from diffaudit.models import GPU_HEADROOM_BYTES, check_gpu_memory, weight_bytes

    spec = ModelSpec("mini-sdxl", str(sdxl_dir))
    sizes = weight_bytes(sdxl_pipe, torch.float16, vae_float32=True)
    assert set(sizes) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    n_vae = sum(p.numel() for p in sdxl_pipe.vae.parameters())
    assert sizes["vae"] >= 4 * n_vae and sizes["unet"] >= 2 * sum(p.numel() for p in sdxl_pipe.unet.parameters())
    total = sum(sizes.values()) + GPU_HEADROOM_BYTES
    check_gpu_memory(spec, sdxl_pipe, "cuda", torch.float16, free_bytes=total, vae_float32=True)
    with pytest.raises(ModelLoadError, match=r"needs about .* GB on cuda.*set extraction.offload: true"):
        check_gpu_memory(spec, sdxl_pipe, "cuda", torch.float16, free_bytes=total - 1, vae_float32=True)
    largest = max(sizes.values()) + GPU_HEADROOM_BYTES
    check_gpu_memory(spec, sdxl_pipe, "cuda:0", torch.float16, offload=True, free_bytes=largest, vae_float32=True)
    with pytest.raises(ModelLoadError, match="largest component"):
        check_gpu_memory(spec, sdxl_pipe, "cuda:0", torch.float16, offload=True, free_bytes=largest - 1,
                         vae_float32=True)
    with pytest.raises(ModelLoadError, match="extraction.offload needs a CUDA device"):
        load_pipeline(spec, device="cpu", offload=True)


def test_model_cpu_offload_captures_the_same_maps():
    """diffusers' model CPU offload (hooks that move each component to the execution device when it runs; here the
    CPU stands in for the GPU) leaves the extraction's hooks and values unchanged."""
    from diffaudit.families.sdxl import build_mini_sdxl_pipeline

    pipe = build_mini_sdxl_pipeline()
    layers = ["down_blocks[1].attentions[0]", "mid_block.attentions[0]", "conv_out"]
    images = random_images(2, 64, seed=4)
    plain = Extractor(pipe, layers, ExtractionSettings(mode="corrected")).run_batch(images, [0, 1])
    pipe.enable_model_cpu_offload(device="cpu")
    assert hasattr(pipe.unet, "_hf_hook")
    offloaded = Extractor(pipe, layers, ExtractionSettings(mode="corrected")).run_batch(images, [0, 1])
    assert all(torch.equal(plain[k], offloaded[k]) for k in layers)


def test_explorer_resolves_an_automatic_reference_layer(tmp_path):
    """`anomalies.ref_layer: auto`: the explorer boxes detections and labels on the layer the anomaly rule chose for
    the run (its anomaly_detector.json), not on a U-Net layer name the model does not have."""
    import json

    import numpy as np

    from diffaudit.explorer.data import Explorer
    from diffaudit.store import StoreWriter

    run = tmp_path / "m"
    x = np.ones((2, 8, 4, 4), np.float16)
    x[0, :, 0:2, 2:4] = 9  # one high-norm 2x2 block in image 0
    w = StoreWriter(run / "representations" / "full.zarr", layers=["transformer_blocks[0]"], image_ids=["a", "b"],
                    labels=None, config={}, layer_indices=[0], attrs={"image_size": 64})
    w.write_batch(0, {"transformer_blocks[0]": x})
    w.finalize()
    (run / "anomaly_detector.json").write_text(json.dumps({"ref_layer": "transformer_blocks[0]"}))
    ex = Explorer(tmp_path, ref_layer="auto")
    meta = ex.meta()["models"]["m"]["baseline"]
    assert meta["ref_layer"] == "transformer_blocks[0]" and meta["has_ref_layer"]
    res = ex.norms("m", None, "transformer_blocks[0]", [0, 1])
    assert res["is_ref_layer"] and res["maps"][0]["detected_xy"] == [[2, 0]] and res["maps"][1]["detected_xy"] == []
    assert ex.toggle_label("m", 0, 3, 1)["labels"] == [[0, 2, 0]]
