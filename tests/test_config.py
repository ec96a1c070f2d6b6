import pytest
import yaml

from conftest import REPO
from diffaudit.config import ConfigError, load_config, merge, validate


def test_params_and_demo_validate():
    cfg = load_config(REPO / "params.yaml")
    assert cfg["models"] == ["sd15", "sd21", "sdturbo"] and cfg["extraction"]["mode"] == "paper"
    assert cfg["dataset"]["source"] == "imagenet_subset" and cfg["dataset"]["n_images"] == 500
    demo = load_config(REPO / "params.yaml", REPO / "config" / "demo.yaml")
    assert demo["models"] == ["mini-cal"] and demo["dataset"]["source"] == "demo"
    assert demo["extraction"] == cfg["extraction"]  # untouched sections are inherited


def test_acceptance_override_merges(tmp_path):
    o = tmp_path / "o.yaml"
    o.write_text(yaml.safe_dump({"models": ["mymodel"], "model_sources": {"mymodel": "/abs/pipe"},
                                 "dataset": {"source": "folder", "path": "/abs/imgs", "n_images": 20},
                                 "results_dir": "/abs/out"}))
    cfg = load_config(REPO / "params.yaml", o)
    assert cfg["model_sources"]["mymodel"] == "/abs/pipe" and "sd15" in cfg["model_sources"]
    assert cfg["dataset"] == {**cfg["dataset"], "source": "folder", "path": "/abs/imgs", "n_images": 20, "size": 512}


@pytest.mark.parametrize("patch, key", [
    ({"extraction": {"mode": "exact"}}, "extraction.mode"),
    ({"extraction": {"batch_sise": 4}}, "extraction"),
    ({"dataset": {"n_images": "many"}}, "dataset.n_images"),
    ({"layers": []}, "layers"),
    ({"colour": "red"}, "<top level>"),
])
def test_bad_values_name_the_key(patch, key):
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    with pytest.raises(ConfigError, match=f"config key {key}"):
        validate(merge(base, patch))
