"""Workflow tasks on their own: paper comparison from the published files, label-source selection."""
import shutil

import pandas as pd
import pytest
import yaml

from conftest import REPO, shared_reference
from diffaudit import label_sources, paper_files
from diffaudit.config import merge
from diffaudit.paper_run import differences, verdict
from diffaudit.pipeline import paper_comparison, paper_reference

PAPER = yaml.safe_load((REPO / "params.yaml").read_text())


def write_status(d, cfg, model):
    d.mkdir(parents=True, exist_ok=True)
    (d / "status.json").write_text(__import__("json").dumps(verdict(cfg, model)))
    return d


def test_the_paper_run_is_recognised_and_every_other_setting_is_named():
    assert differences(PAPER, "sd15") == [] and verdict(PAPER, "sdturbo")["applies"]
    assert not verdict(PAPER, "mini")["applies"]  # the authors labelled only their models
    cases = {
        "extraction.mode": {"extraction": {"mode": "corrected"}},
        "extraction.seed": {"extraction": {"seed": 43}},
        "extraction.timestep": {"extraction": {"timestep": 200}},
        "extraction.batch_size": {"extraction": {"batch_size": 10}},
        "extraction.prompt": {"extraction": {"prompt": "a photo"}},
        "dataset.source": {"dataset": {"source": "folder"}},
        "dataset.imagenet.source": {"dataset": {"imagenet": {"source": "local"}}},
        "dataset.n_images": {"dataset": {"n_images": 100}},
        "dataset.size": {"dataset": {"size": 768}},
        "model_sources.sd15": {"model_sources": {"sd15": {"id": "someone/else", "revision": "main"}}},
    }
    for key, override in cases.items():
        v = verdict(merge(PAPER, override), "sd15")
        assert not v["applies"] and len(v["differences"]) == 1 and v["differences"][0].startswith(key), (key, v)
        assert key in v["reason"]
        forced = verdict(merge(PAPER, {**override, "paper_reference": "force"}), "sd15")
        assert forced["applies"] and forced["forced"] and key in forced["reason"]
    assert not verdict(merge(PAPER, {"paper_reference": "force"}), "mini")["applies"]  # nothing to force


def test_the_extraction_must_have_run_like_the_authors():
    """Paper-mode noise comes from the device's generator: a CPU extraction draws other noise for seed 42."""
    assert verdict(PAPER, "sd15", extraction={"device": "cuda:0", "compute_dtype": "float16"})["applies"]
    v = verdict(PAPER, "sd15", extraction={"device": "cpu", "compute_dtype": "float32"})
    assert not v["applies"] and len(v["differences"]) == 2
    assert "ran on cpu" in v["reason"] and "computed in float32" in v["reason"]


def test_label_sources_follow_the_verdict(tmp_path):
    a = PAPER["anomalies"]
    ok = write_status(tmp_path / "ok", PAPER, "sd15")
    assert label_sources.label_sources(a, "sd15", ok) == ({"paper": str(ok / "high_norm_anomalies_sd15.npy"),
                                                      "auto": None}, None)
    other = merge(PAPER, {"extraction": {"seed": 43}})
    sources, why = label_sources.label_sources(a, "sd15", write_status(tmp_path / "seed", other, "sd15"))
    assert sources == {"auto": None} and "extraction.seed is 43" in why
    user = merge(a, {"labels": ["paper", "/x/my.npy"]})
    sources, why = label_sources.label_sources(user, "mini", write_status(tmp_path / "mini", PAPER, "mini"))
    assert sources == {"user:my.npy": "/x/my.npy"} and "mini" in why
    assert label_sources.user_label_files(user) == ["/x/my.npy"]


def test_paper_reference_offline_without_files_names_prefetch(tmp_path):
    from diffaudit.paper_files import ReferenceFetchError

    with pytest.raises(ReferenceFetchError, match="diffaudit prefetch"):
        paper_reference.run(PAPER, "sd15", tmp_path / "out", cache_dir=tmp_path / "empty",
                            url_base=(tmp_path / "nowhere").as_uri())
    assert not (tmp_path / "out").exists()
    # not the authors' run: no files needed, the verdict is written
    out = paper_reference.run(merge(PAPER, {"extraction": {"mode": "corrected"}}), "sd15", tmp_path / "out",
                              cache_dir=tmp_path / "empty")
    status = paper_files.read_status(out)
    assert not status["applies"] and status["files"] == {} and "extraction.mode" in status["reason"]


@pytest.mark.skipif(not (shared_reference() / "paper-data").is_dir(), reason="published files not available")
def test_paper_comparison_of_the_published_numbers_with_themselves(tmp_path, monkeypatch):
    from diffaudit.paper_files import paper_tables

    cache = tmp_path / "cache"
    shutil.copytree(shared_reference() / "paper-data", cache)  # pre-placed files: no network needed
    ref = paper_reference.run(PAPER, "sd15", tmp_path / "paper_reference", cache_dir=cache,
                              url_base=(tmp_path / "nowhere").as_uri())
    assert len(paper_files.read_status(ref)["files"]) == 5
    tables = tmp_path / "sd15"
    tables.mkdir()
    for name, df in paper_tables("sd15", ref).items():
        df.to_csv(tables / f"{name}.csv", index=False)
    out = tmp_path / "cmp.csv"
    paper_comparison.run("sd15", tables, ref, out, tmp_path / "fig")
    cmp = pd.read_csv(out)
    assert set(cmp["quantity"]) >= {"acc_8x8", "acc_64x64", "corner_ratio", "border_ratio", "rel_norm_mean"}
    assert len(cmp) > 45 * 5 and cmp["delta"].abs().max() < 1e-5
    assert (tmp_path / "fig.png").stat().st_size > 10_000 and (tmp_path / "fig.svg").is_file()


def test_paper_comparison_elsewhere_is_empty_and_says_why(tmp_path):
    tables = tmp_path / "mini"
    tables.mkdir()
    other = merge(PAPER, {"extraction": {"mode": "corrected"}})
    ref = write_status(tmp_path / "ref", other, "sd15")
    paper_comparison.run("sd15", tables, ref, tmp_path / "cmp.csv", tmp_path / "fig")
    assert pd.read_csv(tmp_path / "cmp.csv").empty and (tmp_path / "fig.png").is_file()
