"""Acceptance of the experiments on the demo: the demo's configuration (config/demo.yaml: the embedded mini-cal, its
32 images, its experiments), run through the extraction and probe task modules on the experiments' layers.

With random weights, zero padding makes position decodable; circular padding with independent noise brings the probe
close to chance. (With mini-cal's calibrated VAE the U-Net sees the images, so the shared noise no longer adds
position of its own; README, "Why do the artifacts appear?".)"""
import numpy as np
import pandas as pd
import pytest

from diffaudit.analyses.bootstrap import Bootstrap
from diffaudit.analyses.paired import paired_differences
from diffaudit.config import load_config
from diffaudit.pipeline import dataset as dataset_task
from diffaudit.pipeline import extract as extract_task
from diffaudit.pipeline import position_probe as probe_task

PROBED = ("mid_block", "up_blocks[0]")


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """The baseline and `circular_independent` of the demo (its model and images), on the experiments' layers: their
    probe summaries and their per-image accuracies."""
    from diffaudit.models import save_embedded_model

    root = tmp_path_factory.mktemp("demo_experiments")
    cfg = load_config("params.yaml", "config/demo.yaml")
    (model,) = cfg["models"]
    cfg["model_sources"][model] = str(save_embedded_model(model, root / model))
    cfg["extraction"]["crops"] = False
    exp = cfg["experiments"]["circular_independent"]
    cfg["layers"] = exp["layers"]
    dataset_task.run(cfg, root / "dataset")
    out, per_image, reps = {}, {}, {}
    for name, overrides in (("baseline", {}), ("circular_independent", exp)):
        run_cfg = {**cfg, "experiment": overrides}
        rep = reps[name] = extract_task.run(run_cfg, model, root / "dataset", root / name / "representations",
                                            progress=False)
        probe_task.run(run_cfg, model, [rep], root / name / "probe.csv", root / name / "summary.csv",
                       root / name / "per_image.csv")
        out[name] = pd.read_csv(root / name / "summary.csv")
        per_image[name] = pd.read_csv(root / name / "per_image.csv")
    return cfg, out, per_image, reps


def _final_8x8(summary: pd.DataFrame) -> pd.DataFrame:
    df = summary[(summary["metric"] == "per_axis") & (summary["granularity"] == 8)]
    df = df[df["epoch"] == df["epoch"].max()]
    return df[df["layer"].str.startswith(PROBED)]


def test_the_demo_experiments_are_the_two_causes_alone_and_together():
    exps = load_config("params.yaml", "config/demo.yaml")["experiments"]
    assert {k: {x: v for x, v in o.items() if x not in ("layers", "crops")} for k, o in exps.items()} == {
        "circular": {"padding_mode": "circular"}, "independent": {"noise": "independent"},
        "circular_independent": {"padding_mode": "circular", "noise": "independent"}}
    layers = exps["circular_independent"]["layers"]
    assert {x for x in layers if x.startswith(PROBED)} == {
        "mid_block.resnets[0]", "mid_block.attentions[0]", "mid_block.resnets[1]", "up_blocks[0].resnets[0]",
        "up_blocks[0].resnets[1]", "up_blocks[0].upsamplers[0]"}


def test_circular_padding_and_independent_noise_bring_the_probe_to_chance(demo_runs):
    """Final-epoch 8x8 per-axis accuracy, mean over the mid_block and up_blocks[0] layers (chance 1/8; the demo's
    probe at lr 0.01, converged): the baseline above 3x chance, circular_independent within 1.6x chance (the run of
    2026-12-07: 0.53 and 0.18, 8 test images): most, not all, of the position goes (the VAE's own zero padding is
    not switched by padding_scope denoiser)."""
    _, runs, _, _ = demo_runs
    base, both = (_final_8x8(runs[n]) for n in ("baseline", "circular_independent"))
    assert len(base) == len(both) == 6
    chance = 1 / 8
    assert base["accuracy"].mean() > 3 * chance, base[["layer", "accuracy"]]
    assert both["accuracy"].mean() < 1.6 * chance, both[["layer", "accuracy"]]
    # and by number, per layer: the baseline's interval lies above the experiment's on most layers
    merged = base.merge(both, on="layer", suffixes=("_base", "_both"))
    assert (merged["ci_low_base"] > merged["ci_high_both"]).mean() >= 0.5, merged


def test_the_paired_difference_of_the_demo_experiment_excludes_zero(demo_runs):
    """The same comparison as a paired difference (the same test images, the same resamples on both sides): the
    experiment minus the baseline is below 0 with its interval on every probed layer where the bands separate, and
    the estimate is the difference of the two runs' accuracies."""
    cfg, runs, per_image, _ = demo_runs
    layers = _final_8x8(runs["baseline"])["layer"].tolist()
    d = paired_differences(per_image["baseline"], per_image["circular_independent"], layers,
                           Bootstrap.from_config(cfg["bootstrap"])).set_index("layer")
    base, both = (_final_8x8(runs[n]).set_index("layer")["accuracy"] for n in ("baseline", "circular_independent"))
    assert np.allclose(d["acc_8x8_diff"], (both - base).loc[layers], atol=1e-5)
    assert (d["acc_8x8_diff_ci_high"] < 0).mean() >= 0.5, d
    assert (d["acc_8x8_diff_ci_low"] <= d["acc_8x8_diff"]).all() and (d["acc_8x8_diff"] <= d["acc_8x8_diff_ci_high"]).all()


def test_position_mean_brings_the_probe_to_chance_on_the_demo(demo_runs):
    """Harm acceptance (docs/harm.md): on the demo's baseline (its 32 images, the probe's 24 training images as the
    fit images), the 8x8 probe of the mitigated features (mitigations.csv's probe_acc8) on the mid_block and
    up_blocks[0] layers: `none` above 2x chance on every layer, `position_mean` within 1.5x chance on every layer."""
    from diffaudit.harm.evaluate import harm_images, layer_measures
    from diffaudit.harm.mitigations import fit_store_mitigations
    from diffaudit.pipeline.harm import settings
    from diffaudit.store import LayerCache, open_model_stores

    cfg, _, _, reps = demo_runs
    full, _ = open_model_stores(reps["baseline"])
    fit, test = harm_images(full.n_images, cfg["probe"], full.n_images)
    s = settings(cfg)
    chance = 1 / 8
    for layer in [la for la in full.layers if la.startswith(PROBED)]:
        mem = LayerCache(full, layer)
        mits = fit_store_mitigations(mem, layer, fit, ("none", "position_mean"))
        rows = {r["mitigation"]: r for r in layer_measures(mem, {}, layer, mits, {}, fit, test, None, 32, cfg["probe"],
                                                           512, s, Bootstrap(200, 0.95, 0))}
        assert rows["none"]["probe_acc8"] > 2 * chance, (layer, rows["none"]["probe_acc8"])
        assert rows["position_mean"]["probe_acc8"] < 1.5 * chance, (layer, rows["position_mean"]["probe_acc8"])
