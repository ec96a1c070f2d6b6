"""Diffusion transformers (diffaudit.families.flow, .sd3, .flux): tiny SD3/FLUX models, token maps, conditioning,
noise levels, and paper mode equal to sdhelper 1.0.0's img2repr."""
import json
from contextlib import contextmanager

import pytest
import torch

from conftest import assert_equals_sdhelper, random_images
from diffaudit.families import flow, registry
from diffaudit.families.common import diffusers_errors_only
from diffaudit.layers import resolve_layers

FAMILIES = ("sd3", "flux")
SDHELPER_NAMES = {"sd3": "SD3", "flux": "FLUX-schnell"}
F = {f: registry.get(f) for f in FAMILIES}


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict:
    """Each tiny model built and saved once (float16 safetensors)."""
    root = tmp_path_factory.mktemp("dit_models")
    return {f: F[f].save_embedded(f"mini-{f}", root / f"tiny-{f}") for f in FAMILIES}


def _load(path, dtype=torch.float16):
    from diffusers import AutoPipelineForText2Image

    with diffusers_errors_only():
        pipe = AutoPipelineForText2Image.from_pretrained(path, dtype=torch.float16, use_safetensors=True)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to("cpu", dtype)


@pytest.fixture(scope="session")
def tiny_pipes(tiny_dirs) -> dict:
    """The saved models loaded back as sdhelper loads them (float16 weights, run in float32 on the CPU)."""
    return {f: _load(d, torch.float32) for f, d in tiny_dirs.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(family, tiny_dirs):
    d = tiny_dirs[family]
    assert not d.with_name(d.name + ".tmp").exists()
    info = json.loads((d / "TINY_MODEL.json").read_text())
    assert info["family"] == family and info["seed"] == 0
    loaded = _load(d)
    assert type(loaded).__name__ == {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[family]
    built = F[family].build_embedded(f"mini-{family}").to(torch.float16)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(built, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    t5_name = "tokenizer_3" if family == "sd3" else "tokenizer_2"
    prompt = "a photo of a cat, 42 Zebras"
    assert getattr(loaded, t5_name)(prompt).input_ids == getattr(built, t5_name)(prompt).input_ids
    assert loaded.tokenizer(prompt).input_ids == built.tokenizer(prompt).input_ids
    ids = getattr(loaded, t5_name)(prompt).input_ids
    assert ids[-1] == 1 and 2 in ids  # </s> appended; "Z" (upper case) is unknown
    assert loaded.vae.config.latent_channels == 16
    assert loaded.vae.config.shift_factor == F[family].vae_factors["shift_factor"]


def test_tiny_forward_is_fast(tiny_pipes):
    import time

    for family, pipe in tiny_pipes.items():
        cond, _ = F[family].prompt_conditioning(pipe, [""])
        x = torch.randn(1, 16, 16, 16)
        kwargs = F[family].transformer_inputs(pipe, x, 0.5, cond)
        times = []
        with torch.no_grad():
            for _ in range(3):  # the best of three: a busy machine's thread contention is not the model's size
                t0 = time.perf_counter()
                out = pipe.transformer(**kwargs)[0]
                times.append(time.perf_counter() - t0)
        assert min(times) < 1.0, (family, times)
        assert out.shape[0] == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_paper_layers_resolve(family, tiny_pipes):
    tr = tiny_pipes[family].transformer
    names = F[family].paper_layers(tr)
    assert names[0] == F[family].patch_embedding
    n_joint = len(tr.transformer_blocks)
    assert names[1:n_joint + 1] == [f"transformer_blocks[{i}]" for i in range(n_joint)]
    n_single = len(tr.single_transformer_blocks) if family == "flux" else 0
    assert len(names) == 1 + len(tr.transformer_blocks) + n_single
    assert list(resolve_layers(tr, names)) == names
    with pytest.raises(ValueError, match=f"expected a {F[family].transformer_class}"):
        F[family].paper_layers(torch.nn.Linear(2, 2))


def test_image_map_token_order_and_streams():
    b, c, gh, gw, n_text = 2, 3, 3, 5, 4
    # token y * gw + x carries 100 y + x in every channel: the map must hold it at [y, x]
    tokens = torch.arange(gh * gw).float()
    planted = (100 * (tokens // gw) + tokens % gw)[None, :, None].expand(b, -1, c)
    want = (100 * torch.arange(gh)[:, None] + torch.arange(gw)[None, :]).float()
    text = torch.full((b, n_text, c), -1.0)
    for output in (planted, (text, planted), (None, planted), torch.cat([text, planted], dim=1)):
        m = flow.image_map("x", output, (gh, gw), n_text)
        assert m.shape == (b, c, gh, gw)
        assert torch.equal(m[1, 2], want)
    with pytest.raises(ValueError, match="fit neither the 3x5 patch grid"):
        flow.image_map("blk", planted[:, 1:], (gh, gw), n_text)
    with pytest.raises(ValueError, match="expected \\(batch, tokens, channels\\)"):
        flow.image_map("blk", planted[0], (gh, gw), n_text)


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_embedding_map_is_not_transposed(family, tiny_pipes):
    """A bump planted in one latent patch of a non-square latent changes the patch embedding map at that patch only,
    through the pipeline's own packing (FLUX) and patch embedding."""
    pipe = tiny_pipes[family]
    fam = F[family]
    cond, _ = fam.prompt_conditioning(pipe, [""])
    h, w, gy, gx = 16, 24, 2, 9  # grid 8 x 12
    grid = fam.grid_hw(pipe, (h, w))
    assert grid == (8, 12)
    base = torch.zeros(1, 16, h, w)
    bumped = base.clone()
    bumped[:, :, 2 * gy:2 * gy + 2, 2 * gx:2 * gx + 2] = 5.0
    layer = fam.patch_embedding
    module = resolve_layers(pipe.transformer, [layer])[layer]
    maps = []
    for x in (base, bumped):
        got = {}
        handle = module.register_forward_hook(lambda m, i, o: got.setdefault("o", o))
        try:
            with torch.no_grad():
                pipe.transformer(**fam.transformer_inputs(pipe, x, 0.3, cond))
        finally:
            handle.remove()
        maps.append(flow.image_map(layer, got["o"], grid, cond["encoder_hidden_states"].shape[1]))
    changed = (maps[1] - maps[0]).abs().amax(dim=(0, 1)) > 0
    assert changed.shape == grid
    assert changed.nonzero().tolist() == [[gy, gx]]
    if family == "flux":  # image position ids are (0, row, column) in token order
        ids = fam.transformer_inputs(pipe, base, 0.3, cond)["img_ids"]
        assert ids[gy * grid[1] + gx].tolist() == [0, gy, gx]


def test_sigma_for_ddpm_timestep_matches_snr():
    from diffusers import DDPMScheduler

    abar = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    assert torch.equal(flow.ddpm_alphas_cumprod(), abar)
    abar = abar.double()
    sigmas = [flow.sigma_for_ddpm_timestep(t) for t in range(1000)]
    assert all(a < b for a, b in zip(sigmas, sigmas[1:]))
    for t in (0, 50, 500, 999):
        s = sigmas[t]
        assert ((1 - s) / s) ** 2 == pytest.approx(float(abar[t] / (1 - abar[t])), rel=1e-9)
    assert sigmas[50] == pytest.approx(0.18406, abs=1e-5)
    with pytest.raises(ValueError, match="DDPM timestep"):
        flow.sigma_for_ddpm_timestep(1000)


@pytest.mark.parametrize("family", FAMILIES)
def test_noise_level_and_noising_match_the_scheduler(family, tiny_pipes):
    pipe = tiny_pipes[family]
    before = pipe.scheduler.timesteps.clone()
    sigma, model_t = F[family].paper_noise_level(pipe, 50)
    assert (sigma, model_t) == pytest.approx({"sd3": (0.14350, 143.50), "flux": (0.051, 0.051)}[family], rel=1e-4)
    assert torch.equal(pipe.scheduler.timesteps, before)  # set_timesteps ran on a copy
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(1000)
    t = sched.timesteps[949] if family == "sd3" else torch.tensor([51.0])
    x0, eps = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    assert torch.equal(flow.noised(x0, eps, sigma), sched.scale_noise(x0, t.reshape(1, 1).expand(2, 1)[:, 0], eps))
    with pytest.raises(ValueError, match="does not match"):
        F["flux" if family == "sd3" else "sd3"].paper_noise_level(pipe, 50)


def test_encode_latents_and_generator(tiny_pipes):
    pipe = tiny_pipes["sd3"]
    pixels = pipe.image_processor.preprocess(random_images(2, 64))
    a = F["sd3"].encode_latents(pipe, pixels, torch.Generator().manual_seed(1))
    b = F["sd3"].encode_latents(pipe, pixels, torch.Generator().manual_seed(1))
    assert a.shape == (2, 16, 8, 8) and torch.equal(a, b)
    with torch.no_grad():
        mean = pipe.vae.encode(pixels).latent_dist.mean
    vae = pipe.vae.config
    assert not torch.equal(a, (mean - vae.shift_factor) * vae.scaling_factor)  # a sample, not the mean


def test_sd35_paper_mode_is_named_an_analogy(tiny_pipes):
    """sdhelper 1.0.0 has no SD3.5 path: on an SD3.5-layout MMDiT (dual-attention layers) the stores say that paper
    mode applied sdhelper's SD3 recipe, not that it reproduced a run; SD3 itself records no such note."""
    from diffusers import SD3Transformer2DModel

    from diffaudit.extract import ExtractionSettings, Extractor
    from diffaudit.families.sd3 import SD3_TRANSFORMER

    pipe = tiny_pipes["sd3"]
    layers = F["sd3"].paper_layers(pipe.transformer)[:1]
    assert "paper_recipe" not in F["sd3"].describe(Extractor(pipe, layers, ExtractionSettings(mode="paper")))
    sd35 = F["sd3"].build_embedded("mini-sd3")
    sd35.transformer = SD3Transformer2DModel(**{**SD3_TRANSFORMER, "dual_attention_layers": (0,)})
    assert F["sd3"].is_sd35(sd35.transformer) and not F["sd3"].is_sd35(pipe.transformer)
    desc = F["sd3"].describe(Extractor(sd35, layers, ExtractionSettings(mode="paper")))
    assert desc["paper_recipe"].startswith("sdhelper 1.0.0's SD3 recipe applied to SD3.5")
    assert "paper_recipe" not in F["sd3"].describe(Extractor(sd35, layers, ExtractionSettings(mode="corrected")))


def test_bfloat16_runs_on_the_cpu_and_is_flux_default_on_cuda(tiny_dirs):
    """``precision: bfloat16`` loads and extracts mini-flux on the CPU (finite maps); ``auto`` leaves the CUDA dtype
    to the family: bfloat16 for FLUX, float16 for SD3."""
    from diffaudit.extract import ExtractionSettings, Extractor
    from diffaudit.models import ModelSpec, compute_dtype, load_pipeline

    assert compute_dtype("cpu", "bfloat16") == torch.bfloat16 and compute_dtype("cpu", "auto") == torch.float32
    assert compute_dtype("cuda", "auto") is None and compute_dtype("cuda", "float16") == torch.float16
    pipe = load_pipeline(ModelSpec("mini-flux", str(tiny_dirs["flux"])), device="cpu",
                         dtype=compute_dtype("cpu", "bfloat16"))
    assert pipe.transformer.dtype == torch.bfloat16 and F["flux"].cuda_dtype(pipe) == torch.bfloat16
    layers = F["flux"].paper_layers(pipe.transformer)
    out = Extractor(pipe, layers, ExtractionSettings(mode="corrected", precision="bfloat16")).run_batch(
        random_images(2, 128), [0, 1], out_dtype=torch.float16)
    assert all(v.dtype == torch.float16 and torch.isfinite(v).all() for v in out.values())
    sd3 = _load(tiny_dirs["sd3"], torch.float32)
    assert F["sd3"].cuda_dtype(sd3) == torch.float16


def test_conditioning_records_t5(tiny_pipes):
    sd3 = tiny_pipes["sd3"]
    cond, used = F["sd3"].prompt_conditioning(sd3, ["a cat", ""])
    assert used and cond["encoder_hidden_states"].shape == (2, 77 + 256, 96)
    assert cond["pooled_projections"].shape == (2, 32 + 48)
    assert cond["encoder_hidden_states"][:, 77:].abs().amax() > 0
    cond0, used0 = F["sd3"].prompt_conditioning(sd3, ["a cat", ""], use_t5=False)
    assert not used0 and sd3.text_encoder_3 is not None and sd3.config.text_encoder_3[1] == "T5EncoderModel"
    assert cond0["encoder_hidden_states"][:, 77:].abs().amax() == 0
    assert torch.equal(cond0["encoder_hidden_states"][:, :77], cond["encoder_hidden_states"][:, :77])
    no_t5 = F["sd3"].build_embedded("mini-sd3", with_t5=False)
    cond1, used1 = F["sd3"].prompt_conditioning(no_t5, ["a cat"])
    assert not used1 and cond1["encoder_hidden_states"].shape == (1, 77 + 256, 96)
    flux = tiny_pipes["flux"]
    condf, usedf = F["flux"].prompt_conditioning(flux, ["a cat"])
    assert usedf and set(condf) == {"encoder_hidden_states", "pooled_projections", "txt_ids"}
    assert condf["encoder_hidden_states"].shape == (1, 512, 32) and condf["txt_ids"].shape == (512, 3)
    with pytest.raises(ValueError, match="FLUX conditions on T5 only"):
        F["flux"].prompt_conditioning(flux, ["a cat"], use_t5=False)
    with pytest.raises(ValueError, match="with_t5=False is for sd3 only"):
        F["flux"].build_embedded("mini-flux", with_t5=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_paper_representations_non_square(family, tiny_pipes):
    from PIL import Image

    images = [im.resize((128, 96), Image.BILINEAR) for im in random_images(2, 128, seed=2)]
    pipe = tiny_pipes[family]
    reps = F[family].paper_representations(pipe, images, F[family].paper_layers(pipe.transformer))
    assert {tuple(v.shape) for v in reps.values()} == {(2, 32, 6, 8)}


@contextmanager
def _sdhelper_tiny_width(width: int):
    """sdhelper 1.0.0 reshapes the hooked tokens with the real models' widths written out (SD3-medium 1536,
    FLUX 3072); for the tiny models that reshape alone gets the tiny width instead."""
    original = torch.Tensor.reshape

    def reshape(self, *shape, **kwargs):
        if kwargs:
            return original(self, *shape, **kwargs)
        if len(shape) == 4 and shape[-1] in (1536, 3072) and self.dim() == 3 and self.shape[-1] == width:
            shape = (*shape[:-1], width)
        return original(self, *shape)

    torch.Tensor.reshape = reshape
    try:
        yield
    finally:
        torch.Tensor.reshape = original


@pytest.fixture(scope="session")
def sdhelper_sds(tiny_dirs) -> dict:
    """sdhelper on each tiny model; its SD3/FLUX branch is chosen by name (a path would take its U-Net branch)."""
    sdhelper = pytest.importorskip("sdhelper")
    sds = {}
    for family, d in tiny_dirs.items():
        sds[family] = sdhelper.SD(str(d), disable_progress_bar=True)
        sds[family].model_name = SDHELPER_NAMES[family]
    return sds


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", [(128, 128), (128, 96)], ids=["square", "wide"])
def test_paper_mode_equals_sdhelper_img2repr(family, size, sdhelper_sds, tiny_pipes):
    """Every block (FLUX: single-stream ones too, which sdhelper does not list but hooks the same way), 3 images,
    fp32 on CPU, <= 1e-5 x max|value|; non-square images too (FLUX: with sdhelper's transposed image ids)."""
    from PIL import Image

    sd = sdhelper_sds[family]
    assert sd.device == "cpu" and sd.dtype == torch.float32
    layers = [n for n in F[family].paper_layers(sd.pipeline.transformer) if n != F[family].patch_embedding]
    assert sd.available_extract_positions == [n for n in layers if n.startswith("transformer_blocks")]
    images = [im.resize(size, Image.BILINEAR) for im in random_images(3, 128, seed=1)]
    with _sdhelper_tiny_width(sd.pipeline.transformer.config.num_attention_heads
                              * sd.pipeline.transformer.config.attention_head_dim):
        ref = sd.img2repr(images, layers, step=50, seed=42, batch_size=len(images))
    ours = F[family].paper_representations(tiny_pipes[family], images, layers, step=50, seed=42)
    assert_equals_sdhelper(ours, ref, layers, family)
    assert ours[layers[0]].shape[-2:] == (size[1] // 16, size[0] // 16)
    assert all(float(ours[n].abs().max()) > 0 for n in layers)
    if family == "flux" and size[0] != size[1]:  # the true image ids give other maps
        true_ids = F[family].paper_representations(tiny_pipes[family], images, layers[:1], sdhelper_image_ids=False)
        assert not torch.allclose(true_ids[layers[0]], ours[layers[0]], rtol=1e-3, atol=0)
