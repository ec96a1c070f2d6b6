"""Paired comparison of a run with the baseline: per-image aggregates, and differences with paired intervals.

Each analysis task keeps, next to its table, the per-image terms of the statistics the experiments' comparison
uses (``<table>_per_image.csv``, :data:`~diffaudit.tables.PER_IMAGE_COLUMNS`, one row per layer, quantity, label
source, probe seed and image: ``num`` and ``den``):

``acc_<g>x<g>``, ``interior_acc_<g>x<g>`` (position_probe)
    per probe seed and test image, the final-epoch ``per_axis`` accuracy on the image's tokens (on its interior
    tokens), den 1; a run's accuracy is the mean over seeds of the mean over each seed's test images
``corner_sim_cropped_image``, ``corner_sim_full_image_ring_removed`` (token_group_similarity)
    per image the numerator and denominator terms of the corner group's R_00 of each map set; the corner ratio is
    the ratio of the two ratios of sums
``rel_norm`` (anomaly_rel_norm, per ``label_source``)
    per image the sum of its labels' relative norms and their number (0 for an image without labels)

:func:`paired_differences` computes, per layer, the run's statistic minus the baseline's under the same
bootstrap weights (:meth:`~diffaudit.analyses.bootstrap.Bootstrap.paired_difference`: the same resampled images
on both sides), so the interval covers the difference itself, not two separate bands. It refuses (an empty
difference and a reason in ``diff_note``) where the two runs cannot be paired: another extracted image size
(other grids), a layer the baseline lacks, other images, other probe test splits, or no anomaly values at the
baseline's labels. A difference that rests on fewer than :data:`MIN_IMAGES` images (one labelled image, one probe
test image) keeps its estimate but gets no interval (a bootstrap over one image collapses to the estimate), and
``diff_note`` says so.

Anomalies are paired by position: the baseline writes the label positions it used (``anomaly_labels.csv``,
:func:`label_table`), and an experiment's anomaly analysis evaluates them on its own stores under the source name
``baseline:<source>`` (:data:`BASELINE_PREFIX`), so both sides average the same patches of the same images.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

from ..tables import ANOMALY_LABEL_COLUMNS, PAIRED_QUANTITIES, PER_IMAGE_COLUMNS
from .bootstrap import Bootstrap

#: The label source of an experiment's anomaly values at the baseline's label positions: ``baseline:<source>``.
BASELINE_PREFIX = "baseline:"
#: The probe grid of the comparison (the paper's 8 x 8).
GRID = 8
CORNER = ("corner_sim_cropped_image", "corner_sim_full_image_ring_removed")
#: The fewest images a paired interval rests on: with one image (one labelled image of the baseline, one probe test
#: image) every resample that is defined holds the same image, and the interval collapses to the estimate.
MIN_IMAGES = 2
REL_NORM = "rel_norm"


# ---------------------------------------------------------------------------------------------
# Per-image aggregates
# ---------------------------------------------------------------------------------------------

def per_image_frame(records: Iterable[Mapping], image_ids, image_size: int | None) -> pd.DataFrame:
    """The per-image table (:data:`PER_IMAGE_COLUMNS`) of collected records: each a mapping with ``layer``,
    ``spatial``, ``quantity``, ``label_source`` (or absent), ``seed`` (or absent), ``images`` (store indices),
    ``num`` and ``den`` (one per image). ``image_ids`` are the store's (every image's id, by index)."""
    ids = np.asarray(image_ids).astype(str)
    frames = []
    for r in records:
        images = np.asarray(r["images"], dtype=np.int64)
        k = images.size
        frames.append(pd.DataFrame({
            "layer": r["layer"], "spatial": int(r["spatial"]),
            "image_size": pd.array([image_size] * k, dtype="Int64"), "quantity": r["quantity"],
            "label_source": r.get("label_source", ""), "seed": pd.array([r.get("seed")] * k, dtype="Int64"),
            "image": images, "image_id": ids[images],
            "num": np.asarray(r["num"], dtype=np.float64), "den": np.broadcast_to(
                np.asarray(r["den"], dtype=np.float64), (k,))}))
    if not frames:
        return pd.DataFrame(columns=PER_IMAGE_COLUMNS)
    return pd.concat(frames, ignore_index=True)[PER_IMAGE_COLUMNS]


def label_table(labels: Mapping[str, np.ndarray], grid: int, image_size: int | None, image_ids) -> pd.DataFrame:
    """The label positions of a run per source (:data:`ANOMALY_LABEL_COLUMNS` plus ``image_id``)."""
    ids = np.asarray(image_ids).astype(str)
    frames = [pd.DataFrame({"label_source": src, "image": lab[:, 0], "x": lab[:, 1], "y": lab[:, 2],
                            "grid": int(grid), "image_size": image_size, "image_id": ids[lab[:, 0]]})
              for src, lab in labels.items() if not src.startswith(BASELINE_PREFIX)]
    cols = ANOMALY_LABEL_COLUMNS + ["image_id"]
    return pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)


def baseline_labels(table: pd.DataFrame | None, image_ids, image_size: int | None
                    ) -> tuple[dict[str, tuple[np.ndarray, int]], str | None]:
    """The baseline's label positions to evaluate on a run's stores: ``{baseline:<source>: (labels (K, 3),
    grid)}``, and why there are none (None when they apply). Refused for another image size (other grids) or
    when a labelled image of the baseline is not the same image in this run."""
    if table is None or table.empty:
        return {}, "the baseline used no labels"
    sizes = {int(s) for s in table["image_size"].dropna()}
    if image_size is not None and sizes and sizes != {int(image_size)}:
        return {}, (f"the run is extracted at {int(image_size)} px, the baseline at {sorted(sizes)[0]} px: its "
                    "label positions are on another grid")
    ids = np.asarray(image_ids).astype(str)
    img = table["image"].to_numpy(np.int64)
    if (img >= ids.size).any() or not np.array_equal(ids[np.minimum(img, ids.size - 1)],
                                                     table["image_id"].astype(str).to_numpy()):
        return {}, "the run holds other images than the baseline"
    out = {}
    for src, df in table.groupby("label_source", sort=False):
        out[f"{BASELINE_PREFIX}{src}"] = (df[["image", "x", "y"]].to_numpy(np.int64), int(df["grid"].iloc[0]))
    return out, None


# ---------------------------------------------------------------------------------------------
# Paired differences
# ---------------------------------------------------------------------------------------------

def _rows(pi: pd.DataFrame, layer: str, quantity: str, source: str = "") -> pd.DataFrame:
    sel = (pi["layer"] == layer) & (pi["quantity"] == quantity)
    if source:
        sel &= pi["label_source"].fillna("").astype(str) == source
    return pi[sel].sort_values(["seed", "image"], kind="stable")


def _same_images(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    return (len(a) == len(b) and np.array_equal(a["image"].to_numpy(), b["image"].to_numpy())
            and np.array_equal(a["image_id"].astype(str).to_numpy(), b["image_id"].astype(str).to_numpy()))


def _probe_diff(base: pd.DataFrame, run: pd.DataFrame, boot: Bootstrap):
    """Mean over seeds of the mean over each seed's test images: the pool is the union of the test images."""
    seeds_b, seeds_r = sorted(base["seed"].dropna().unique()), sorted(run["seed"].dropna().unique())
    if seeds_b != seeds_r or not all(_same_images(base[base["seed"] == s], run[run["seed"] == s]) for s in seeds_b):
        return None, "other probe test splits (seeds or test images)"
    pool = np.unique(base["image"].to_numpy(np.int64))

    def subsets(df):
        return [(np.searchsorted(pool, d["image"].to_numpy(np.int64)), d["num"].to_numpy(np.float64))
                for _, d in df.groupby("seed", sort=True)]

    sb, sr = subsets(base), subsets(run)
    return _enough(boot.paired_difference(pool.size, lambda w: boot.subset_mean_resamples(pool.size, sr, weights=w)
                                          - boot.subset_mean_resamples(pool.size, sb, weights=w)),
                   pool.size, "test image")


def _ratio_of_ratios(parts: list[pd.DataFrame], w: np.ndarray, boot: Bootstrap) -> np.ndarray:
    top, bottom = (boot.ratio_resamples(p["num"].to_numpy(), p["den"].to_numpy(), weights=w) for p in parts)
    with np.errstate(divide="ignore", invalid="ignore"):
        return top / bottom


def _ratio_diff(base: list[pd.DataFrame], run: list[pd.DataFrame], boot: Bootstrap):
    """A ratio of sums (one part) or a ratio of two ratios of sums (two parts), over all the images."""
    if not all(_same_images(base[0], p) for p in base[1:] + run):
        return None, "other images"
    n = len(base[0])

    def stat(parts, w):
        if len(parts) == 1:
            return boot.ratio_resamples(parts[0]["num"].to_numpy(), parts[0]["den"].to_numpy(), weights=w)
        return _ratio_of_ratios(parts, w, boot)

    used = int((base[0]["den"].to_numpy() != 0).sum())  # the images the statistic rests on (labelled ones)
    return _enough(boot.paired_difference(n, lambda w: stat(run, w) - stat(base, w)), used,
                   "labelled image" if len(base) == 1 else "image")


def _enough(res: tuple[float, float, float], images: int, what: str):
    """The difference, and its interval only if it rests on :data:`MIN_IMAGES` images or more."""
    if images >= MIN_IMAGES:
        return res, None
    return (res[0], np.nan, np.nan), f"{images} {what}{'s' if images != 1 else ''}, no interval"


def paired_differences(base: pd.DataFrame | None, run: pd.DataFrame | None, layers: Iterable[str],
                       bootstrap: Bootstrap, base_source: str | None = None, run_source: str | None = None
                       ) -> pd.DataFrame:
    """Per layer of ``layers``: the run's minus the baseline's ``acc_8x8``, ``interior_acc_8x8``, ``corner_ratio``
    and ``rel_norm_mean`` with their paired bootstrap intervals (the ``*_diff`` columns of
    :data:`~diffaudit.tables.PAIRED_QUANTITIES`), and ``diff_note``: why a difference is empty (``; ``-joined,
    ``quantity: reason``, or one reason for the whole layer), empty where every difference was computed.

    ``base``/``run`` are the two runs' per-image tables (all analyses concatenated); the anomalies compare the
    baseline's ``base_source`` with the run's ``run_source`` (the run's values at the baseline's label positions,
    ``baseline:<source>``)."""
    cols = ["layer"] + [f"{s}{e}" for s in PAIRED_QUANTITIES.values() for e in ("", "_ci_low", "_ci_high")]
    layers = list(layers)
    out = pd.DataFrame({c: np.nan for c in cols[1:]}, index=range(len(layers)))
    out.insert(0, "layer", layers)
    out["diff_note"] = ""
    if base is None or run is None or base.empty or run.empty:
        out["diff_note"] = "not paired: no per-image values" + (" of the baseline" if run is not None
                                                                 and not run.empty else "")
        return out[cols + ["diff_note"]]
    sizes_b = {int(s) for s in base["image_size"].dropna()}
    sizes_r = {int(s) for s in run["image_size"].dropna()}
    if sizes_b != sizes_r:
        out["diff_note"] = (f"not paired: extracted at {'/'.join(map(str, sorted(sizes_r)))} px, the baseline at "
                            f"{'/'.join(map(str, sorted(sizes_b)))} px (other grids)")
        return out[cols + ["diff_note"]]
    base_layers = set(base["layer"])
    grid = f"{GRID}x{GRID}"
    for i, layer in enumerate(layers):
        if layer not in base_layers:
            out.loc[i, "diff_note"] = "not paired: the baseline has no such layer"
            continue
        notes = []
        sb, sr = base[base["layer"] == layer]["spatial"], run[run["layer"] == layer]["spatial"]
        if len(sb) and len(sr) and int(sb.iloc[0]) != int(sr.iloc[0]):
            out.loc[i, "diff_note"] = (f"not paired: {int(sr.iloc[0])}x{int(sr.iloc[0])} map, the baseline's "
                                       f"{int(sb.iloc[0])}x{int(sb.iloc[0])}")
            continue
        jobs = {"acc_8x8": lambda q=f"acc_{grid}": _probe_job(base, run, layer, q, bootstrap),
                "interior_acc_8x8": lambda q=f"interior_acc_{grid}": _probe_job(base, run, layer, q, bootstrap),
                "corner_ratio": lambda: _corner_job(base, run, layer, bootstrap),
                "rel_norm_mean": lambda: _rel_norm_job(base, run, layer, bootstrap, base_source, run_source)}
        for quantity, job in jobs.items():
            res, why = job()
            stem = PAIRED_QUANTITIES[quantity]
            if why:
                notes.append(f"{quantity}: {why}")
            if res is not None:
                out.loc[i, [stem, f"{stem}_ci_low", f"{stem}_ci_high"]] = res
        out.loc[i, "diff_note"] = "; ".join(notes)
    return out[cols + ["diff_note"]]


def _probe_job(base, run, layer, quantity, boot):
    b, r = _rows(base, layer, quantity), _rows(run, layer, quantity)
    if b.empty and r.empty:
        return None, "" if quantity.startswith("interior") else "no probe values"
    if b.empty or r.empty:
        return None, f"no probe values {'of the baseline' if b.empty else 'of this run'}"
    return _probe_diff(b, r, boot)


def _corner_job(base, run, layer, boot):
    b = [_rows(base, layer, q) for q in CORNER]
    r = [_rows(run, layer, q) for q in CORNER]
    if all(p.empty for p in b + r):
        return None, "no cropped variants"
    if any(p.empty for p in b):
        return None, "no cropped variants in the baseline"
    if any(p.empty for p in r):
        return None, "no cropped variants in this run"
    return _ratio_diff(b, r, boot)


def _rel_norm_job(base, run, layer, boot, base_source, run_source):
    if not base_source or not run_source:
        return None, "no label positions of the baseline evaluated in this run"
    b, r = _rows(base, layer, REL_NORM, base_source), _rows(run, layer, REL_NORM, run_source)
    if b.empty or r.empty:
        return None, f"no values {'of the baseline' if b.empty else 'at the baseline labels'}"
    if b["den"].sum() == 0:
        return None, "the baseline has no labels"
    return _ratio_diff([b], [r], boot)


#: Column types of the per-image and label tables when read back: image ids stay strings (``000019``, not 19).
READ_DTYPES = {"layer": str, "quantity": str, "label_source": str, "image_id": str}


def read_table(path) -> pd.DataFrame | None:
    """A per-image or label table as written (:data:`READ_DTYPES`); None for an empty file."""
    try:
        return pd.read_csv(path, dtype=READ_DTYPES, keep_default_na=False, na_values={"seed": [""], "num": [""],
                                                                                       "den": [""],
                                                                                       "image_size": [""]})
    except pd.errors.EmptyDataError:
        return None


def store_image_size(store) -> int | None:
    """The image size (px) a store was extracted at, as it records it (None if it does not)."""
    size = store.attrs.get("image_size") or store.attrs.get("config", {}).get("image_size")
    return int(size) if size else None
