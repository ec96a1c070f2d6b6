"""The experiments comparison (diffaudit.analyses.comparison) and its figure."""
import numpy as np
import pandas as pd

from diffaudit.analyses.comparison import COMPARISON_COLUMNS, compare, run_summary
from diffaudit.figures.experiments import differs, plot_experiments


def _tables(layers, spatial, acc, start_index=0, ratio=1.5, rel=2.0, sources=("auto",)):
    probe_rows, sim_rows, anom_rows = [], [], []
    for i, (layer, n) in enumerate(zip(layers, spatial)):
        for epoch in (1, 2):
            for g in (8, 16):
                for metric in ("per_axis", "joint"):
                    a = acc[i] if (epoch, g, metric) == (2, 8, "per_axis") else 0.01
                    probe_rows.append(dict(model="m", layer_index=start_index + i, layer=layer, channels=4, spatial=n,
                                           epoch=epoch, granularity=g, metric=metric, accuracy=a,
                                           ci_low=a - 0.05, ci_high=a + 0.05, interior_accuracy=a / 2))
        sim_rows.append(dict(model="m", layer_index=start_index + i, layer=layer, spatial=n, corner_ratio=ratio,
                             corner_ratio_ci_low=ratio - 0.1, corner_ratio_ci_high=ratio + 0.1, border_ratio=1.0))
        for s in sources:
            anom_rows.append(dict(model="m", layer_index=start_index + i, layer=layer, spatial=n, label_source=s,
                                  rel_norm_mean=rel if s == "auto" else 9.0, rel_norm_ci_low=rel - 0.2,
                                  rel_norm_ci_high=rel + 0.2))
    return pd.DataFrame(probe_rows), pd.DataFrame(sim_rows), pd.DataFrame(anom_rows)


def test_run_summary_takes_the_final_epoch_8x8_per_axis_row_and_the_intervals():
    probe, sim, anom = _tables(["a", "b", "c"], [64, 8, 4], [0.5, 0.3, 0.6])
    s = run_summary(probe, sim, anom)
    assert list(s["layer"]) == ["a", "b", "c"] and list(s["layer_index"]) == [0, 1, 2]
    assert np.allclose(s["acc_8x8"], [0.5, 0.3, 0.6]) and np.allclose(s["acc_8x8_ci_low"], [0.45, 0.25, 0.55])
    assert np.allclose(s["chance_8x8"], [1 / 8, 1 / 8, 1 / 4])  # 1/min(8, n)
    assert np.allclose(s["interior_acc_8x8"], [0.25, 0.15, 0.3])
    # k = 2: a 64-map's interior rows 2..61 fill 8 bins unevenly (8 of 60 at most); an 8-map's 2..5 four bins
    assert np.allclose(s["interior_chance_8x8"].iloc[1], 0.25) and s["interior_chance_8x8"].iloc[2] != \
        s["interior_chance_8x8"].iloc[2]  # 4-map: no interior at k = 2 (NaN)
    assert np.allclose(s["corner_ratio_ci_high"], 1.6) and (s["rel_norm_source"] == "auto").all()
    # the hand labels win over the detector where both exist
    s2 = run_summary(*_tables(["a"], [64], [0.5], sources=("auto", "paper")))
    assert s2["rel_norm_source"].tolist() == ["paper"] and s2["rel_norm_mean"].tolist() == [9.0]
    # a missing table leaves its columns empty
    s3 = run_summary(probe, None, None)
    assert s3["corner_ratio"].isna().all() and len(s3) == 3


def test_compare_aligns_experiments_on_the_baseline_layer_index():
    base = run_summary(*_tables(["a", "b", "c", "d"], [64, 32, 16, 8], [0.5, 0.4, 0.3, 0.2]))
    # the experiment extracted two layers only, so its own indices are 0 and 1
    exp = run_summary(*_tables(["c", "d"], [16, 8], [0.1, 0.12]))
    out = compare("m", {"baseline": base, "circ": exp}, {"circ": {"padding_mode": "circular", "layers": ["c", "d"]}})
    assert list(out.columns) == COMPARISON_COLUMNS
    assert out["experiment"].tolist() == ["baseline"] * 4 + ["circ"] * 2
    circ = out[out["experiment"] == "circ"]
    assert circ["layer_index"].tolist() == [2, 3] and circ["layer"].tolist() == ["c", "d"]
    assert circ["changes"].iloc[0] == "padding_mode=circular"  # scope keys (layers, crops) are not causes
    assert (out.loc[out["experiment"] == "baseline", "changes"] == "").all()


def test_experiments_figure_is_written(tmp_path):
    base = run_summary(*_tables(["a", "b", "c"], [64, 32, 16], [0.5, 0.4, 0.3]))
    exp = run_summary(*_tables(["b", "c"], [32, 16], [0.1, 0.12], ratio=1.0, rel=1.1))
    table = compare("m", {"baseline": base, "x": exp}, {"x": {"noise": "independent"}})
    png, svg = plot_experiments(table, tmp_path / "experiments_m", model="m")
    assert png.stat().st_size > 5000 and svg.stat().st_size > 5000
    text = svg.read_text()
    assert "x (noise=independent)" in text and "baseline" in text and "chance" in text
    assert "paired 95% interval of the difference excludes 0" not in text  # no paired difference: no marker
    # a layer whose paired interval excludes 0 gets a filled marker (and the legend says what it means)
    table.loc[table["experiment"] == "x", ["acc_8x8_diff_ci_low", "acc_8x8_diff_ci_high"]] = [[-0.4, -0.3],
                                                                                               [-0.1, 0.1]]
    assert differs(table[table["experiment"] == "x"], "acc_8x8").tolist() == [True, False]
    _, svg = plot_experiments(table, tmp_path / "experiments_m2", model="m")
    assert "paired 95% interval of the difference excludes 0" in svg.read_text()
    # baseline only (no experiments configured) still draws
    png2, _ = plot_experiments(compare("m", {"baseline": base}, {}), tmp_path / "b", model="m", title="only")
    assert png2.stat().st_size > 5000
