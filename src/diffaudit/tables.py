"""The tidy CSV tables: every table's columns, reading and writing them, and "final-epoch accuracy".

One home for the schemas that the analyses write, the paper-file loader (:mod:`diffaudit.paper_files`) parses
the authors' numbers into, the figures and the explorer read, and ``diffaudit.dvcgen`` names as outputs:

- ``position_probe``: :data:`PROBE_TABLE_COLUMNS`, and ``position_probe_summary``: :data:`PROBE_SUMMARY_COLUMNS`
  (:mod:`diffaudit.analyses.probe`);
- ``token_group_similarity``: :data:`SIMILARITY_TABLE_COLUMNS` (:mod:`diffaudit.analyses.similarity`);
- ``anomaly_rel_norm``: :data:`ANOMALY_TABLE_COLUMNS` (:mod:`diffaudit.analyses.anomalies`);
- ``channel_outliers``: :data:`CHANNEL_COLUMNS` (:mod:`diffaudit.analyses.channels`);
- ``credibility``: :data:`CREDIBILITY_COLUMNS` (:mod:`diffaudit.analyses.credibility`);
- ``paper_comparison``: :data:`PAPER_COMPARISON_COLUMNS`, and ``layer_summary/{model}``:
  :data:`LAYER_SUMMARY_COLUMNS` (:mod:`diffaudit.analyses.paper_comparison`);
- a run's summary and the experiments' table: :data:`RUN_SUMMARY_COLUMNS` (+ :data:`PAIRED_COLUMNS`),
  :data:`EXPERIMENT_COMPARISON_COLUMNS` (:mod:`diffaudit.analyses.comparison`);
- the analyses' per-image aggregates (``<analysis>_per_image.csv``): :data:`PER_IMAGE_COLUMNS`, and the anomaly
  label positions of a run (``anomaly_labels.csv``): :data:`ANOMALY_LABEL_COLUMNS` (:mod:`diffaudit.analyses.paired`).

The published tables of the authors have the leading columns only (:data:`PROBE_COLUMNS`,
:data:`SIMILARITY_COLUMNS`, :data:`RELNORM_COLUMNS`); ours append intervals and counts after them.

:func:`final_epoch` and :func:`final_epoch_accuracy` are the one definition of "the final epoch" (the largest
epoch of each layer) and of the accuracy reported for it (a statistic over seeds), used by the paper comparison,
the credibility scores, the run summaries and the figures.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# Schemas
# ---------------------------------------------------------------------------------------------

# position_probe.csv (analyses.probe); the published table has PROBE_COLUMNS only.
PROBE_COLUMNS = ["model", "layer_index", "layer", "channels", "spatial", "epoch", "granularity", "metric",
                 "seed", "accuracy"]
#: Appended by :func:`diffaudit.analyses.probe.run_probe` after :data:`PROBE_COLUMNS` (the published table has
#: only the accuracy): the bootstrap interval of the accuracy over the test images and the accuracy on the
#: interior tokens.
PROBE_EXTRA_COLUMNS = ["ci_low", "ci_high", "interior_accuracy"]
PROBE_TABLE_COLUMNS = PROBE_COLUMNS + PROBE_EXTRA_COLUMNS
# position_probe_summary.csv
PROBE_SUMMARY_KEYS = ["model", "layer_index", "layer", "channels", "spatial", "epoch", "granularity", "metric"]
#: Columns of :func:`diffaudit.analyses.probe.summarize_probe`, after the keys: the accuracy over the pooled
#: seeds, then the test split.
PROBE_SUMMARY_VALUES = ["accuracy", "accuracy_sd", "n_seeds", "test_images", "test_classes", "test_class_mix"]
#: Appended after :data:`PROBE_SUMMARY_VALUES`: the bootstrap interval of the seed-mean accuracy and the
#: seed-mean interior accuracy.
PROBE_SUMMARY_EXTRA = ["ci_low", "ci_high", "interior_accuracy"]
PROBE_SUMMARY_COLUMNS = PROBE_SUMMARY_KEYS + PROBE_SUMMARY_VALUES + PROBE_SUMMARY_EXTRA
#: Columns of :func:`diffaudit.analyses.probe.probe_splits` (one row per run, i.e. per seed).
PROBE_SPLIT_COLUMNS = ["seed", "test_images", "test_classes", "test_class_mix"]

# token_group_similarity.csv (analyses.similarity); the published table has SIMILARITY_COLUMNS only.
SIMILARITY_COLUMNS: tuple[str, ...] = (
    "model", "layer_index", "layer", "channels", "spatial",
    "corner_ratio", "border_ratio", "other_ratio",
    "corner_sim_cropped_image", "corner_sim_full_image_ring_removed",
    "border_sim_cropped_image", "border_sim_full_image_ring_removed",
    "other_sim_cropped_image", "other_sim_full_image_ring_removed",
)
#: Appended by :func:`diffaudit.analyses.similarity.token_group_similarity` after :data:`SIMILARITY_COLUMNS`
#: (the published table has none): the bootstrap intervals of the plotted ratios.
SIMILARITY_CI_COLUMNS: tuple[str, ...] = ("corner_ratio_ci_low", "corner_ratio_ci_high", "border_ratio_ci_low",
                                          "border_ratio_ci_high")
SIMILARITY_TABLE_COLUMNS: tuple[str, ...] = SIMILARITY_COLUMNS + SIMILARITY_CI_COLUMNS

# anomaly_rel_norm.csv (analyses.anomalies); the published table has RELNORM_COLUMNS only.
RELNORM_COLUMNS = ["model", "layer_index", "layer", "channels", "spatial", "label_source", "rel_norm_mean",
                   "rel_norm_std", "n_anomalies"]
#: Appended by :func:`diffaudit.analyses.anomalies.relative_norms` after :data:`RELNORM_COLUMNS` (the published
#: table has no per-image counts).
ANOMALY_PREVALENCE_COLUMNS = ["n_images", "n_images_with_anomalies"]
#: Appended after :data:`ANOMALY_PREVALENCE_COLUMNS`: the bootstrap interval over images of ``rel_norm_mean``.
ANOMALY_CI_COLUMNS = ["rel_norm_ci_low", "rel_norm_ci_high"]
ANOMALY_TABLE_COLUMNS = RELNORM_COLUMNS + ANOMALY_PREVALENCE_COLUMNS + ANOMALY_CI_COLUMNS

# channel_outliers.csv (analyses.channels)
CHANNEL_COLUMNS = ["model", "layer_index", "layer", "channels", "spatial", "channel", "median_abs_ratio", "max_abs",
                   "frac_images_outlier", "n_images"]

# credibility.csv (analyses.credibility)
CREDIBILITY_COLUMNS = ["model", "layer_index", "layer", "channels", "spatial",
                       "position_acc_8x8", "position_score", "position_input",
                       "corner_effect", "corner_score", "similarity_mode",
                       "anomaly_source", "anomaly_prevalence", "anomaly_rel_norm", "anomaly_score", "anomaly_mode",
                       "channel_max_ratio", "hazard", "hazard_axis", "safe", "missing_axes"]

# paper_comparison.csv and layer_summary/{model}.csv (analyses.paper_comparison)
PAPER_COMPARISON_COLUMNS = ["model", "layer_index", "layer", "quantity", "ours", "paper", "delta"]
#: The per-layer quantities of the paper's figure, in the order of the comparison table and the layer summary.
QUANTITY_ORDER = ["acc_8x8", "acc_16x16", "acc_32x32", "acc_64x64", "corner_ratio", "border_ratio",
                  "rel_norm_mean"]
LAYER_SUMMARY_COLUMNS = ["layer_index", "layer", "spatial", *QUANTITY_ORDER, "rel_norm_source"]

# run_summary.csv and the experiments' comparison (analyses.comparison)
RUN_SUMMARY_COLUMNS = ["layer_index", "layer", "spatial",
                       "acc_8x8", "acc_8x8_ci_low", "acc_8x8_ci_high", "chance_8x8", "interior_acc_8x8",
                       "interior_chance_8x8",
                       "corner_ratio", "corner_ratio_ci_low", "corner_ratio_ci_high",
                       "rel_norm_mean", "rel_norm_ci_low", "rel_norm_ci_high", "rel_norm_source"]
#: The quantities of a run that :func:`diffaudit.analyses.comparison.paired_differences` compares with the
#: baseline -> the stem of their difference columns (``<stem>``, ``<stem>_ci_low``, ``<stem>_ci_high``).
PAIRED_QUANTITIES = {"acc_8x8": "acc_8x8_diff", "interior_acc_8x8": "interior_acc_8x8_diff",
                     "corner_ratio": "corner_ratio_diff", "rel_norm_mean": "rel_norm_diff"}
#: Appended to :data:`RUN_SUMMARY_COLUMNS` in a run's summary: the run's own anomaly detections (``rel_norm_*``
#: are at the baseline's labels where the run could be evaluated there), then per quantity the paired difference
#: to the baseline with its paired bootstrap interval, and ``diff_note`` (why a difference is empty).
PAIRED_COLUMNS = (["own_rel_norm_mean", "own_rel_norm_ci_low", "own_rel_norm_ci_high", "own_rel_norm_source"]
                  + [f"{stem}{end}" for stem in PAIRED_QUANTITIES.values() for end in ("", "_ci_low", "_ci_high")]
                  + ["diff_note"])
EXPERIMENT_COMPARISON_COLUMNS = ["model", "experiment", "changes"] + RUN_SUMMARY_COLUMNS + PAIRED_COLUMNS

# <analysis>_per_image.csv: the per-image aggregates of a run's analyses, the input of the paired bootstrap
# (diffaudit.analyses.paired). One row per (layer, quantity, label source, probe seed, image): the image's term
# of the statistic, ``num`` / ``den`` (a mean over images has den 1; a ratio of sums sums both over images).
PER_IMAGE_COLUMNS = ["layer", "spatial", "image_size", "quantity", "label_source", "seed", "image", "image_id",
                     "num", "den"]
# anomaly_labels.csv: the label positions a run's anomaly analysis used, per source (rows (image, x, y) on the
# grid x grid reference grid of images of image_size px), read by its experiments' anomaly analyses.
ANOMALY_LABEL_COLUMNS = ["label_source", "image", "x", "y", "grid", "image_size"]

#: The tidy tables of one model that the summaries and figures read (file stems in its table folder).
MODEL_TABLES = ("position_probe", "token_group_similarity", "anomaly_rel_norm", "channel_outliers")
#: The corrected-mode twin of each table whose paper mode keeps an authors' quirk (file stem -> the twin's stem):
#: written next to it by the same rule from the same pass over the stores (in corrected mode a copy), and read
#: by the credibility score, whose inputs are free of the quirks (docs/credibility.md).
CORRECTED_TABLES: dict[str, str] = {"token_group_similarity": "token_group_similarity_corrected",
                                    "anomaly_rel_norm": "anomaly_rel_norm_corrected"}
#: The tables that have a published counterpart (file stem -> the shared leading columns).
PAPER_TABLES: dict[str, list[str]] = {"position_probe": PROBE_COLUMNS,
                                      "token_group_similarity": list(SIMILARITY_COLUMNS),
                                      "anomaly_rel_norm": RELNORM_COLUMNS}


# ---------------------------------------------------------------------------------------------
# Reading and writing
# ---------------------------------------------------------------------------------------------


# -- harm (diffaudit.harm, docs/harm.md) --
#: harm.csv: one row per layer, task, mitigation and metric.
#: ``diff``: a mitigation's value minus ``none``'s, with its paired interval (the same pairs or tokens resampled).
HARM_COLUMNS = ["model", "layer_index", "layer", "task", "mitigation", "metric", "value", "ci_low", "ci_high", "diff",
                "diff_ci_low", "diff_ci_high", "n", "unit", "note"]
#: mitigations.csv's measures of the mitigated features, each with ``_ci_low``/``_ci_high``.
MITIGATION_MEASURES = ("probe_acc8", "corner_ratio", "rel_norm", "semantic_acc")
MITIGATION_COLUMNS = (["model", "layer_index", "layer", "channels", "spatial", "mitigation"]
                      + [f"{m}{s}" for m in MITIGATION_MEASURES for s in ("", "_ci_low", "_ci_high")]
                      + ["active", "acts_on", "note"])
#: credibility_validation.csv: one row per credibility axis, harm metric and task.
CREDIBILITY_VALIDATION_COLUMNS = ["axis", "harm_metric", "task", "spearman", "ci_low", "ci_high", "n_layers", "note"]

def write_csv(df, out: str | Path) -> Path:
    """Write atomically (a reader never sees half a table)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    df.to_csv(tmp, index=False, float_format="%.6g")
    tmp.replace(out)
    return out


def read_table(path: str | Path):
    """One tidy table, None when the file is missing or empty."""
    import pandas as pd

    path = Path(path)
    try:
        return pd.read_csv(path) if path.is_file() else None
    except pd.errors.EmptyDataError:
        return None


def read_tables(table_dir: str | Path) -> dict:
    """The tidy tables of one model (:data:`MODEL_TABLES`; a missing or empty table is None)."""
    return {name: read_table(Path(table_dir) / f"{name}.csv") for name in MODEL_TABLES}


# ---------------------------------------------------------------------------------------------
# Final-epoch accuracy
# ---------------------------------------------------------------------------------------------

def final_epoch(df, by: Sequence[str] = ("layer",)):
    """The rows of ``df`` at the final epoch: the largest ``epoch`` of each group of ``by`` (a layer)."""
    return df[df["epoch"] == df.groupby(list(by))["epoch"].transform("max")]


def final_epoch_accuracy(probe, by: Sequence[str] = ("model", "layer"), stat: str = "mean",
                         column: str = "accuracy", sort: bool = True):
    """Final-epoch accuracy per (``by``, granularity): ``stat`` (``mean``, or ``std``, the sample sd) of
    ``column`` over the seeds at the final epoch of each ``by`` group (:func:`final_epoch`).

    ``probe`` is a ``position_probe`` table already restricted to one metric. Columns: ``*by, granularity``,
    ``layer_index`` (where ``probe`` has it) and ``value``; groups in sorted order, or in order of appearance
    with ``sort=False``.
    """
    by = list(by)
    d = final_epoch(probe, by)
    agg = {"layer_index": ("layer_index", "first")} if "layer_index" in d.columns else {}
    return d.groupby(by + ["granularity"], sort=sort).agg(**agg, value=(column, stat)).reset_index()
