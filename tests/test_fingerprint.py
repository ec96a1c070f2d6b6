"""diffaudit fingerprint: content hashes that ignore machine provenance and catch any change of a value."""
import json

import numpy as np
import pytest
import zarr

from diffaudit import cli
from diffaudit.fingerprint import compare, fingerprint_tree


def _tree(root, value=1.0, device="cpu", table="a,b\n1,2\n"):
    run = root / "model"
    run.mkdir(parents=True)
    g = zarr.open_group(str(run / "full.zarr"), mode="w")
    g.attrs.update({"family": "sd", "device": device, "library_versions": {"torch": device}})
    a = g.create_array("layer", shape=(2, 3), dtype="float16")
    a[...] = np.full((2, 3), value, dtype="float16")
    (run / "table.csv").write_text(table)
    (root / "logs").mkdir()
    (root / "logs" / "x.csv").write_text(device)  # logs are not outputs
    return root


def test_provenance_is_ignored_and_every_value_counts(tmp_path):
    base = fingerprint_tree(_tree(tmp_path / "a"))
    assert set(base) == {"model/full.zarr::@attrs", "model/full.zarr::layer", "model/table.csv"}
    assert compare(base, fingerprint_tree(_tree(tmp_path / "b", device="cuda:0"))) == []
    assert compare(base, fingerprint_tree(_tree(tmp_path / "c", value=1.001))) == ["differs: model/full.zarr::layer"]
    assert compare(base, fingerprint_tree(_tree(tmp_path / "d", table="a,b\n1,3\n"))) == ["differs: model/table.csv"]


def test_cli_compares_and_fails_on_a_difference(tmp_path, capsys):
    a = _tree(tmp_path / "a")
    changed = _tree(tmp_path / "other" / "a", value=2.0)  # the same folder name: keys are prefixed by it
    cli.main(["fingerprint", str(a), "-o", str(tmp_path / "a.json")])
    assert len(json.loads((tmp_path / "a.json").read_text())) == 3
    cli.main(["fingerprint", str(a), "--compare", str(tmp_path / "a.json")])
    assert "identical: 3 entries" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fingerprint", str(changed), "--compare", str(tmp_path / "a.json")])
    assert exit_info.value.code == 1
    assert capsys.readouterr().out.strip() == "differs: a/model/full.zarr::layer"
