"""The PixArt family (diffaudit.families.pixart): the embedded mini-pixart built offline and loaded through the
registry's loader, its recipe in corrected mode (its own DDPM schedule, T5 with its mask, image tokens only), the
token order of its maps, and paper mode refused."""
import json

import pytest
import torch

from conftest import random_images
from diffaudit.errors import UserError
from diffaudit.extract import ExtractionSettings, Extractor
from diffaudit.families import pixart, registry
from diffaudit.layers import resolve_layers
from diffaudit.models import ModelSpec, load_pipeline

FAM = registry.get("pixart")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """mini-pixart saved (float16 safetensors) and loaded back as every model is (AutoPipeline, float32 on the CPU)."""
    d = FAM.save_embedded("mini-pixart", tmp_path_factory.mktemp("pixart") / "mini-pixart")
    assert json.loads((d / "TINY_MODEL.json").read_text())["family"] == "pixart"
    return load_pipeline(ModelSpec("mini-pixart", str(d)), device="cpu", dtype=torch.float32)


def test_detected_once_and_laid_out_as_pixart(pipe):
    assert type(pipe).__name__ == "PixArtSigmaPipeline"
    assert registry.family_of(pipe) is FAM and registry.embedded_models()["mini-pixart"] == "pixart"
    assert FAM.paper_layers(pipe.transformer) == ["pos_embed"] + [f"transformer_blocks[{i}]" for i in range(3)]
    assert pipe.vae.config.scaling_factor == 0.13025 and pipe.vae.config.latent_channels == 4


def test_build_is_deterministic():
    a, b = (FAM.build_embedded("mini-pixart", seed=0).transformer.state_dict() for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = FAM.build_embedded("mini-pixart", seed=1).transformer.state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_corrected_extraction_uses_its_own_schedule_and_image_tokens(pipe):
    layers = FAM.paper_layers(pipe.transformer)
    ex = Extractor(pipe, layers, ExtractionSettings(mode="corrected", timestep=50, batch_size=2))
    out = ex.run_batch(random_images(2, 256), [0, 1])
    assert {tuple(v.shape) for v in out.values()} == {(2, 32, 16, 16)}  # 16 px tokens: a 16 x 16 grid at 256 px
    assert all(torch.isfinite(v).all() for v in out.values())
    desc = FAM.describe(ex)
    # PixArt's linear betas (1e-4..0.02), not SD's scaled-linear ones: abar_50 = 0.96995 (SD: 0.95158)
    assert desc["noise_level"]["alpha_bar"] == pytest.approx(0.96995, abs=1e-5)
    cond = ex.conditioning(2)
    assert set(cond) == {"encoder_hidden_states", "encoder_attention_mask"}
    assert cond["encoder_hidden_states"].shape == (2, pixart.MAX_SEQUENCE_LENGTH, 48)
    assert int(cond["encoder_attention_mask"][0].sum()) == 1  # the empty prompt: one valid token (</s>)


def test_patch_embedding_map_is_row_major(pipe):
    """A bump planted in one 2x2 latent patch of a non-square latent changes the pos_embed map at that patch only."""
    ex = Extractor(pipe, ["pos_embed"], ExtractionSettings(mode="corrected", timestep=50))
    cond = ex.conditioning(1)
    module = resolve_layers(pipe.transformer, ["pos_embed"])["pos_embed"]
    gy, gx = 2, 9
    base = torch.zeros(1, 4, 16, 24)
    bumped = base.clone()
    bumped[:, :, 2 * gy:2 * gy + 2, 2 * gx:2 * gx + 2] = 5.0
    maps = []
    for x in (base, bumped):
        args, kwargs, select = FAM.backbone_call(ex, x, torch.tensor(50), cond)
        got = {}
        handle = module.register_forward_hook(lambda m, i, o: got.setdefault("o", o))
        try:
            with torch.no_grad():
                pipe.transformer(*args, **kwargs)
        finally:
            handle.remove()
        maps.append(select("pos_embed", got["o"]))
    changed = (maps[1] - maps[0]).abs().amax(dim=(0, 1)) > 0
    assert tuple(changed.shape) == (8, 12)
    assert changed.nonzero().tolist() == [[gy, gx]]


def test_paper_mode_is_refused_in_one_line(pipe):
    with pytest.raises(UserError, match="PixArt has no paper recipe.*mode: corrected"):
        Extractor(pipe, ["pos_embed"], ExtractionSettings(mode="paper"))
