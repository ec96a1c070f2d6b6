"""Workflow tasks on their own: paper comparison from the published files, label-source selection."""
import shutil

import pandas as pd
import pytest
import yaml

from conftest import REPO, shared_reference
from diffaudit.config import merge
from diffaudit.pipeline import anomalies, common, paper_comparison
from diffaudit.reference import paper_applies

PAPER = yaml.safe_load((REPO / "params.yaml").read_text())


def test_label_sources_follow_model_and_dataset():
    assert anomalies.label_sources(PAPER, "sd15") == {"paper": "resources/paper/high_norm_anomalies_sd15.npy",
                                                      "auto": None}
    assert anomalies.label_sources(PAPER, "mini") == {"auto": None}  # the authors labelled only their models
    folder = merge(PAPER, {"dataset": {"source": "folder"}, "anomalies": {"labels": ["paper", "/x/my.npy"]}})
    assert anomalies.label_sources(folder, "sd15") == {"user:my.npy": "/x/my.npy"}
    assert paper_applies(PAPER, "sdturbo") and not paper_applies(folder, "sdturbo")


@pytest.mark.skipif(not (shared_reference() / "paper-data").is_dir(), reason="published files not available")
def test_paper_comparison_of_the_published_numbers_with_themselves(tmp_path, monkeypatch):
    from diffaudit.reference import paper_tables

    cache = tmp_path / "cache"
    shutil.copytree(shared_reference() / "paper-data", cache)  # pre-placed files: no network needed
    monkeypatch.setattr(common, "PAPER_CACHE", cache)
    tables = tmp_path / "sd15"
    tables.mkdir()
    for name, df in paper_tables("sd15", cache).items():
        df.to_csv(tables / f"{name}.csv", index=False)
    out = tmp_path / "cmp.csv"
    paper_comparison.run(PAPER, "sd15", tables, out, tmp_path / "fig")
    cmp = pd.read_csv(out)
    assert set(cmp["quantity"]) >= {"acc_8x8", "acc_64x64", "corner_ratio", "border_ratio", "rel_norm_mean"}
    assert len(cmp) > 45 * 5 and cmp["delta"].abs().max() < 1e-5
    assert (tmp_path / "fig.png").stat().st_size > 10_000 and (tmp_path / "fig.svg").is_file()
