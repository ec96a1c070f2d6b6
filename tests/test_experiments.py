"""Experiments (diffaudit.experiments): the configuration contract and what each switch does to the extraction."""
import pytest
import torch

from conftest import random_images
from diffaudit import experiments
from diffaudit.config import ConfigError, load_config
from diffaudit.extract import ExtractionSettings, Extractor, run_extraction
from diffaudit.store import open_variant

LAYERS = ["down_blocks[0].resnets[0]", "mid_block"]


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("exps,message", [
    ({"a": {"padding": "circular"}}, "experiments.a.padding: unknown key"),
    ({"a": {"padding_mode": "mirror"}}, "experiments.a.padding_mode: 'mirror' is not one of zeros, reflect"),
    ({"a": {"noise": "own"}}, "experiments.a.noise: 'own' is not one of shared, independent"),
    ({"a": {"padding_scope": "vae"}}, "experiments.a.padding_scope: 'vae' needs a padding_mode (reflect, replicate"),
    ({"a": {"padding_scope": "both", "padding_mode": "zeros"}}, "experiments.a.padding_scope: 'both' needs a padding"),
    ({"a": {"padding_scope": "unet", "padding_mode": "circular"}},
     "experiments.a.padding_scope: 'unet' is not one of denoiser, vae, both"),
    ({"a": {"timestep": 1000}}, "experiments.a.timestep: 1000 is outside 0..999"),
    ({"a": {"timestep": "50"}}, "experiments.a.timestep: expected an integer"),
    ({"a": {"resolution": 500}}, "experiments.a.resolution: 500 is not a positive multiple of 64"),
    ({"a": {"weights": "pretrained"}}, "experiments.a.weights: 'pretrained' is not one of trained, random"),
    ({"a": {"prompt": "a {label}"}}, "experiments.a.prompt: the only placeholder is {class}"),
    ({"a": {"crops": "yes"}}, "experiments.a.crops: expected true or false"),
    ({"a": {"harm": "yes"}}, "experiments.a.harm: expected true or false"),
    ({"a": {"layers": []}}, "experiments.a.layers: expected `paper` or a non-empty list"),
    ({"a": {}}, "experiments.a: expected a non-empty mapping"),
    ({"baseline": {"seed": 1}}, "experiments.baseline: 'baseline' is reserved"),
])
def test_bad_experiments_are_one_line_errors_naming_the_key(exps, message):
    with pytest.raises(experiments.ExperimentError) as err:
        experiments.validate(exps)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_experiment_names_are_checked_by_the_schema(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiments: {'a/b': {seed: 1}}\n")
    with pytest.raises(ConfigError, match="config key experiments"):
        load_config("params.yaml", bad)
    assert load_config("params.yaml")["experiments"] == {}


def test_an_experiments_harm_adds_outputs_not_a_cause(tmp_path):
    """`harm: true` asks for the experiment's harm tables: it changes nothing of its extraction, its harm jobs are in
    the DAG (the other experiment's are not), and it needs harm.enabled."""
    from diffaudit.dvcgen import snakemake_jobs

    assert experiments.extraction_overrides({"seed": 1, "harm": True}) == {"seed": 1}
    assert experiments.effective_extraction({"mode": "paper"}, {"harm": True}) == {"mode": "paper"}
    off = tmp_path / "off.yaml"
    off.write_text("experiments: {a: {seed: 1, harm: true}}\n")
    with pytest.raises(ConfigError, match="experiments.a.harm: true needs harm.enabled: true"):
        load_config("params.yaml", off)
    on = tmp_path / "on.yaml"
    on.write_text("harm: {enabled: true}\nexperiments: {a: {seed: 1, harm: true}, b: {seed: 2}}\n")
    jobs = snakemake_jobs(["params.yaml", str(on)], config={"models": ["sd15"]})
    harm = {j["wildcards"].get("exp", "") for j in jobs if j["rule"] in ("harm", "extract_harm")}
    assert harm == {"", "/experiments/a"}


def test_effective_extraction_changes_only_the_named_keys():
    base = load_config("params.yaml")["extraction"]
    assert experiments.effective_extraction(base, {}) == base
    eff = experiments.effective_extraction(base, {"padding_mode": "circular", "layers": ["mid_block"], "crops": False})
    assert eff == {**base, "padding_mode": "circular", "crops": False}
    assert experiments.resolved(base) == {"padding_mode": "zeros", "padding_scope": "denoiser", "weights": "trained",
                                          "noise": "shared",
                                          "pixel_range": "unit", "latent": "sample", "timestep": 50, "seed": 42,
                                          "prompt": ""}
    assert experiments.resolved({**base, "mode": "corrected"})["noise"] == "independent"
    assert experiments.class_prompt("a photo of a {class}", "golden_retriever") == "a photo of a golden retriever"
    assert experiments.class_prompt("{class}", "astronaut.png") == "astronaut"


# ---------------------------------------------------------------------------------------------
# what the switches do
# ---------------------------------------------------------------------------------------------

def _run(pipe, settings, images, indices=None, labels=None, layers=LAYERS, names=()):
    ex = Extractor(pipe, layers, settings, label_names=names)
    return ex.run_batch(images, indices if indices is not None else list(range(len(images))), labels=labels)


def test_padding_mode_changes_values_not_shapes_and_is_restored(mini_pipe):
    imgs = random_images(2, 128, seed=1)
    base = _run(mini_pipe, ExtractionSettings(), imgs)
    convs = [m for m in mini_pipe.unet.modules() if isinstance(m, torch.nn.Conv2d)]
    for mode in ("circular", "reflect", "replicate"):
        out = _run(mini_pipe, ExtractionSettings(padding_mode=mode), imgs)
        for layer in LAYERS:
            assert out[layer].shape == base[layer].shape
            assert not torch.allclose(out[layer], base[layer])
        assert {m.padding_mode for m in convs} == {"zeros"}
    assert torch.equal(_run(mini_pipe, ExtractionSettings(padding_mode="zeros"), imgs)["mid_block"],
                       base["mid_block"])
    with pytest.raises(ValueError, match="reflect' needs every feature map larger than its padding"):
        _run(mini_pipe, ExtractionSettings(padding_mode="reflect"), random_images(1, 64, seed=1))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_padding_mode_on_a_dit_stops_in_one_line(family):
    """SD3's patch convolution (kernel = stride) pads nothing and FLUX has no convolution: an experiment that changes
    the padding would report "no effect", so the run stops instead."""
    from diffaudit.errors import UserError
    from diffaudit.families import registry

    fam = registry.get(family)
    pipe = fam.build_embedded(f"mini-{family}")
    for scope in (None, "both"):
        with pytest.raises(UserError, match=r"^padding_mode 'circular' has nothing to act on: .* no convolution that "
                                            r"pads; leave the switch out for this model \(or set padding_scope: vae\)$"):
            Extractor(pipe, fam.paper_layers(pipe.transformer)[:1],
                      ExtractionSettings(mode="corrected", padding_mode="circular", padding_scope=scope))
    Extractor(pipe, fam.paper_layers(pipe.transformer)[:1], ExtractionSettings(mode="corrected", padding_mode="zeros"))
    # the VAE encoder has padded convolutions: the scope `vae` is an experiment a DiT can run
    Extractor(pipe, fam.paper_layers(pipe.transformer)[:1],
              ExtractionSettings(mode="corrected", padding_mode="circular", padding_scope="vae"))


def test_circular_padding_makes_a_conv_translation_equivariant(mini_pipe):
    """With circular padding, conv_in commutes with a cyclic shift of its input (no position from the border)."""
    from diffaudit.extract import conv_padding

    conv = mini_pipe.unet.conv_in
    x = torch.randn(1, conv.in_channels, 16, 16)
    shifted = torch.roll(x, shifts=(3, 5), dims=(2, 3))
    with torch.no_grad():
        with conv_padding(mini_pipe.unet, "circular"):
            a, b = conv(x), conv(shifted)
        assert torch.allclose(torch.roll(a, shifts=(3, 5), dims=(2, 3)), b, atol=1e-5)
        assert not torch.allclose(torch.roll(conv(x), shifts=(3, 5), dims=(2, 3)), conv(shifted), atol=1e-3)


def test_independent_noise_differs_between_images_shared_does_not(mini_pipe):
    img = random_images(1, 64, seed=2)
    two = img * 2
    for mode in ("paper", "corrected"):
        shared = _run(mini_pipe, ExtractionSettings(mode=mode, noise="shared", latent="mean"), two)["mid_block"]
        indep = _run(mini_pipe, ExtractionSettings(mode=mode, noise="independent", latent="mean"), two)["mid_block"]
        assert torch.allclose(shared[0], shared[1], atol=1e-6), mode
        assert not torch.allclose(indep[0], indep[1], atol=1e-3), mode
    # independent noise is the image's own: the same in any batch position
    alone = _run(mini_pipe, ExtractionSettings(mode="corrected"), img, indices=[1])["mid_block"]
    assert torch.allclose(alone[0], indep[1], atol=1e-5)


def test_pixel_range_latent_and_seed_switches_change_the_input(mini_pipe):
    imgs = random_images(2, 64, seed=3)
    base = _run(mini_pipe, ExtractionSettings(), imgs)["mid_block"]
    for kw in ({"pixel_range": "symmetric"}, {"latent": "mean"}, {"seed": 7}, {"timestep": 400}):
        assert not torch.allclose(_run(mini_pipe, ExtractionSettings(**kw), imgs)["mid_block"], base), kw


def test_random_weights_same_architecture_recorded_seed(mini_pipe):
    imgs = random_images(1, 64, seed=4)
    before = {k: v.clone() for k, v in mini_pipe.unet.state_dict().items()}
    ex = Extractor(mini_pipe, LAYERS, ExtractionSettings(weights="random"))
    assert ex.unet is not mini_pipe.unet and dict(ex.unet.config) == dict(mini_pipe.unet.config)
    a = ex.run_batch(imgs, [0])
    b = Extractor(mini_pipe, LAYERS, ExtractionSettings(weights="random")).run_batch(imgs, [0])
    base = _run(mini_pipe, ExtractionSettings(), imgs)
    for layer in LAYERS:
        assert torch.equal(a[layer], b[layer]) and a[layer].shape == base[layer].shape
        assert not torch.allclose(a[layer], base[layer])
    assert all(torch.equal(v, mini_pipe.unet.state_dict()[k]) for k, v in before.items())


def test_class_prompt_conditions_each_image_on_its_class(mini_pipe):
    img = random_images(1, 64, seed=5)
    names = ["tabby_cat", "school_bus"]
    s = ExtractionSettings(prompt="a photo of a {class}", latent="mean")
    out = _run(mini_pipe, s, img * 2, labels=[0, 1], names=names)["mid_block"]
    assert not torch.allclose(out[0], out[1], atol=1e-4)
    same = _run(mini_pipe, ExtractionSettings(prompt="a photo of a tabby cat", latent="mean"), img)["mid_block"]
    assert torch.allclose(out[0], same[0], atol=1e-5)
    with pytest.raises(ValueError, match="labels are not known"):
        _run(mini_pipe, s, img)


def test_resolution_resizes_and_the_stores_record_it(mini_pipe, tmp_path):
    imgs = random_images(4, 128, seed=6)
    s = ExtractionSettings(batch_size=2, resolution=64, crops=True)
    out = run_extraction(mini_pipe, dataset_images=lambda a, b: imgs[a:b], image_ids=[str(i) for i in range(4)],
                         labels=[0, 1, 0, 1], layers=LAYERS, settings=s, out_dir=tmp_path / "r",
                         provenance={"model": "mini"}, image_size=128, progress=False)
    full = open_variant(out, "full")
    assert full.shape("down_blocks[0].resnets[0]")[-2:] == (8, 8)  # 64 px / 8 (VAE)
    assert full.attrs["image_size"] == 64 and full.attrs["resolution"] == 64
    crops = sorted(p.name for p in out.iterdir() if p.name.startswith("crop"))
    assert crops == ["crop8.zarr"]  # mid_block is 1x1 at 64 px: too small for a ring
    # the ring is cut from the resized 64 px image: (64 - 2 * 8) / 8 = 6 tokens a side
    assert open_variant(out, "crop8").shape("down_blocks[0].resnets[0]")[-2:] == (6, 6)
