"""diffaudit.layout builds and parses every results path; what it builds, it parses back."""
from pathlib import Path

from diffaudit import layout


def test_run_suffix_and_name_round_trip():
    assert layout.run_suffix(layout.BASELINE) == ""
    assert layout.run_suffix("circular") == "/experiments/circular"
    for run in (layout.BASELINE, "circular", "t200"):
        assert layout.run_name(layout.run_suffix(run)) == run
    assert layout.run_dir("results/demo/", "mini", layout.run_suffix("circular")) == \
        "results/demo/mini/experiments/circular"


def test_representation_parts_and_shard_index():
    assert layout.representation_parts(1) == ["representations"]
    parts = layout.representation_parts(3)
    assert parts == ["representations/shard1of3", "representations/shard2of3", "representations/shard3of3"]
    assert [layout.shard_index(p) for p in parts] == [0, 1, 2]
    assert layout.shard_index("representations") is None


def test_crop_variants_parse_back():
    assert layout.crop_variant(16) == "crop16"
    assert layout.crop_token_size(layout.crop_variant(16)) == 16
    assert layout.crop_token_size(layout.FULL) is None


def test_stored_runs_finds_baseline_experiments_and_shards(tmp_path: Path):
    model = tmp_path / "mini"
    layout.store_path(model / "representations", layout.FULL).mkdir(parents=True)
    for i in (1, 0):  # made out of order: listed in shard order
        layout.store_path(model / layout.representation_parts(2)[i], layout.FULL).mkdir(parents=True)
    exp = model / "experiments" / "circular" / "representations"
    for part in layout.representation_parts(2):
        layout.store_path(exp.parent / part, layout.FULL).mkdir(parents=True)
    (model / "experiments" / "empty" / "representations").mkdir(parents=True)  # nothing stored: no run
    layout.store_path(model / "representations", layout.crop_variant(8)).mkdir()
    runs = layout.stored_runs(model)
    assert list(runs) == [layout.BASELINE, "circular"]
    assert runs[layout.BASELINE] == ([model / "representations"], model)
    assert runs["circular"][0] == [exp / "shard1of2", exp / "shard2of2"]
    assert layout.list_variants(model / "representations") == ["crop8", "full"]
    assert layout.stored_runs(tmp_path / "nothing") == {}
