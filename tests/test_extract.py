"""Extraction fidelity: paper mode equals sdhelper 1.0.0; corrected mode's noise properties."""
import numpy as np
import pytest
import torch

from conftest import assert_equals_sdhelper, extract_batched, random_images
from diffaudit.extract import ExtractionSettings, Extractor, crop_image, token_sizes
from diffaudit.families.sd import PAPER_LAYERS

# SD-1.5 shapes at 512x512 (docs/method.md §1.3): spatial size per paper layer index.
SD15_SPATIAL = [64] * 5 + [32] * 5 + [16] * 5 + [8] * 8 + [16] * 7 + [32] * 7 + [64] * 7 + [64]


def test_mini_has_sd15_layer_names_and_resolutions(mini_pipe):
    ex = Extractor(mini_pipe, list(PAPER_LAYERS), ExtractionSettings())
    reps = ex.run_batch(random_images(1, 512), [0])
    assert [reps[layer].shape[-1] for layer in PAPER_LAYERS] == SD15_SPATIAL
    assert all(reps[layer].shape[-2] == reps[layer].shape[-1] for layer in PAPER_LAYERS)
    assert reps["conv_out"].shape[1] == 4
    # the ratio of channel widths follows SD-1.5's 320/640/1280/1280
    widths = [reps[layer].shape[1] for layer in ("conv_in", "down_blocks[1].resnets[0]", "mid_block.resnets[0]")]
    assert widths[1] == 2 * widths[0] and widths[2] == 4 * widths[0]


def test_paper_mode_equals_sdhelper_img2repr(mini_dir, mini_pipe):
    """Acceptance: all 45 layers, 25 images (two batches of 20), fp32 on CPU, <= 1e-5 x max|value|."""
    sdhelper = pytest.importorskip("sdhelper")
    images = random_images(25, 512, seed=1)
    ours = extract_batched(Extractor(mini_pipe, list(PAPER_LAYERS), ExtractionSettings(mode="paper")), images, 20)
    sd = sdhelper.SD(str(mini_dir), disable_progress_bar=True)
    assert sd.device == "cpu" and sd.dtype == torch.float32
    ref = sd.img2repr(images, list(PAPER_LAYERS), 50, seed=42)
    assert len(ref) == 25
    assert_equals_sdhelper(ours, ref, PAPER_LAYERS)


def test_paper_mode_reseeds_every_batch(mini_pipe):
    """Batch k of 20 gets the same noise as batch 0: identical images at the same slot give identical maps."""
    img = random_images(1, 512, seed=3)[0]
    ex = Extractor(mini_pipe, ["mid_block"], ExtractionSettings(mode="paper", batch_size=2))
    a = ex.run_batch([img, img], [0, 1])["mid_block"]
    b = ex.run_batch([img, img], [2, 3])["mid_block"]
    assert torch.equal(a, b)
    # within a batch, the posterior sample differs per slot
    assert not torch.equal(a[0], a[1])


def test_corrected_mode_is_batch_size_independent(mini_pipe):
    images = random_images(5, 256, seed=2)
    layers = ["down_blocks[1].resnets[0]", "up_blocks[1].upsamplers[0]"]
    ex = Extractor(mini_pipe, layers, ExtractionSettings(mode="corrected", seed=7))
    a = extract_batched(ex, images, 5)
    b = extract_batched(ex, images, 2)
    for layer in layers:
        assert torch.allclose(a[layer], b[layer], atol=1e-4 * float(a[layer].abs().max()))
    # independent noise per image: the same image at two indices gets different maps
    img = images[0]
    r = ex.run_batch([img, img], [0, 1])[layers[0]]
    assert not torch.allclose(r[0], r[1])


def test_corrected_crop_noise_is_the_crop_of_the_full_noise(mini_pipe):
    ex = Extractor(mini_pipe, ["conv_in"], ExtractionSettings(mode="corrected", seed=3))
    full = ex.corrected_noise([4], (32, 32))
    crop = ex.corrected_noise([4], (32, 32), crop_latent_px=2)
    assert crop.shape[-1] == 28 and torch.equal(crop, full[:, :, 2:-2, 2:-2])


def test_crop_image_removes_one_token_ring():
    img = random_images(1, 512)[0]
    c = crop_image(img, 16)
    assert c.size == (480, 480)
    assert np.array_equal(np.asarray(c), np.asarray(img)[16:-16, 16:-16])


def test_token_sizes_groups_layers_by_resolution():
    shapes = {"a": (4, 64, 64), "b": (8, 32, 32), "c": (8, 32, 32), "d": (8, 4, 4), "e": (8, 6, 5)}
    assert token_sizes(shapes, 512) == {8: ["a"], 16: ["b", "c"]}


def test_unknown_layer_error_lists_valid_names(mini_pipe):
    from diffaudit.layers import UnknownLayerError

    with pytest.raises(UnknownLayerError) as e:
        Extractor(mini_pipe, ["up_blocks[1].upsampler[0]"], ExtractionSettings())
    assert "up_blocks[1].upsampler[0]" in str(e.value) and "mid_block" in str(e.value)
