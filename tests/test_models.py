import hashlib
import json

import pytest
import torch

from diffaudit.families.sd import save_mini_model
from diffaudit.models import ModelLoadError, ModelSpec, compute_dtype, download_model, load_pipeline, resolve_model

REGISTRY = {"sd15": {"id": "stable-diffusion-v1-5/stable-diffusion-v1-5", "revision": "main"}, "mini": "/x/mini"}


def _digest(directory):
    h = hashlib.sha256()
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(directory).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_registry_resolution():
    s = resolve_model("sd15", REGISTRY)
    assert (s.source, s.revision, s.is_local) == ("stable-diffusion-v1-5/stable-diffusion-v1-5", "main", False)
    assert resolve_model("mini", REGISTRY).is_local
    assert resolve_model("someone/custom-sd", REGISTRY).source == "someone/custom-sd"
    with pytest.raises(ModelLoadError, match="unknown model 'sd99'.*model_sources"):
        resolve_model("sd99", REGISTRY)


def test_params_registry_has_the_paper_models():
    import yaml

    from conftest import REPO

    sources = yaml.safe_load((REPO / "params.yaml").read_text())["model_sources"]
    assert sources["sd14"]["id"] == "CompVis/stable-diffusion-v1-4"
    assert sources["sd15"]["id"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert sources["sd21"]["id"] == "stabilityai/stable-diffusion-2-1"
    assert sources["sdturbo"]["id"] == "stabilityai/sd-turbo"
    assert all("revision" in sources[k] for k in ("sd14", "sd15", "sd21", "sdturbo"))


def test_mini_is_deterministic_and_loads_through_from_pretrained(mini_dir, tmp_path):
    again = save_mini_model(tmp_path / "mini2")
    assert _digest(again) == _digest(mini_dir)
    assert json.loads((mini_dir / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert sorted(p.name for p in mini_dir.rglob("*.bin")) == []  # safetensors only
    pipe = load_pipeline(ModelSpec("mini", str(mini_dir)), device="cpu")
    assert pipe.unet.dtype == torch.float32 and type(pipe.scheduler).__name__ == "PNDMScheduler"
    assert pipe.vae.config.block_out_channels and len(pipe.vae.config.down_block_types) == 4  # 8x downsampling
    ids = pipe.tokenizer("a photo of a cat").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id and len(ids) > 4
    emb, *_ = pipe.encode_prompt([""], device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    assert emb.shape == (1, 77, pipe.unet.config.cross_attention_dim)


def test_other_seed_gives_other_weights(tmp_path, mini_dir):
    other = save_mini_model(tmp_path / "mini_s1", seed=1)
    assert _digest(other) != _digest(mini_dir)


def test_missing_local_model_is_one_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="model_index.json not found"):
        load_pipeline(ModelSpec("mine", str(tmp_path)), device="cpu")


def test_unreachable_hub_model_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as e:
        load_pipeline(ModelSpec("nope", "diffaudit-test/does-not-exist", "main"), device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and "To fix" in msg and "hf auth login" in msg and "model_sources.nope" in msg


def test_prefetching_a_hub_model_offline_says_what_to_do(monkeypatch, mini_dir):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as e:
        download_model(ModelSpec("nope", "diffaudit-test/does-not-exist", "main"))
    assert "\n" not in str(e.value) and "To fix" in str(e.value)
    assert download_model(ModelSpec("mini", str(mini_dir))) is None  # a local directory: nothing to download


def test_precision_rule():
    from diffaudit.families import registry

    # the paper's rule: float32 on the CPU; on CUDA float16, decided by the family once the model is loaded
    assert compute_dtype("cpu") == torch.float32 and compute_dtype("cuda") is None
    assert registry.get("sd").cuda_dtype(None) == torch.float16 and registry.get("sdxl").cuda_dtype(None) == torch.float16
    assert compute_dtype("cuda", "float32") == torch.float32
    with pytest.raises(ValueError):
        compute_dtype("cpu", "int8")


def _posterior_spreads(model_dir, tmp_path):
    """(posterior std, std over images of the posterior mean), both after scaling_factor, on 8 demo images at
    256 px ([0, 1] pixels, as the paper-mode extraction encodes them)."""
    import numpy as np

    from diffaudit.datasets.demo import build_demo
    from diffaudit.datasets.format import load_index
    from diffaudit.datasets.images import load_images

    ds = build_demo(tmp_path / "demo", n_images=8, size=256)
    x = torch.tensor(np.stack([np.asarray(im) for im in load_images(ds, load_index(ds))]), dtype=torch.float32)
    vae = load_pipeline(ModelSpec("m", str(model_dir)), device="cpu").vae
    with torch.no_grad():
        dist = vae.encode(x.permute(0, 3, 1, 2) / 255.0).latent_dist
    scale = vae.config.scaling_factor
    return float(dist.std.pow(2).mean().sqrt()) * scale, float(dist.mean.var(0, unbiased=False).mean().sqrt()) * scale


def test_mini_cal_is_mini_with_a_calibrated_vae(mini_dir, tmp_path):
    """mini-cal: byte-deterministic; mini's U-Net, text encoder and VAE weights except the log-variance half of
    quant_conv's bias; its posterior spread is small against the spread of its mean over images, which the scaling
    factor brings to about 1 (mini: the other way round, its U-Net mostly sees noise)."""
    from safetensors.torch import load_file

    from diffaudit.families.sd import MINI_CAL_LOGVAR_SHIFT
    from diffaudit.models import EMBEDDED_MODELS, save_embedded_model

    assert EMBEDDED_MODELS["mini-cal"] == "sd"
    cal = save_embedded_model("mini-cal", tmp_path / "mini-cal")
    assert _digest(save_embedded_model("mini-cal", tmp_path / "again")) == _digest(cal)
    for part in ("unet", "text_encoder"):
        assert _digest(cal / part) == _digest(mini_dir / part)
    theirs, ours = (load_file(d / "vae" / "diffusion_pytorch_model.safetensors") for d in (mini_dir, cal))
    assert {k for k in ours if not torch.equal(ours[k], theirs[k])} == {"quant_conv.bias"}
    shift = ours["quant_conv.bias"].float() - theirs["quant_conv.bias"].float()
    assert torch.equal(shift[:4], torch.zeros(4)) and torch.allclose(shift[4:], torch.full((4,), MINI_CAL_LOGVAR_SHIFT),
                                                                       atol=0.01)
    post, spread = _posterior_spreads(cal, tmp_path)
    assert post < 0.03 * spread and 0.85 < spread < 1.15, (post, spread)
    post, spread = _posterior_spreads(mini_dir, tmp_path / "m")
    assert post > 3 * spread, (post, spread)
