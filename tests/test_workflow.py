"""End-to-end: the Snakemake workflow on a fresh copy of the repository, offline."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import copy_repo, kill_mid_extraction, random_images
from diffaudit.families.sd import PAPER_LAYERS
from diffaudit.store import ReprStore

pytestmark = pytest.mark.slow
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


@pytest.fixture
def repo_copy(tmp_path):
    """The tracked files of the repository (as a fresh clone has them), without outputs."""
    return copy_repo(tmp_path / "repo")


def snakemake(repo: Path, *configfiles: Path | str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = SNAKEMAKE + ["--cores", "2", "--configfile", *map(str, configfiles)]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def mixed_folder(root: Path, n: int) -> Path:
    """Images of mixed sizes and modes, as users have them."""
    root.mkdir()
    for i, im in enumerate(random_images(n, 640, seed=11)):
        im = im.crop((0, 0, 640 - 37 * i, 640 - 13 * i))
        if i % 3 == 1:
            im = im.convert("L")
        elif i % 3 == 2:
            im = im.convert("RGBA")
        im.save(root / f"photo_{i:02d}{'.jpg' if i % 3 == 1 else '.png'}")
    return root


def test_acceptance_override_with_own_model_and_folder(repo_copy, mini_dir, tmp_path):
    imgs = mixed_folder(tmp_path / "imgs", 7)
    out = tmp_path / "out"
    override = write_yaml(tmp_path / "that.yaml", {
        "models": ["mymodel"], "model_sources": {"mymodel": str(mini_dir)},
        # 256 px rather than the default 512 (4x less extraction): the override's mechanics are the same
        "dataset": {"source": "folder", "path": str(imgs), "n_images": 6, "size": 256}, "results_dir": str(out)})
    snakemake(repo_copy, "params.yaml", override)
    rep = out / "mymodel" / "representations"
    # at 256 px the 64-px tokens are 4x4 maps, too small for a cropped variant (H - 2 < 3): no crop64
    assert sorted(p.name for p in rep.glob("*.zarr")) == ["crop16.zarr", "crop32.zarr", "crop8.zarr", "full.zarr"]
    full = ReprStore(rep / "full.zarr")
    assert full.layers == list(PAPER_LAYERS) and full.n_images == 6
    assert full.attrs["mode"] == "paper" and full.attrs["model_source"] == str(mini_dir)
    assert list(full.image_ids) == [f"{i:06d}" for i in range(6)]
    assert not (repo_copy / "resources" / "models" / "mini").exists()  # a local model needs no build
    assert full.attrs["image_size"] == 256 and full.shape("up_blocks[1].upsamplers[0]")[-1] == 16  # 256 / 16 px
    # the crop32 store (the coarsest at 256 px) holds exactly the 8x8 layers, at 6x6
    crop = ReprStore(rep / "crop32.zarr")
    assert crop.layers == [layer for layer in PAPER_LAYERS if full.shape(layer)[-1] == 8]
    assert {crop.shape(layer)[-1] for layer in crop.layers} == {6}
    # nothing to do on a second run
    again = snakemake(repo_copy, "params.yaml", override)
    assert "Nothing to be done" in again.stdout + again.stderr


def test_offline_demo(repo_copy, tmp_path):
    """The README's demo command, with the demo shortened to 10 images (and 2 harm images) to keep the suite fast."""
    short = write_yaml(tmp_path / "short.yaml", {"dataset": {"n_images": 10}, "harm": {"n_images": 2}})
    snakemake(repo_copy, "config/demo.yaml", short)
    rep = repo_copy / "results" / "demo" / "mini-cal" / "representations"
    full = ReprStore(rep / "full.zarr")
    assert full.n_images == 10 and len(full.layers) == 45
    assert (repo_copy / "resources" / "models" / "mini-cal" / "model_index.json").is_file()
    assert not (repo_copy / "resources" / "models" / "mini").exists()  # only the demo's model is built
    ds = repo_copy / "results" / "demo" / "dataset"
    assert len(list((ds / "images").glob("*.png"))) == 10
    x = np.asarray(full.array("up_blocks[1].upsamplers[0]")[:], dtype=np.float32)
    assert np.isfinite(x).all() and x.std() > 0

    tables = repo_copy / "results" / "demo" / "mini-cal"
    probe = pd.read_csv(tables / "position_probe.csv")
    assert set(probe["layer"]) == set(PAPER_LAYERS) and set(probe["epoch"]) == {1, 2, 3, 4, 5}
    summary = pd.read_csv(tables / "position_probe_summary.csv")  # paper mode: one seed, no sd
    assert len(summary) == len(probe) and (summary["n_seeds"] == 1).all() and summary["accuracy_sd"].isna().all()
    sim = pd.read_csv(tables / "token_group_similarity.csv")
    assert len(sim) == 45 and (sim["corner_sim_cropped_image"].abs() <= 1).all()
    anom = pd.read_csv(tables / "anomaly_rel_norm.csv")
    assert set(anom["label_source"]) <= {"auto"}  # no paper labels for the embedded model
    assert (tables / "channel_outliers.csv").is_file()
    cred = pd.read_csv(tables / "credibility.csv")
    assert len(cred) == 45 and cred["position_score"].between(0, 1).all()
    figures = repo_copy / "results" / "demo" / "figures"
    for stem in ["quantitative_mini-cal", "cross_model", "mini-cal/qualitative_token_similarity",
                 "mini-cal/qualitative_corner", "mini-cal/qualitative_norms", "mini-cal/qualitative_pca"]:
        for ext in (".png", ".svg"):
            assert (figures / (stem + ext)).stat().st_size > 1000, stem + ext
    # no published numbers or hand labels for the embedded model: the comparison is empty and every place says why
    assert pd.read_csv(tables / "paper_comparison.csv").empty
    status = json.loads((tables / "paper_reference" / "status.json").read_text())
    assert not status["applies"] and "model 'mini-cal' is not one of the authors' models" in status["reason"]
    detector = json.loads((tables / "anomaly_detector.json").read_text())
    assert detector["paper_labels"] == {"used": False, "reason": status["reason"]}
    # the demo's experiments: their own stores and tables, one comparison table and figure
    cmp = pd.read_csv(tables / "experiments.csv")
    assert cmp["experiment"].drop_duplicates().tolist() == ["baseline", "circular", "independent",
                                                            "circular_independent"]
    assert cmp.groupby("experiment").size().to_dict() == {"baseline": 45, "circular": 7, "independent": 7,
                                                          "circular_independent": 7}
    for name in ("circular", "independent", "circular_independent"):
        run = tables / "experiments" / name
        assert ReprStore(run / "representations" / "full.zarr").attrs["experiment"]["layers"][0] == \
            "mid_block.resnets[0]"
        assert all((run / f"{t}.csv").is_file() for t in ("position_probe", "token_group_similarity",
                                                          "anomaly_rel_norm", "channel_outliers"))
    assert ReprStore(tables / "experiments" / "circular" / "representations" / "full.zarr").attrs["padding_mode"] \
        == "circular"
    for ext in (".png", ".svg"):
        assert (figures / ("experiments_mini-cal" + ext)).stat().st_size > 1000
    # does it matter? the harm tables for all 45 layers, every task, metric and mitigation; validation; figure
    harm = pd.read_csv(tables / "harm.csv")
    assert harm["layer"].nunique() == 45 and len(harm) == 45 * 3 * 6 * 3
    assert set(harm["task"]) == {"flip", "shift", "stereo"} and set(harm["metric"]) == {
        "pck", "position_following", "hub_ratio"}
    none = harm[(harm["mitigation"] == "none") & (harm["metric"] == "pck")]
    assert none["value"].between(0, 1).all() and (none["n"] > 0).all()
    assert set(none.loc[none["task"] == "stereo", "unit"]) == {"tokens"}
    mit = pd.read_csv(tables / "mitigations.csv")
    assert len(mit) == 45 * 6 and mit.loc[mit["mitigation"] == "none", "probe_acc8"].notna().all()
    skipped = mit[mit["note"].fillna("").str.contains("nothing to act on")]
    assert harm.merge(skipped[["layer", "mitigation"]])["value"].isna().all()  # said, not reported as "no effect"
    val = pd.read_csv(tables / "credibility_validation.csv")
    assert set(val["axis"]) == {"position", "corner", "anomaly", "hazard"} and (val["n_layers"] <= 45).all()
    for ext in (".png", ".svg"):
        assert (figures / ("harm_mini-cal" + ext)).stat().st_size > 1000
    assert len(list((repo_copy / "results" / "demo" / "harm_pairs" / "images").glob("*.png"))) == 2 + 2 * 2 + 2

    # every job has its log
    logs = repo_copy / "results" / "demo" / "logs"
    assert {p.name for p in logs.iterdir()} >= {"extract", "position_probe", "anomalies", "dataset.log"}

    # a user label file: only the anomaly analysis re-runs, and what reads its label positions (the harm analysis)
    labels = tmp_path / "my_labels.npy"
    np.save(labels, np.array([[0, 4, 6], [3, 30, 0]], dtype=np.int64))
    user = write_yaml(tmp_path / "user.yaml", {"anomalies": {"labels": ["auto", str(labels)]}})
    proc = snakemake(repo_copy, "config/demo.yaml", short, user)
    ran = {ln.split()[-1].rstrip(":") for ln in proc.stdout.splitlines() + proc.stderr.splitlines()
           if ln.strip().startswith(("rule ", "localrule "))}
    assert ran - {"all"} == {"anomalies", "credibility", "quantitative_figure", "paper_comparison",
                              "cross_model_figure", "qualitative_figures", "run_summary",
                              "experiment_comparison", "harm", "harm_figure", "credibility_validation"}, ran
    anom = pd.read_csv(tables / "anomaly_rel_norm.csv")
    mine = anom[anom["label_source"] == "user:my_labels.npy"]
    assert len(mine) == 45 and (mine["n_anomalies"] == 2).all()


def test_offline_demo_sdxl(repo_copy):
    """The SDXL family end to end (config/demo-sdxl.yaml, 8 images at 256 px): the embedded mini-sdxl is built and
    loaded like a hub model; `layers: paper` is SDXL's list; every table and figure; the detector picks its layer."""
    snakemake(repo_copy, "config/demo-sdxl.yaml")
    assert (repo_copy / "resources" / "models" / "mini-sdxl" / "model_index.json").is_file()
    tables = repo_copy / "results" / "demo-sdxl" / "mini-sdxl"
    rep = tables / "representations"
    assert sorted(p.name for p in rep.glob("*.zarr")) == ["crop16.zarr", "crop32.zarr", "crop8.zarr", "full.zarr"]
    full = ReprStore(rep / "full.zarr")
    assert full.n_images == 8 and len(full.layers) == 34 and full.attrs["image_size"] == 256
    assert full.layers[1:4] == ["down_blocks[0].resnets[0]", "down_blocks[0].resnets[1]",
                                "down_blocks[0].downsamplers[0]"]
    assert full.attrs["family"] == "sdxl" and "nothing_at_all" in full.attrs["added_conditioning"]
    assert full.shape("mid_block.attentions[0]")[-1] == 8  # 256 px / 8 (VAE) / 4 (two downsamplers)
    probe = pd.read_csv(tables / "position_probe_summary.csv")
    assert probe["layer"].drop_duplicates().tolist() == full.layers and set(probe["granularity"]) == {8, 16, 32}
    sim = pd.read_csv(tables / "token_group_similarity.csv")
    assert sim["layer"].tolist() == full.layers
    detector = json.loads((tables / "anomaly_detector.json").read_text())
    assert detector["ref_layer_choice"].startswith("auto") and detector["ref_layer"] in full.layers
    assert full.shape(detector["ref_layer"])[1] >= 32  # not a latent-space output such as conv_out
    anom = pd.read_csv(tables / "anomaly_rel_norm.csv")
    assert set(anom["label_source"]) == {"auto"} and anom["layer"].drop_duplicates().tolist() == full.layers
    assert len(pd.read_csv(tables / "credibility.csv")) == 34
    figures = repo_copy / "results" / "demo-sdxl" / "figures"
    for stem in ["quantitative_mini-sdxl", "cross_model", "mini-sdxl/qualitative_token_similarity",
                 "mini-sdxl/qualitative_corner", "mini-sdxl/qualitative_norms", "mini-sdxl/qualitative_pca",
                 "experiments_mini-sdxl"]:
        for ext in (".png", ".svg"):
            assert (figures / (stem + ext)).stat().st_size > 1000, stem + ext


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_offline_demo_dit(family, repo_copy):
    """SD3 and FLUX end to end (config/demo-{sd3,flux}.yaml, 8 images at 256 px): a 16x16 patch grid in every layer,
    one crop variant (16 px), every table and figure."""
    snakemake(repo_copy, f"config/demo-{family}.yaml")
    model = f"mini-{family}"
    tables = repo_copy / "results" / f"demo-{family}" / model
    rep = tables / "representations"
    assert sorted(p.name for p in rep.glob("*.zarr")) == ["crop16.zarr", "full.zarr"]
    full = ReprStore(rep / "full.zarr")
    first = {"sd3": "pos_embed", "flux": "x_embedder"}[family]
    assert full.layers[0] == first and full.layers[1] == "transformer_blocks[0]" and full.n_images == 8
    assert {full.shape(layer)[2:] for layer in full.layers} == {(16, 16)}
    assert full.attrs["family"] == family and full.attrs["t5_used"] is True
    assert full.attrs["noise_level"]["from"].startswith("sdhelper")
    probe = pd.read_csv(tables / "position_probe_summary.csv")
    assert probe["layer"].drop_duplicates().tolist() == full.layers and set(probe["granularity"]) == {8, 16}
    assert pd.read_csv(tables / "token_group_similarity.csv")["layer"].tolist() == full.layers
    assert json.loads((tables / "anomaly_detector.json").read_text())["ref_layer"] in full.layers
    figures = repo_copy / "results" / f"demo-{family}" / "figures"
    for stem in [f"quantitative_{model}", "cross_model", f"{model}/qualitative_token_similarity",
                 f"{model}/qualitative_corner", f"{model}/qualitative_norms", f"{model}/qualitative_pca"]:
        for ext in (".png", ".svg"):
            assert (figures / (stem + ext)).stat().st_size > 1000, stem + ext


@pytest.mark.parametrize("case", ["unknown_model", "corrupt_image", "too_few", "unknown_layer", "bad_key"])
def test_bad_input_gives_one_clear_line(case, repo_copy, mini_dir, tmp_path):
    imgs = mixed_folder(tmp_path / "imgs", 3)
    cfg = {"models": ["mymodel"], "model_sources": {"mymodel": str(mini_dir)},
           "dataset": {"source": "folder", "path": str(imgs), "n_images": 3}, "results_dir": str(tmp_path / "o"),
           "extraction": {"crops": False}}
    expect = None
    if case == "unknown_model":
        cfg["models"] = ["sd99"]
        expect = "unknown model 'sd99'"
    elif case == "corrupt_image":
        (imgs / "photo_01.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
        expect = "photo_01.jpg"
    elif case == "too_few":
        cfg["dataset"]["n_images"] = 5
        expect = "only 3"
    elif case == "unknown_layer":
        cfg["layers"] = ["mid_block", "up_blocks[1].upsampler[0]"]
        expect = "did you mean up_blocks[1].upsamplers[0]"
    elif case == "bad_key":
        cfg["extraction"]["batchsize"] = 4
        expect = "config key extraction: unknown key"
    proc = snakemake(repo_copy, "params.yaml", write_yaml(tmp_path / "bad.yaml", cfg), check=False)
    assert proc.returncode != 0
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if expect in ln]
    assert lines, proc.stderr[-3000:]
    assert not (tmp_path / "o" / "mymodel" / "representations").exists()


def test_sharded_extraction_gives_the_same_tables(repo_copy, mini_dir, image_folder, tmp_path):
    """extraction.shards splits the images into batch-aligned jobs; the analyses read them as one dataset."""
    imgs = image_folder(6, 256)
    base = {"models": ["mini"], "model_sources": {"mini": str(mini_dir)},
            "dataset": {"source": "folder", "path": str(imgs), "n_images": 6, "size": 256, "min_side": 0},
            "extraction": {"batch_size": 2}}
    tables = {}
    for shards in (1, 3):
        out = tmp_path / f"out{shards}"
        cfg = {**base, "results_dir": str(out), "extraction": {"batch_size": 2, "shards": shards}}
        names = ["position_probe", "token_group_similarity", "anomaly_rel_norm", "channel_outliers"]
        # only the compared tables as targets (no figures); "--" ends the helper's list of configfiles
        snakemake(repo_copy, "params.yaml", write_yaml(tmp_path / f"s{shards}.yaml", cfg), "--",
                  *[out / "mini" / f"{name}.csv" for name in names])
        tables[shards] = {name: pd.read_csv(out / "mini" / f"{name}.csv") for name in names}
    assert sorted(p.name for p in (tmp_path / "out3" / "mini" / "representations").iterdir()) == [
        "shard1of3", "shard2of3", "shard3of3"]
    for name, df in tables[1].items():
        pd.testing.assert_frame_equal(df, tables[3][name], check_exact=True, obj=name)
    assert len(tables[1]["position_probe"]) > 0


def test_kill_9_during_snakemake_extraction_then_rerun(repo_copy, mini_dir, image_folder, tmp_path):
    """kill -9 of the whole Snakemake process group mid-extraction; `--unlock` and re-run resume the partial
    stores and give tables and stores identical to an uninterrupted run."""
    imgs = image_folder(8, 256)
    cfg = {"models": ["mini"], "model_sources": {"mini": str(mini_dir)},
           "dataset": {"source": "folder", "path": str(imgs), "n_images": 8, "size": 256, "min_side": 0},
           "extraction": {"batch_size": 2}}
    ref = write_yaml(tmp_path / "ref.yaml", {**cfg, "results_dir": str(tmp_path / "ref")})
    # the uninterrupted reference: only what is compared below (the tables; the stores come with them), no figures;
    # "--" ends the helper's list of configfiles
    snakemake(repo_copy, "params.yaml", ref, "--", *[tmp_path / "ref" / "mini" / f"{name}.csv" for name in
                                                     ["position_probe", "token_group_similarity", "anomaly_rel_norm",
                                                      "channel_outliers"]])

    run = write_yaml(tmp_path / "run.yaml", {**cfg, "results_dir": str(tmp_path / "run")})
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    n = kill_mid_extraction(SNAKEMAKE + ["--cores", "2", "--configfile", "params.yaml", str(run)], repo_copy, env,
                            partial_store=tmp_path / "run" / "mini" / "representations.partial" / "full.zarr",
                            after_images=4, timeout=300)
    assert 4 <= n < 8, f"the kill came too late or never (n_complete={n})"
    assert not (tmp_path / "run" / "mini" / "representations").exists()

    subprocess.run(SNAKEMAKE + ["--unlock", "--configfile", "params.yaml", str(run)], cwd=repo_copy, env=env,
                   check=True, capture_output=True)
    snakemake(repo_copy, "params.yaml", run)
    for name in ["position_probe", "token_group_similarity", "anomaly_rel_norm", "channel_outliers"]:
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "ref" / "mini" / f"{name}.csv"),
                                      pd.read_csv(tmp_path / "run" / "mini" / f"{name}.csv"), check_exact=True)
    a = ReprStore(tmp_path / "ref" / "mini" / "representations" / "full.zarr")
    b = ReprStore(tmp_path / "run" / "mini" / "representations" / "full.zarr")
    for layer in a.layers:
        assert np.array_equal(a.array(layer)[:], b.array(layer)[:]), layer


def test_experiments_leave_the_baseline_byte_identical(repo_copy, mini_dir, image_folder, tmp_path):
    """The same small run three times: params.yaml without the `experiments` key, with `experiments: {}`, and with
    one experiment. Every baseline output file is byte-identical in the three; the experiment gets its own tables
    in the same formats and a row in experiments.csv."""
    imgs = image_folder(4, 128)
    base = {"models": ["mini"], "model_sources": {"mini": str(mini_dir)},
            "dataset": {"source": "folder", "path": str(imgs), "n_images": 4, "size": 128, "min_side": 0},
            "extraction": {"batch_size": 2}, "probe": {"epochs": 2, "granularities": [8]}}
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    del params["experiments"]
    (repo_copy / "params_without_key.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    runs = {"no_key": ("params_without_key.yaml", {}), "empty": ("params.yaml", {"experiments": {}}),
            "one": ("params.yaml", {"experiments": {"circ": {"padding_mode": "circular", "crops": False, "layers": [
                "down_blocks[1].resnets[0]", "mid_block", "up_blocks[1].upsamplers[0]"]}}})}
    files = {}
    for name, (params_file, extra) in runs.items():
        out = tmp_path / name
        snakemake(repo_copy, params_file, write_yaml(tmp_path / f"{name}.yaml", {**base, **extra, "results_dir": str(out)}))
        files[name] = {p.relative_to(out / "mini"): p.read_bytes() for p in sorted((out / "mini").glob("*.*"))
                       if p.is_file()}
    assert files["no_key"].keys() >= {Path("position_probe.csv"), Path("token_group_similarity.csv"),
                                      Path("anomaly_rel_norm.csv"), Path("channel_outliers.csv"),
                                      Path("credibility.csv"), Path("experiments.csv")}
    for rel, data in files["no_key"].items():
        assert files["empty"][rel] == data, rel
        if rel.name != "experiments.csv":
            assert files["one"][rel] == data, rel
    exp = tmp_path / "one" / "mini" / "experiments" / "circ"
    for table in ("position_probe", "position_probe_summary", "anomaly_rel_norm", "channel_outliers"):
        theirs, ours = pd.read_csv(exp / f"{table}.csv"), pd.read_csv(tmp_path / "one" / "mini" / f"{table}.csv")
        assert list(theirs.columns) == list(ours.columns), table
        if table != "channel_outliers":  # only layers with outlier channels have rows there
            assert set(theirs["layer"]) == {"down_blocks[1].resnets[0]", "mid_block", "up_blocks[1].upsamplers[0]"}
    assert pd.read_csv(exp / "token_group_similarity.csv").empty  # crops: false, no control
    status = json.loads((exp / "paper_reference" / "status.json").read_text())
    assert not status["applies"]
    cmp = pd.read_csv(tmp_path / "one" / "mini" / "experiments.csv")
    assert cmp["experiment"].drop_duplicates().tolist() == ["baseline", "circ"]
    assert (cmp.loc[cmp["experiment"] == "circ", "changes"] == "padding_mode=circular").all()
    assert (tmp_path / "one" / "figures" / "experiments_mini.png").stat().st_size > 5000
    # paired with the baseline: the same test image on both sides, so every probed layer has a difference, but no
    # interval (one test image of 4 in paper mode); no crops in the experiment, so no corner difference; the notes
    # say why; the baseline's differences are empty
    circ = cmp[cmp["experiment"] == "circ"].set_index("layer")
    shared = ["down_blocks[1].resnets[0]", "up_blocks[1].upsamplers[0]"]
    assert circ.loc[shared, "acc_8x8_diff"].notna().all() and circ["acc_8x8_diff_ci_low"].isna().all(), circ
    assert circ.loc[shared, "diff_note"].str.contains("acc_8x8: 1 test image, no interval").all()
    assert circ.loc[shared, "diff_note"].str.contains("corner_ratio: no cropped variants in this run").all()
    assert circ["corner_ratio_diff"].isna().all()
    # `mid_block` (the whole block) is no layer of the baseline's: nothing to pair it with
    assert circ.loc["mid_block", "diff_note"] == "not paired: the baseline has no such layer"
    assert circ.loc[["mid_block"], ["acc_8x8_diff", "rel_norm_diff"]].isna().all().all()
    assert cmp.loc[cmp["experiment"] == "baseline", ["acc_8x8_diff", "rel_norm_diff"]].isna().all().all()
    # the experiment's anomaly analysis evaluated the baseline's label positions (source baseline:auto), or, where
    # the baseline's detector found none on these 4 small images, the note says so
    if len(pd.read_csv(tmp_path / "one" / "mini" / "anomaly_labels.csv")):
        assert "baseline:auto" in set(pd.read_csv(exp / "anomaly_rel_norm.csv")["label_source"])
        assert (circ["rel_norm_source"] == "baseline:auto").all()
    else:
        assert circ.loc[shared, "diff_note"].str.contains("rel_norm_mean: no label positions of the baseline").all()
