"""The authors' published numbers: checksum-verified fetching, safe parsing into our tables, comparison."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import REPO
from diffaudit import paper_files as ref
from diffaudit.families.sd import PAPER_LAYERS
from diffaudit.analyses.paper_comparison import COMPARISON_COLUMNS, compare_with_paper
from diffaudit.paper_files import (PAPER_FILES, ReferenceChecksumError, ReferenceFetchError, fetch,
                                   paper_layer_shape)

SHARED = Path("/work/shared/reference")
PAPER_DATA = SHARED / "paper-data"
needs_shared = pytest.mark.skipif(not PAPER_DATA.is_dir(), reason="shared reference folder not available")


# ---------------------------------------------------------------------------------------------
# Fetching and checksum verification (synthetic served files: no shared folder, no network)
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def served(tmp_path, monkeypatch):
    """A fake repository served over file:// with a registered file for (sd15, accuracies)."""
    repo = tmp_path / "remote"
    path = "data/accuracies_cls_sd15.pt"
    src = repo / path
    src.parent.mkdir(parents=True)
    torch.save(torch.rand(45, 5, 4), src)
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    monkeypatch.setitem(PAPER_FILES, ("sd15", "accuracies"), (path, sha))
    return repo, src, sha


def test_fetch_downloads_verifies_and_caches(tmp_path, served):
    repo, src, _ = served
    cache = tmp_path / "cache"
    got = fetch("sd15", "accuracies", cache, url_base=repo.as_uri())
    assert got == cache / "accuracies_cls_sd15.pt"
    assert got.read_bytes() == src.read_bytes()
    assert [p.name for p in cache.iterdir()] == [got.name]  # no temporary leftovers
    # a cached file with the right checksum is used without any download (the URL now points nowhere)
    assert fetch("sd15", "accuracies", cache, url_base=(tmp_path / "gone").as_uri()) == got


def test_fetch_rejects_tampered_download(tmp_path, served):
    repo, src, _ = served
    src.write_bytes(src.read_bytes() + b"x")  # the served file changed after its checksum was recorded
    cache = tmp_path / "cache"
    with pytest.raises(ReferenceChecksumError, match="does not match"):
        fetch("sd15", "accuracies", cache, url_base=repo.as_uri())
    assert list(cache.iterdir()) == []  # the bad download is deleted


def test_fetch_replaces_tampered_cached_file(tmp_path, served):
    repo, src, sha = served
    cache = tmp_path / "cache"
    cache.mkdir()
    dest = cache / "accuracies_cls_sd15.pt"
    dest.write_bytes(b"junk")
    # offline: the wrong file is not used but deleted, and the error says what to do
    with pytest.raises(ReferenceFetchError, match="network access") as e:
        fetch("sd15", "accuracies", cache, url_base=(tmp_path / "gone").as_uri())
    assert not isinstance(e.value, ReferenceChecksumError)
    assert "\n" not in str(e.value) and str(dest) in str(e.value) and "pre-placed" in str(e.value)
    assert list(cache.iterdir()) == []
    # online: replaced by the verified download
    dest.write_bytes(b"junk")
    assert fetch("sd15", "accuracies", cache, url_base=repo.as_uri()) == dest
    assert ref.sha256_file(dest) == sha


def test_fetch_unknown_model_or_kind(tmp_path):
    with pytest.raises(ReferenceFetchError, match="no published reference"):
        fetch("sd99", "accuracies", tmp_path)
    with pytest.raises(ReferenceFetchError, match="unknown reference kind"):
        fetch("sd15", "weights", tmp_path)


def test_paper_files_registry():
    assert len(PAPER_FILES) == 15
    for (model, kind), (path, sha) in PAPER_FILES.items():
        assert model in path and len(sha) == 64
        assert path.startswith("labeler/" if kind == "labels" else "data/")
    assert ref.URL_BASE.endswith(ref.COMMIT) and len(ref.COMMIT) == 40


@needs_shared
def test_paper_files_checksums_match_local_copies():
    for (model, kind), (path, sha) in PAPER_FILES.items():
        assert ref.sha256_file(PAPER_DATA / Path(path).name) == sha, (model, kind)


# ---------------------------------------------------------------------------------------------
# Safe loading
# ---------------------------------------------------------------------------------------------

class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_load_pt_refuses_arbitrary_globals(tmp_path, capsys):
    p = tmp_path / "evil.pt"
    torch.save({"x": _Evil()}, p)
    with pytest.raises(Exception, match="[Ww]eights only"):
        ref.load_pt(p)
    assert "must never run" not in capsys.readouterr().out


def test_load_pt_reads_numpy_float64_arrays(tmp_path):
    p = tmp_path / "arr.pt"
    a = np.linspace(0.5, 4.0, 45)
    torch.save(a, p)
    np.testing.assert_array_equal(ref.load_pt(p), a)


# ---------------------------------------------------------------------------------------------
# Layer geometry and column contracts
# ---------------------------------------------------------------------------------------------

def test_paper_layer_shape_examples():
    assert paper_layer_shape("conv_in") == (320, 64)
    assert paper_layer_shape("conv_out") == (4, 64)
    assert paper_layer_shape("down_blocks[0].downsamplers[0]") == (320, 32)
    assert paper_layer_shape("down_blocks[3].resnets[1]") == (1280, 8)
    assert paper_layer_shape("mid_block.attentions[0]") == (1280, 8)
    assert paper_layer_shape("up_blocks[0].upsamplers[0]") == (1280, 16)
    assert paper_layer_shape("up_blocks[1].upsamplers[0]") == (1280, 32)
    assert paper_layer_shape("up_blocks[1]") == (1280, 32)  # block output = its upsampler
    assert paper_layer_shape("up_blocks[2].upsamplers[0]") == (640, 64)
    assert paper_layer_shape("up_blocks[3].attentions[2]") == (320, 64)
    assert paper_layer_shape("up_blocks[1].resnets[0]", image_size=768) == (1280, 24)
    assert paper_layer_shape("up_blocks[1].attentions[0].proj_out") is None
    assert paper_layer_shape("time_embedding") is None


def test_column_contracts_match_the_analyses():
    """The published tables have the leading columns of ours (one schema each, in diffaudit.tables)."""
    from diffaudit.analyses.anomalies import ANOMALY_TABLE_COLUMNS
    from diffaudit.analyses.probe import TABLE_COLUMNS
    from diffaudit.analyses.similarity import TABLE_COLUMNS as SIM_TABLE_COLUMNS

    ours = {"position_probe": TABLE_COLUMNS, "token_group_similarity": list(SIM_TABLE_COLUMNS),
            "anomaly_rel_norm": ANOMALY_TABLE_COLUMNS}
    assert set(ref.TABLES) == set(ours)
    for name, columns in ref.TABLES.items():
        assert ours[name][:len(columns)] == list(columns), name


# ---------------------------------------------------------------------------------------------
# Parsing the authors' files (local copies served over file://)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """The shared paper-data laid out like the authors' repository, as a file:// URL base."""
    if not PAPER_DATA.is_dir():
        pytest.skip("shared reference folder not available")
    root = tmp_path_factory.mktemp("mirror")
    for path, _ in PAPER_FILES.values():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PAPER_DATA / Path(path).name, root / path)
    return root.as_uri()


@pytest.fixture(scope="module")
def paper(mirror, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return {m: ref.paper_tables(m, cache, url_base=mirror) for m in ref.PAPER_MODELS}


def _shared(name: str, model: str) -> pd.DataFrame:
    df = pd.read_csv(SHARED / name)
    return df[df["model"] == model].reset_index(drop=True)


@pytest.mark.parametrize("model", ["sd15", "sd21", "sdturbo"])
def test_position_probe_matches_shared_csv(paper, model):
    got = paper[model]["position_probe"]
    assert list(got.columns) == ref.PROBE_COLUMNS
    assert set(got["metric"]) == {"per_axis"} and set(got["seed"]) == {42}
    exp = _shared("position_probe_all_epochs.csv", model)
    keys = ["model", "layer_index", "layer", "channels", "spatial", "epoch", "granularity"]
    m = got.merge(exp, on=keys, suffixes=("", "_exp"), validate="one_to_one")
    assert len(m) == len(exp) == len(got) == 45 * 5 * 4
    np.testing.assert_allclose(m["accuracy"], m["accuracy_exp"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("model", ["sd15", "sd21", "sdturbo"])
def test_token_group_similarity_matches_shared_csv(paper, model):
    got = paper[model]["token_group_similarity"]
    assert list(got.columns) == list(ref.SIMILARITY_COLUMNS)
    exp = _shared("token_group_similarity.csv", model)
    assert got[["layer_index", "layer", "channels", "spatial"]].equals(exp[["layer_index", "layer", "channels",
                                                                           "spatial"]])
    for col in ref.SIMILARITY_COLUMNS[5:]:
        np.testing.assert_allclose(got[col], exp[col], atol=1e-6, rtol=0, err_msg=col)


@pytest.mark.parametrize("model", ["sd15", "sd21", "sdturbo"])
def test_anomaly_rel_norm_matches_shared_csv(paper, model):
    got = paper[model]["anomaly_rel_norm"]
    assert list(got.columns) == ref.RELNORM_COLUMNS
    assert set(got["label_source"]) == {"paper"}
    exp = _shared("anomaly_rel_norm.csv", model)
    assert got[["layer_index", "layer", "channels", "spatial", "n_anomalies"]].equals(
        exp[["layer_index", "layer", "channels", "spatial", "n_anomalies"]])
    np.testing.assert_allclose(got["rel_norm_mean"], exp["rel_norm_mean"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(got["rel_norm_std"], exp["rel_norm_std"], atol=1e-6, rtol=0)
    assert got["n_anomalies"].iloc[0] == {"sd15": 196, "sd21": 93, "sdturbo": 457}[model]


# ---------------------------------------------------------------------------------------------
# compare_with_paper (synthetic tables: no shared folder needed)
# ---------------------------------------------------------------------------------------------

def synthetic_tables(model: str = "sd15", layers=PAPER_LAYERS, seed: int = 0, seeds=(42,)) -> dict:
    rng = np.random.default_rng(seed)
    meta = [(model, i, n, *paper_layer_shape(n)) for i, n in enumerate(layers)]
    acc = rng.uniform(0.05, 1.0, size=(len(layers), 5, 4))
    probe = pd.DataFrame([(*mt, e + 1, g, "per_axis", s, float(acc[li, e, gi]))
                          for li, mt in enumerate(meta) for e in range(5) for gi, g in enumerate((8, 16, 32, 64))
                          for s in seeds], columns=ref.PROBE_COLUMNS)
    sims = rng.uniform(0.1, 0.6, size=(len(layers), 6))
    sim = pd.DataFrame([(*mt, s[0] / s[1], s[2] / s[3], s[4] / s[5], *s) for mt, s in zip(meta, sims)],
                       columns=ref.SIMILARITY_COLUMNS)
    norms = rng.uniform(0.8, 4.0, size=len(layers))
    an = pd.DataFrame([(*mt, "paper", float(v), 0.1 * float(v), 100) for mt, v in zip(meta, norms)],
                      columns=ref.RELNORM_COLUMNS)
    return {"position_probe": probe, "token_group_similarity": sim, "anomaly_rel_norm": an}


def test_compare_identical_gives_zero_delta():
    p = synthetic_tables()
    out = compare_with_paper(p, p)
    assert list(out.columns) == COMPARISON_COLUMNS
    assert set(out["quantity"]) == {"acc_8x8", "acc_16x16", "acc_32x32", "acc_64x64", "corner_ratio",
                                    "border_ratio", "rel_norm_mean"}
    assert len(out) == 45 * 7
    assert (out["delta"] == 0).all() and np.allclose(out["ours"], out["paper"])
    # final epoch is used
    acc = p["position_probe"]
    v = acc[(acc.layer == "conv_in") & (acc.epoch == 5) & (acc.granularity == 16)]["accuracy"].item()
    assert out[(out.layer == "conv_in") & (out.quantity == "acc_16x16")]["paper"].item() == pytest.approx(v)


def test_compare_averages_seeds_and_matches_on_layer_name():
    paper = synthetic_tables()
    ours = synthetic_tables()
    pr = ours["position_probe"]
    ours["position_probe"] = pd.concat([pr.assign(seed=1, accuracy=pr.accuracy + 0.02),
                                        pr.assign(seed=2, accuracy=pr.accuracy + 0.06),
                                        pr.assign(metric="joint", accuracy=0.0)])
    ours["token_group_similarity"] = ours["token_group_similarity"].assign(
        corner_ratio=lambda d: d.corner_ratio * 2)
    # ours: a re-indexed subset of the layers, plus a second label source that must be ignored
    keep = ["conv_in", "up_blocks[1].upsamplers[0]", "conv_out"]
    for k, df in ours.items():
        df = df[df.layer.isin(keep)].copy()
        df["layer_index"] = df["layer"].map({n: i for i, n in enumerate(keep)})
        ours[k] = df
    an = ours["anomaly_rel_norm"]
    ours["anomaly_rel_norm"] = pd.concat([an, an.assign(label_source="auto", rel_norm_mean=99.0)])
    out = compare_with_paper(ours, paper)
    assert out["layer"].tolist()[::7] == keep and out["layer_index"].tolist()[::7] == [0, 1, 2]
    acc = out[out.quantity.str.startswith("acc_")]
    np.testing.assert_allclose(acc["delta"], 0.04, atol=1e-12)
    cr = out[out.quantity == "corner_ratio"]
    np.testing.assert_allclose(cr["delta"], cr["paper"], rtol=1e-12)
    assert (out[out.quantity.isin(["border_ratio", "rel_norm_mean"])]["delta"] == 0).all()


def test_compare_skips_missing_tables_and_other_sources():
    paper = synthetic_tables()
    ours = {"position_probe": None,
            "anomaly_rel_norm": paper["anomaly_rel_norm"].assign(label_source="auto")}
    out = compare_with_paper(ours, paper)
    assert list(out.columns) == COMPARISON_COLUMNS and out.empty
    out = compare_with_paper({"token_group_similarity": paper["token_group_similarity"]}, paper)
    assert set(out["quantity"]) == {"corner_ratio", "border_ratio"}


def test_compare_does_not_match_across_models():
    paper = synthetic_tables("sd15")
    ours = synthetic_tables("sd21")
    assert compare_with_paper(ours, paper).empty


@needs_shared
def test_compare_with_paper_itself(paper):
    out = compare_with_paper(paper["sd21"], paper["sd21"])
    assert len(out) == 45 * 7 and (out["delta"] == 0).all()
    assert out[(out.layer == "up_blocks[1].resnets[2]") & (out.quantity == "rel_norm_mean")]["paper"].item() \
        == pytest.approx(2.263, abs=1e-3)


def test_prefetch_fills_the_caches_for_offline_runs(mirror, mini_dir, tmp_path, monkeypatch, capsys):
    """`diffaudit prefetch` (on a login node): the authors' files of every paper model in the configured run land
    verified in resources/paper, so the analyses need no network later; local models need no download."""
    from diffaudit import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ref, "URL_BASE", mirror)
    mine = tmp_path / "mine.yaml"
    # sd15 is a local stand-in here, so the authors' files apply only when forced
    mine.write_text(yaml.safe_dump({"models": ["sd15", "mini"], "paper_reference": "force",
                                    "model_sources": {"sd15": str(mini_dir), "mini": str(mini_dir)}}))
    run = ["prefetch", "--configfile", str(REPO / "params.yaml"), str(mine)]
    cli.main(run)
    cache = tmp_path / "resources" / "paper"
    assert sorted(p.name for p in cache.iterdir()) == sorted(ref.cache_name("sd15", k) for k in ref.KINDS)
    for kind in ref.KINDS:
        assert ref.sha256_file(cache / ref.cache_name("sd15", kind)) == ref.PAPER_FILES[("sd15", kind)][1]
    out = capsys.readouterr().out
    assert f"sd15: local directory {mini_dir}" in out and "--until dataset" in out
    monkeypatch.setattr(ref, "URL_BASE", (tmp_path / "gone").as_uri())
    cli.main(run)  # everything cached and verified: no download needed
