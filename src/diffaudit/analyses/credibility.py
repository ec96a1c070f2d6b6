"""Per-layer credibility table: how strongly each hazard of the paper affects a layer, on [0, 1].

One row per layer (``model, layer_index, layer``) with three hazard scores, 0 = no hazard, 1 = severe. Each score
keeps its meaning from layer to layer and model to model, but the three axes measure different things in
different units (a share of the possible probe gain, a log2 similarity ratio, a prevalence x severity product);
``hazard`` = their maximum is a convention, not a common scale (reasoning: ``docs/credibility.md``).

Inputs (named in the table): the position score reads the baseline's probe, or, where the baseline draws one
noise tensor for every image and an experiment changes only ``noise: independent``, that experiment's probe
(``position_input``); the corner and anomaly scores read the corrected-mode similarity and relative-norm tables
(``similarity_mode``, ``anomaly_mode``), free of the authors' count and denominator quirks.

``position_score`` = clip((acc8 - c) / (1 - c), 0, 1),  c = 1 / min(8, n)
    ``acc8``: the position probe's ``per_axis`` test accuracy at the paper's fixed 8 x 8 grid (granularity 8: is
    the token in the right eighth of the image along each axis?), final epoch, mean over seeds
    (:func:`diffaudit.tables.final_epoch_accuracy`, the one definition of "final-epoch accuracy"). Every layer is
    judged on the same grid, whatever its own resolution n: at the native grid a 64 x 64 layer would be judged
    against chance 1/64 and an 8 x 8 layer against 1/8, so a 64-res layer that tells the image's eighths apart
    would look harmless. For n < 8 the probe's granularity-8 value is the native accuracy and c = 1/n. The score
    is the gain over chance as a fraction of the possible gain; NaN when the probe has no granularity 8 or n = 1.
``corner_score`` = clip(corner_effect, 0, 1),  ``corner_effect`` = log2(corner_ratio / other_ratio)
    ``corner_ratio`` = similarity among the corner tokens when they sit at the corner (cropped image) / the same
    content away from it (full image, ring removed); ``other_ratio`` is the same ratio for the interior tokens,
    which never move to a corner but see the crop's global changes (different noise, VAE context, rescaling).
    Their quotient is the corner effect net of the crop control, on a log2 scale, signed: > 0 = corner tokens
    become MORE alike at the corner (the paper's hazard: content-independent corner similarity), < 0 = less alike
    (no hazard, score 0). An effect of 1 (twice the control's similarity ratio) scores 1. NaN when either ratio
    is NaN or <= 0 (a log-ratio is undefined); several rows of one layer are averaged in log2 space. The control is
    biased: the crop moves every interior token one token closer to the edge too, so an edge effect that reaches
    into the interior raises ``other_ratio`` and lowers ``corner_effect`` (its size: docs/credibility.md).
``anomaly_score`` = prevalence x severity, from ONE label source
    Source: ``paper`` (the hand labels) if the table has it, else ``auto`` (the detector), else the first user
    source (``anomaly_source``). ``prevalence`` = n_images_with_anomalies / n_images of that source: the share of
    images that carry at least one anomaly (``anomaly_prevalence``; NaN when the table lacks the counts, and
    then taken as 1, the worst case, so that a missing count never makes a layer look safer). ``severity`` =
    clip(log2(rel_norm_mean), 0, 1) at the layer (``anomaly_rel_norm``): 0 when the labelled patches are no
    larger than the average token, 1 when they are at least twice as large (the detector's own definition of an
    anomaly is a 2x larger norm). The score is thus the share of images with a fully expressed anomaly at the
    layer. A source with no anomaly at all scores 0. At the labelled layer itself (``up_blocks[1].upsamplers[0]``)
    the relative norm is selection-biased upwards: the patches were chosen there for their high norm.
``channel_max_ratio`` (informative, not a hazard)
    The channel census' strongest channel: max over channels of median_abs_ratio (its max |activation| / the
    median channel's). A different quantity (a channel, not a token), so it is reported, not mixed into a score.
``hazard`` = max of the available (non-NaN) scores, ``hazard_axis`` the axis that attains it (position, corner,
    anomaly; "" when no score); NaN when no score is available. A convention: the maximum compares numbers of
    different meanings (0.25 is a quarter of the possible 8 x 8 probe gain, a 1.19x corner similarity, or
    anomalies fully expressed in a quarter of the images), no common scale.
``safe`` = hazard < ``safe_threshold`` (``credibility.safe_below``, 0.25: under a quarter of the possible position
    gain, a corner similarity under 2^0.25 = 1.19x the control, anomalies fully expressed in under a quarter of the
    images), True or False only when all three axes were measured; otherwise empty (NA), and ``missing_axes``
    names the axes without a score (e.g. ``corner`` for ``conv_out``, whose crop has no ring to compare, or for
    every layer with ``crops: false``), separated by ``;``.

Any input table may be empty or lack layers: the affected score is NaN, never an error. Tables holding several
models are filtered to ``model``, or scored per model with ``model=""``.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..tables import ANOMALY_PREVALENCE_COLUMNS, CREDIBILITY_COLUMNS, final_epoch_accuracy

#: The fixed probe grid every layer is judged on (the paper's 8 x 8).
POSITION_GRID = 8
#: Label-source preference for the anomaly axis (then the first other source, e.g. ``user:...``).
SOURCE_PREFERENCE = ("paper", "auto")
PREVALENCE_COLUMNS = tuple(ANOMALY_PREVALENCE_COLUMNS)
AXES = ("position", "corner", "anomaly")

FORMULA = (
    "position_score = clip((acc8 - c)/(1 - c), 0, 1) with acc8 the final-epoch per_axis probe accuracy at the "
    "fixed 8x8 grid (mean over seeds) and chance c = 1/min(8, n); "
    "corner_score = clip(corner_effect, 0, 1) with corner_effect = log2(corner_ratio/other_ratio) (signed, net "
    "of the crop control; only corners MORE similar than the control count; NaN if a ratio is NaN or <= 0); "
    "anomaly_score = prevalence x severity from one label source (paper, else auto, else a user source) with "
    "prevalence = n_images_with_anomalies/n_images (1 if unknown) and severity = clip(log2 rel_norm_mean, 0, 1); "
    "hazard = max of available scores (a convention: the axes have different units, no common scale); "
    "safe = hazard < threshold (credibility.safe_below), empty unless all three axes were measured (missing_axes "
    "names the others); inputs: corrected-mode similarity and relative norms, the independent-noise experiment's "
    "probe where there is one (position_input, similarity_mode, anomaly_mode)"
)
KEYS = ["model", "layer_index", "layer"]
#: Column descriptions (e.g. for a data dictionary or a CSV sidecar).
DESCRIPTIONS = {
    "position_acc_8x8": "final-epoch per_axis probe accuracy at the fixed 8x8 grid, mean over seeds",
    "position_score": "position decodability at 8x8 above chance, 0..1: (acc8 - c)/(1 - c), c = 1/min(8, n)",
    "position_input": "the probe the position score read: 'baseline probe (shared|independent noise)' or "
                      "'experiment <name> (independent noise)' ('' when no probe has the layer)",
    "corner_effect": "log2(corner_ratio / other_ratio): corner similarity change net of the crop control, signed",
    "corner_score": "clip(corner_effect, 0, 1): only corners more similar than the control are a hazard",
    "similarity_mode": "mode of the similarity table the corner score read (corrected: no pair-count quirk)",
    "anomaly_source": "label source of the anomaly axis (paper, else auto, else the first user source)",
    "anomaly_prevalence": "share of images with >= 1 anomaly in that source (NaN: unknown, scored as 1)",
    "anomaly_rel_norm": "mean relative norm of the source's anomaly patches at this layer",
    "anomaly_score": "prevalence x clip(log2 anomaly_rel_norm, 0, 1)",
    "anomaly_mode": "mode of the relative-norm table the anomaly score read (corrected: patch not in the denominator)",
    "channel_max_ratio": "strongest channel's median max|activation| / median channel's (informative only)",
    "hazard": "max of the available scores (NaN if none); a convention, the axes have different units",
    "hazard_axis": "the axis attaining the hazard: position, corner or anomaly ('' if none)",
    "safe": "hazard < safe_threshold (credibility.safe_below); empty unless every axis was measured",
    "missing_axes": "the axes without a score (position, corner, anomaly; ';'-separated; '' when all were measured)",
    "formula": FORMULA,
}


def _clip01(x):
    return np.clip(x, 0.0, 1.0)


def _prepare(df: pd.DataFrame | None, model: str, needed: list[str]) -> pd.DataFrame:
    """The table restricted to ``model`` (if it holds several models) with the model column set; empty if unusable."""
    if df is None or len(df) == 0 or not set(KEYS[1:] + needed) <= set(df.columns):
        return pd.DataFrame(columns=KEYS + ["channels", "spatial"] + needed)
    df = df.copy()
    if "model" not in df.columns:
        df["model"] = model
    df["model"] = df["model"].fillna("").astype(str)
    if model:
        if df["model"].nunique() > 1:
            df = df[df["model"] == model]
        df["model"] = model
    for col in ("channels", "spatial"):
        if col not in df.columns:
            df[col] = np.nan
    df["layer_index"] = df["layer_index"].astype(np.int64)
    return df


def _position_score(acc: float, spatial) -> float:
    k = POSITION_GRID if pd.isna(spatial) else min(POSITION_GRID, int(spatial))
    chance = 1.0 / k
    return np.nan if np.isnan(acc) or chance >= 1 else float(_clip01((acc - chance) / (1 - chance)))


def position_scores(probe: pd.DataFrame | None, model: str = "") -> pd.DataFrame:
    """KEYS + ``position_acc_8x8, position_score`` (see the module docstring)."""
    cols = KEYS + ["position_acc_8x8", "position_score"]
    df = _prepare(probe, model, ["epoch", "granularity", "metric", "accuracy"])
    if df.empty:
        return pd.DataFrame(columns=cols)
    d = df[df["metric"] == "per_axis"]
    if d.empty:
        return pd.DataFrame([], columns=cols)
    acc = final_epoch_accuracy(d, by=("model", "layer"), sort=False)
    acc = acc[acc["granularity"] == POSITION_GRID]
    n = df.groupby(["model", "layer"], sort=False)["spatial"].first()
    out = []
    for r in acc.itertuples(index=False):
        a = float(r.value)
        out.append((r.model, int(r.layer_index), r.layer, a, _position_score(a, n.get((r.model, r.layer), np.nan))))
    return pd.DataFrame(out, columns=cols)


def summary_position_scores(summary: pd.DataFrame | None, model: str = "") -> pd.DataFrame:
    """KEYS + ``position_acc_8x8, position_score`` from a run summary (``acc_8x8``: the same final-epoch 8 x 8
    accuracy, mean over seeds, :func:`diffaudit.analyses.comparison.run_summary`), e.g. the independent-noise
    experiment's."""
    cols = KEYS + ["position_acc_8x8", "position_score"]
    df = _prepare(summary, model, ["acc_8x8"])
    out = [(r.model, int(r.layer_index), r.layer, float(r.acc_8x8), _position_score(float(r.acc_8x8), r.spatial))
           for r in df.itertuples(index=False) if pd.notna(r.acc_8x8)]
    return pd.DataFrame(out, columns=cols)


def corner_scores(similarity: pd.DataFrame | None, model: str = "") -> pd.DataFrame:
    """KEYS + ``corner_effect, corner_score`` (see the module docstring)."""
    df = _prepare(similarity, model, ["corner_ratio", "other_ratio"])
    out = []
    for key, g in df.groupby(KEYS, sort=False):
        c = g["corner_ratio"].astype(float).to_numpy()
        o = g["other_ratio"].astype(float).to_numpy()
        ok = (c > 0) & (o > 0)  # False for NaN
        if ok.any():
            effect = float(np.mean(np.log2(c[ok]) - np.log2(o[ok])))
            out.append((*key, effect, float(_clip01(effect))))
        else:
            out.append((*key, np.nan, np.nan))
    return pd.DataFrame(out, columns=KEYS + ["corner_effect", "corner_score"])


def choose_source(sources) -> str | None:
    """The anomaly label source to score: ``paper``, else ``auto``, else the first other one (None if none)."""
    sources = [str(s) for s in pd.unique(pd.Series(list(sources), dtype=object).dropna())]
    for s in SOURCE_PREFERENCE:
        if s in sources:
            return s
    return sources[0] if sources else None


def anomaly_scores(anomalies: pd.DataFrame | None, model: str = "") -> pd.DataFrame:
    """KEYS + ``anomaly_source, anomaly_prevalence, anomaly_rel_norm, anomaly_score`` (module docstring)."""
    cols = KEYS + ["anomaly_source", "anomaly_prevalence", "anomaly_rel_norm", "anomaly_score"]
    a = _prepare(anomalies, model, ["rel_norm_mean"])
    if "label_source" not in a.columns:
        a["label_source"] = "paper"
    out = []
    for m, gm in a.groupby("model", sort=False):
        src = choose_source(gm["label_source"])
        gs = gm[gm["label_source"].astype(str) == src]
        if set(PREVALENCE_COLUMNS) <= set(gs.columns):
            n_img = pd.to_numeric(gs["n_images"], errors="coerce").max()
            n_with = pd.to_numeric(gs["n_images_with_anomalies"], errors="coerce").max()
            prevalence = float(n_with / n_img) if n_img > 0 and pd.notna(n_with) else np.nan
        else:
            prevalence = np.nan
        n_labels = pd.to_numeric(gs["n_anomalies"], errors="coerce") if "n_anomalies" in gs.columns else None
        none_found = prevalence == 0 or (n_labels is not None and n_labels.notna().all() and (n_labels == 0).all())
        weight = 1.0 if np.isnan(prevalence) else prevalence  # unknown prevalence: the worst case
        for key, g in gs.groupby(KEYS, sort=False):
            r = pd.to_numeric(g["rel_norm_mean"], errors="coerce")
            r = float(r.mean()) if r.notna().any() else np.nan
            if none_found:
                score = 0.0
            elif np.isnan(r):
                score = np.nan
            else:
                severity = float(_clip01(np.log2(r))) if r > 0 else 0.0
                score = weight * severity
            out.append((*key, src, prevalence, r, score))
    return pd.DataFrame(out, columns=cols)


def channel_max_ratios(channels: pd.DataFrame | None, model: str = "") -> pd.DataFrame:
    """KEYS + ``channel_max_ratio``: the strongest channel's median_abs_ratio per layer (informative only)."""
    c = _prepare(channels, model, ["median_abs_ratio"])
    c = c.assign(median_abs_ratio=pd.to_numeric(c["median_abs_ratio"], errors="coerce"))
    out = c.groupby(KEYS, as_index=False, sort=False)["median_abs_ratio"].max()
    return out.rename(columns={"median_abs_ratio": "channel_max_ratio"})[KEYS + ["channel_max_ratio"]]


def credibility(probe: pd.DataFrame | None, similarity: pd.DataFrame | None, anomalies: pd.DataFrame | None,
                channels: pd.DataFrame | None = None, model: str = "", safe_threshold: float = 0.25, *,
                position_input: str = "baseline probe", independent_summary: pd.DataFrame | None = None,
                independent_input: str = "", similarity_mode: str = "", anomaly_mode: str = "") -> pd.DataFrame:
    """Per-layer hazard scores and a ``safe`` flag (formulas: module docstring / :data:`FORMULA`).

    ``model``: the model name written to the output; tables holding several models are filtered to it. With
    ``model=""`` every model found in the tables gets its own rows. Layers present in any table appear; a score
    whose table lacks the layer is NaN. Sorted by model and layer_index.

    The inputs are named in the table: ``position_input`` (the probe table ``probe``; e.g. ``baseline probe
    (shared noise)``), ``similarity_mode`` and ``anomaly_mode`` (the mode the ``similarity`` and ``anomalies``
    tables were computed in), each on the rows whose layer its table holds ('' elsewhere). ``independent_summary``
    (a run summary of the independent-noise experiment, named ``independent_input``) replaces the probe for the
    layers it holds: the position score then measures position that is not read off a noise tensor shared by
    every image.
    """
    tables = {
        "probe": _prepare(probe, model, ["epoch", "granularity", "metric", "accuracy"]),
        "similarity": _prepare(similarity, model, ["corner_ratio"]),
        "anomalies": _prepare(anomalies, model, ["rel_norm_mean"]),
        "channels": _prepare(channels, model, ["median_abs_ratio"]),
    }
    # an experiment that extracted fewer layers numbers them in its own store: its rows take the baseline's
    # layer_index of the same layer name
    index: dict = {}
    for t in tables.values():
        for key in zip(t["model"], t["layer"], t["layer_index"]):
            index.setdefault(key[:2], key[2])
    independent_summary = _prepare(independent_summary, model, ["acc_8x8"])
    independent_summary["layer_index"] = [int(index.get((m, lay), i)) for m, lay, i in zip(
        independent_summary["model"], independent_summary["layer"], independent_summary["layer_index"])]
    tables["independent"] = independent_summary
    meta = pd.concat([t[KEYS + ["channels", "spatial"]] for t in tables.values() if len(t)], ignore_index=True) \
        if any(len(t) for t in tables.values()) else pd.DataFrame(columns=KEYS + ["channels", "spatial"])
    if len(meta):
        meta = meta.groupby(KEYS, as_index=False, sort=False).agg({"channels": "first", "spatial": "first"})
    position = position_scores(probe, model).assign(position_input=position_input)
    independent = summary_position_scores(independent_summary, model).assign(position_input=independent_input)
    position = pd.concat([independent, position[~position.set_index(KEYS).index.isin(
        independent.set_index(KEYS).index)]], ignore_index=True) if len(independent) else position
    corner = corner_scores(similarity, model).assign(similarity_mode=similarity_mode)
    anomaly = anomaly_scores(anomalies, model).assign(anomaly_mode=anomaly_mode)
    out = meta
    for part in (position, corner, anomaly, channel_max_ratios(channels, model)):
        out = out.merge(part, on=KEYS, how="left")
    for col in ("position_input", "similarity_mode", "anomaly_mode"):
        out[col] = out[col].fillna("").astype(str)
    scores = out[[f"{a}_score" for a in AXES]].astype(float)
    out["hazard"] = scores.max(axis=1, skipna=True)  # all-NaN rows stay NaN
    axis = scores.fillna(-np.inf).to_numpy().argmax(axis=1) if len(out) else np.zeros(0, dtype=int)
    out["hazard_axis"] = np.where(out["hazard"].notna(), np.asarray(AXES, dtype=object)[axis], "")
    missing = scores.isna().to_numpy()
    out["missing_axes"] = [";".join(a for a, m in zip(AXES, row) if m) for row in missing]
    # a verdict only where every axis was measured: empty (NA) otherwise, whatever the measured axes say
    safe = (out["hazard"] < safe_threshold).to_numpy()
    out["safe"] = pd.array([pd.NA if m.any() else bool(v) for m, v in zip(missing, safe)], dtype="boolean")
    for col in ("channels", "spatial"):
        out[col] = pd.to_numeric(out[col], errors="coerce").astype("Int64")
    out["layer_index"] = out["layer_index"].astype(np.int64)
    out = out.sort_values(["model", "layer_index"], kind="stable").reset_index(drop=True)
    return out[CREDIBILITY_COLUMNS]
