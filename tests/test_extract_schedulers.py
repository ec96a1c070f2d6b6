"""Paper-mode fidelity for every scheduler of the model registry (PNDM: sd14/sd15, DDIM: sd21, Euler with trailing
spacing: sdturbo) against sdhelper 1.0.0, and the noise contract of both modes, observed directly."""
import json

import pytest
import torch

from conftest import assert_equals_sdhelper, extract_batched, random_images
from diffaudit.extract import ExtractionSettings, Extractor
from diffaudit.families.sd import PAPER_LAYERS
from diffaudit.families.sd import MODEL_SCHEDULERS, SCHEDULERS, save_mini_model
from diffaudit.models import ModelSpec, load_pipeline


@pytest.fixture(scope="module")
def scheduler_models(tmp_path_factory):
    """The mini model saved once per scheduler of the registry (seeded weights, float16 safetensors)."""
    root = tmp_path_factory.mktemp("schedulers")
    return {name: save_mini_model(root / name, scheduler=name) for name in SCHEDULERS}


def test_every_registered_model_scheduler_is_covered():
    assert set(MODEL_SCHEDULERS.values()) == set(SCHEDULERS)
    assert {"sd15", "sd21", "sdturbo"} <= set(MODEL_SCHEDULERS)


@pytest.mark.parametrize("name,cls,expected", [
    ("pndm", "PNDMScheduler", {"prediction_type": "epsilon", "steps_offset": 1, "skip_prk_steps": True}),
    ("ddim", "DDIMScheduler", {"prediction_type": "v_prediction", "timestep_spacing": "leading", "steps_offset": 1,
                               "set_alpha_to_one": False, "clip_sample": False}),
    ("euler", "EulerDiscreteScheduler", {"prediction_type": "epsilon", "timestep_spacing": "trailing",
                                         "interpolation_type": "linear", "use_karras_sigmas": False}),
])
def test_saved_scheduler_config(scheduler_models, name, cls, expected):
    cfg = json.loads((scheduler_models[name] / "scheduler" / "scheduler_config.json").read_text())
    assert cfg["_class_name"] == cls
    assert (cfg["beta_schedule"], cfg["beta_start"], cfg["beta_end"], cfg["num_train_timesteps"]) == \
        ("scaled_linear", 0.00085, 0.012, 1000)
    assert {k: cfg[k] for k in expected} == expected


def _ours(pipe, images, batch_size, layers):
    return extract_batched(Extractor(pipe, layers, ExtractionSettings(mode="paper", batch_size=batch_size)), images,
                           batch_size)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_paper_mode_equals_sdhelper_for_every_scheduler(scheduler_models, name):
    """All 45 layers, 5 images of 256 px in batches of 2 (re-seeded per batch), fp32 on CPU, <= 1e-5 x max|value|."""
    sdhelper = pytest.importorskip("sdhelper")
    model_dir = scheduler_models[name]
    pipe = load_pipeline(ModelSpec(name, str(model_dir)), device="cpu")
    assert type(pipe.scheduler).__name__ == SCHEDULERS[name][0]
    images = random_images(5, 256, seed=11)
    layers = list(PAPER_LAYERS)
    ours = _ours(pipe, images, 2, layers)
    sd = sdhelper.SD(str(model_dir), disable_progress_bar=True)
    assert sd.device == "cpu" and sd.dtype == torch.float32
    assert type(sd.pipeline.scheduler).__name__ == SCHEDULERS[name][0]
    ref = sd.img2repr(images, layers, 50, seed=42, batch_size=2)
    assert len(ref) == 5
    assert_equals_sdhelper(ours, ref, layers, name)


def test_euler_scaling_is_applied_and_not_carried_over(scheduler_models):
    """SD-Turbo's Euler ``scale_model_input`` divides by sqrt(sigma_t^2 + 1) (so the parity above is not vacuous);
    Euler remembers the step index of its first call, so each extractor scales with a private copy."""
    pipe = load_pipeline(ModelSpec("euler", str(scheduler_models["euler"])), device="cpu")
    img = random_images(1, 128, seed=12)
    x = torch.ones(1, 4, 8, 8)
    sigma = ((1 - pipe.scheduler.alphas_cumprod[50]) / pipe.scheduler.alphas_cumprod[50]) ** 0.5
    scaled = Extractor(pipe, ["mid_block"], ExtractionSettings(timestep=50)).scheduler.scale_model_input(
        x, torch.tensor(50))
    assert torch.allclose(scaled, x / (sigma ** 2 + 1) ** 0.5) and float(sigma) > 0.1
    a = Extractor(pipe, ["mid_block"], ExtractionSettings(timestep=50)).run_batch(img, [0])["mid_block"]
    b = Extractor(pipe, ["mid_block"], ExtractionSettings(timestep=400)).run_batch(img, [0])["mid_block"]
    fresh = load_pipeline(ModelSpec("euler", str(scheduler_models["euler"])), device="cpu")
    c = Extractor(fresh, ["mid_block"], ExtractionSettings(timestep=400)).run_batch(img, [0])["mid_block"]
    assert torch.equal(b, c) and not torch.equal(a, b)
    assert pipe.scheduler.step_index is None  # the pipeline's own scheduler is untouched


# ---------------------------------------------------------------------------------------------
# the noise, observed where it enters: the DDIM add_noise call
# ---------------------------------------------------------------------------------------------

def _capture_noise(ex: Extractor, monkeypatch) -> list:
    seen = []
    add_noise = ex.ddim.add_noise

    def spy(latents, noise, t):
        seen.append(noise.detach().clone())
        return add_noise(latents, noise, t)

    monkeypatch.setattr(ex.ddim, "add_noise", spy)
    return seen


def test_paper_mode_shares_one_noise_tensor_per_batch(mini_pipe, monkeypatch):
    images = random_images(8, 128, seed=13)
    ex = Extractor(mini_pipe, ["mid_block"], ExtractionSettings(mode="paper", batch_size=3))
    seen = _capture_noise(ex, monkeypatch)
    for s in (0, 3, 6):
        ex.run_batch(images[s:s + 3], range(s, min(s + 3, 8)))
    first, second, last = seen
    assert first.shape == second.shape == (3, 4, 16, 16) and last.shape == (2, 4, 16, 16)
    for noise in seen:  # one tensor for the whole batch
        assert all(torch.equal(noise[i], noise[0]) for i in range(len(noise)))
    assert torch.equal(second, first)  # torch.manual_seed(seed) at every batch
    assert float(first[0].std()) > 0.5

    # it is the global generator's draw right after the VAE posterior sample (as in sdhelper), so it depends on the
    # batch size: the short last batch gets another noise
    def expected(b):
        torch.manual_seed(42)
        lat = mini_pipe.vae.encode(torch.zeros(b, 3, 128, 128)).latent_dist.sample()  # draws b x 4 x 16 x 16 first
        return torch.randn_like(lat[0])

    assert torch.equal(first[0], expected(3)) and torch.equal(last[0], expected(2))
    assert not torch.equal(last[0], first[0])


def test_corrected_mode_noise_is_independent_per_image_and_of_the_batch_size(mini_pipe, monkeypatch):
    images = random_images(4, 128, seed=14)
    by_batch = {}
    for bs in (4, 2, 1):
        ex = Extractor(mini_pipe, ["mid_block"], ExtractionSettings(mode="corrected", seed=5, batch_size=bs))
        seen = _capture_noise(ex, monkeypatch)
        for s in range(0, 4, bs):
            ex.run_batch(images[s:s + bs], range(s, s + bs))
        by_batch[bs] = torch.cat(seen)
    assert by_batch[4].shape == (4, 4, 16, 16)
    assert torch.equal(by_batch[4], by_batch[2]) and torch.equal(by_batch[4], by_batch[1])
    flat = by_batch[4].flatten(1).double()
    corr = torch.corrcoef(flat)
    off = corr[~torch.eye(4, dtype=torch.bool)]
    assert float(off.abs().max()) < 0.1  # 1024 values each: independent draws correlate at ~1/32
    # and the same image at another index gets another noise (it is keyed by the image index)
    ex = Extractor(mini_pipe, ["mid_block"], ExtractionSettings(mode="corrected", seed=5))
    seen = _capture_noise(ex, monkeypatch)
    ex.run_batch([images[0], images[0]], [0, 7])
    assert torch.equal(seen[0][0], by_batch[4][0]) and not torch.equal(seen[0][1], seen[0][0])


# ---------------------------------------------------------------------------------------------
# a timestep sweep: the noise level at the U-Net input follows the timestep for every scheduler
# ---------------------------------------------------------------------------------------------

SWEEP = [10, 50, 200, 400, 700, 950]


def _unet_inputs(pipe, settings, images):
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        Extractor(pipe, ["mid_block"], settings).run_batch(images, list(range(len(images))))
    finally:
        handle.remove()
    return seen[0].double()


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_timestep_sweep_gives_a_monotone_noise_level(scheduler_models, name):
    """Paper mode (the scheduler's ``scale_model_input`` applies), a pipeline whose scheduler was used before at
    t=999: at each timestep the U-Net input is s_t (sqrt(abar_t) x + sqrt(1 - abar_t) eps) with s_t the scheduler's
    scaling at *that* timestep (Euler: 1/sqrt(sigma_t^2 + 1)), measured from two images that share the noise
    (signal part) and two seeds on one image (noise part); the noise-to-signal ratio rises with t."""
    pipe = load_pipeline(ModelSpec(name, str(scheduler_models[name])), device="cpu")
    pipe.scheduler.scale_model_input(torch.zeros(1, 4, 8, 8), torch.tensor(999))  # leaves Euler's step index set
    imgs = random_images(2, 64, seed=3)
    with torch.no_grad():
        x = torch.stack([pipe.vae.encode(Extractor(pipe, ["mid_block"], ExtractionSettings())._pixels([im]))
                         .latent_dist.mean[0] for im in imgs]).double() * pipe.vae.config.scaling_factor
    abar = pipe.scheduler.alphas_cumprod.double()
    ratios = []
    for t in SWEEP:
        two = _unet_inputs(pipe, ExtractionSettings(timestep=t, latent="mean", seed=1), imgs)
        other_seed = _unet_inputs(pipe, ExtractionSettings(timestep=t, latent="mean", seed=2), imgs)
        signal = (two[0] - two[1]).norm() / (x[0] - x[1]).norm()
        eps = [(torch.manual_seed(s), torch.randn(1, 4, 8, 8))[1].double() for s in (1, 2)]
        noise = (two[0] - other_seed[0]).norm() / (eps[0] - eps[1]).norm()
        sigma = ((1 - abar[t]) / abar[t]) ** 0.5
        scale = 1 / (sigma ** 2 + 1) ** 0.5 if name == "euler" else 1.0
        assert float(signal) == pytest.approx(float(scale * abar[t] ** 0.5), rel=1e-3), (name, t)
        assert float(noise) == pytest.approx(float(scale * (1 - abar[t]) ** 0.5), rel=1e-3), (name, t)
        ratios.append(float(noise / signal))
    assert all(b > a for a, b in zip(ratios, ratios[1:])), ratios
