"""Per-layer credibility table: how strongly each hazard of the paper affects a layer, on [0, 1].

One row per layer (``model, layer_index, layer``) with three hazard scores, 0 = no hazard, 1 = severe:

``position_score`` = clip((acc - chance) / (1 - chance), 0, 1)
    The position probe's test accuracy above chance, as a fraction of the possible gain. ``acc`` is the
    ``per_axis`` accuracy (the paper's metric; ``joint`` only if no per_axis rows exist) at the final epoch, at the
    layer's native granularity (``granularity == spatial``; else the largest available granularity <= spatial;
    else the smallest available, which for g >= n equals the native accuracy), averaged over seeds.
    ``chance = 1 / min(g, n)`` (per_axis) or ``1 / min(g, n)^2`` (joint). 1 = position perfectly decodable.
``corner_score`` = clip(|log2(corner_ratio)|, 0, 1)
    ``corner_ratio`` = mean within-corner cosine similarity of tokens that sit at the corner during extraction,
    divided by that of the same content away from the corner (METHOD.md 3.2). A ratio of 2 (or 1/2) scores 1, a
    ratio of 1 scores 0; NaN or non-positive ratios give NaN. With ``corner_control=True`` the ratio is first
    divided by ``other_ratio`` (the interior tokens' ratio, which carries the crop control's global shift from
    different noise and VAE context), isolating the position-specific change.
``anomaly_score`` = clip(log2(r) / 2, 0, 1) with r = max(rel_norm_mean over label sources, max_c median_abs_ratio / 10)
    ``rel_norm_mean``: mean relative token norm of the labelled 2x2 anomaly patches at this layer (sources with
    ``n_anomalies == 0`` ignored). ``median_abs_ratio / 10``: the channel census' strongest "massive activation"
    channel (median over images of its max |activation| / the median channel's), in units of the census'
    default 10x outlier threshold (only when a channel table is given). r = 1 (no excess) scores 0, r = 4 scores 1.
    At the labelled layer itself (``up_blocks[1].upsamplers[0]``) the relative norm is selection-biased upwards:
    the patches were chosen there for their high norm (METHOD.md 3.3).
``hazard`` = max of the available (non-NaN) scores; NaN when none is available.
``safe`` = hazard < ``safe_threshold`` (0.25 by default: probe gain under a quarter of the possible gain, a corner
    ratio within 2^0.25 = 1.19, anomalies under 1.41x the typical norm). A layer without any score is not safe.

Any input table may be empty or lack layers: the affected score is NaN, never an error. Multiple rows per layer
(several seeds, label sources or crop variants) are combined as described above; several similarity rows for the
same layer are averaged in log2 space.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

FORMULA = (
    "position_score = clip((acc - chance)/(1 - chance), 0, 1) with acc the final-epoch per_axis probe accuracy at "
    "the layer's native granularity (largest <= spatial) averaged over seeds, chance = 1/min(g, n); "
    "corner_score = clip(|log2 corner_ratio|, 0, 1) (ratio 2 or 1/2 -> 1; NaN if ratio NaN or <= 0); "
    "anomaly_score = clip(log2(max(rel_norm_mean over label sources, max channel median_abs_ratio/10))/2, 0, 1) "
    "(relative norm 4 -> 1); hazard = max of available scores; safe = hazard < threshold (0.25)"
)
KEYS = ["model", "layer_index", "layer"]
CREDIBILITY_COLUMNS = ["model", "layer_index", "layer", "channels", "spatial", "position_score", "corner_score",
                       "anomaly_score", "hazard", "safe"]
#: Column descriptions (e.g. for a data dictionary or a CSV sidecar).
DESCRIPTIONS = {
    "position_score": "position decodability by the linear probe above chance, 0..1 (0 = chance, 1 = perfect)",
    "corner_score": "corner-token similarity inflation |log2 corner_ratio| clipped to 0..1 (1 = ratio 2 or 1/2)",
    "anomaly_score": "high-norm anomaly / massive-channel strength log2(r)/2 clipped to 0..1 (1 = r >= 4)",
    "hazard": "max of the available scores (NaN if none)",
    "safe": "hazard < safe_threshold (0.25 by default); False when no score is available",
    "formula": FORMULA,
}
CHANNEL_THRESHOLD = 10.0


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


def position_scores(probe: pd.DataFrame | None, model: str = "") -> pd.DataFrame:
    """KEYS + ``position_score`` (see the module docstring)."""
    df = _prepare(probe, model, ["epoch", "granularity", "metric", "accuracy"])
    out = []
    for key, g in df.groupby(KEYS, sort=False):
        metric = "per_axis" if (g["metric"] == "per_axis").any() else "joint"
        g = g[g["metric"] == metric]
        if "seed" not in g.columns:
            g = g.assign(seed=0)
        # final epoch of each seed
        g = g[g["epoch"] == g.groupby("seed")["epoch"].transform("max")]
        n = g["spatial"].dropna()
        n = int(n.iloc[0]) if len(n) else None
        grans = sorted(int(x) for x in g["granularity"].dropna().unique())
        if not grans:
            continue
        if n is None:
            gran = grans[-1]
            n = gran
        else:
            below = [x for x in grans if x <= n]
            gran = below[-1] if below else grans[0]
        acc = g.loc[g["granularity"] == gran, "accuracy"].astype(float)
        acc = float(acc.mean()) if acc.notna().any() else np.nan
        k = min(gran, n)
        chance = 1.0 / k if metric == "per_axis" else 1.0 / (k * k)
        score = np.nan if np.isnan(acc) or chance >= 1 else float(_clip01((acc - chance) / (1 - chance)))
        out.append((*key, score))
    return pd.DataFrame(out, columns=KEYS + ["position_score"])


def corner_scores(similarity: pd.DataFrame | None, model: str = "", control: bool = False) -> pd.DataFrame:
    """KEYS + ``corner_score`` (see the module docstring)."""
    df = _prepare(similarity, model, ["corner_ratio"])
    out = []
    for key, g in df.groupby(KEYS, sort=False):
        r = g["corner_ratio"].astype(float).to_numpy()
        if control:
            other = (g["other_ratio"].astype(float).to_numpy() if "other_ratio" in g.columns
                     else np.full_like(r, np.nan))
            r = r / other
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.where(r > 0, np.log2(np.where(r > 0, r, 1.0)), np.nan)
        logs = logs[np.isfinite(logs)]
        out.append((*key, float(_clip01(abs(logs.mean()))) if logs.size else np.nan))
    return pd.DataFrame(out, columns=KEYS + ["corner_score"])


def anomaly_scores(anomalies: pd.DataFrame | None, channels: pd.DataFrame | None = None,
                   model: str = "") -> pd.DataFrame:
    """KEYS + ``anomaly_score`` (see the module docstring)."""
    a = _prepare(anomalies, model, ["rel_norm_mean"])
    c = _prepare(channels, model, ["median_abs_ratio"])
    r = {}
    for key, g in a.groupby(KEYS, sort=False):
        if "n_anomalies" in g.columns:
            g = g[g["n_anomalies"].fillna(0) > 0]
        v = g["rel_norm_mean"].astype(float)
        if v.notna().any():
            r[key] = float(v.max())
    for key, g in c.groupby(KEYS, sort=False):
        v = g["median_abs_ratio"].astype(float)
        if v.notna().any():
            r[key] = max(r.get(key, -np.inf), float(v.max()) / CHANNEL_THRESHOLD)
    out = []
    for key, v in r.items():
        score = float(_clip01(np.log2(v) / 2)) if v > 0 else 0.0
        out.append((*key, score))
    return pd.DataFrame(out, columns=KEYS + ["anomaly_score"])


def credibility(probe: pd.DataFrame | None, similarity: pd.DataFrame | None, anomalies: pd.DataFrame | None,
                channels: pd.DataFrame | None = None, model: str = "", safe_threshold: float = 0.25,
                corner_control: bool = False) -> pd.DataFrame:
    """Per-layer hazard scores and a ``safe`` flag (formulas: module docstring / :data:`FORMULA`).

    ``model``: the model name written to the output; tables holding several models are filtered to it. With
    ``model=""`` every model found in the tables gets its own rows. Layers present in any table appear; a score
    whose table lacks the layer is NaN. Sorted by model and layer_index.
    """
    tables = {
        "probe": _prepare(probe, model, ["epoch", "granularity", "metric", "accuracy"]),
        "similarity": _prepare(similarity, model, ["corner_ratio"]),
        "anomalies": _prepare(anomalies, model, ["rel_norm_mean"]),
        "channels": _prepare(channels, model, ["median_abs_ratio"]),
    }
    meta = pd.concat([t[KEYS + ["channels", "spatial"]] for t in tables.values() if len(t)], ignore_index=True) \
        if any(len(t) for t in tables.values()) else pd.DataFrame(columns=KEYS + ["channels", "spatial"])
    if len(meta):
        meta = meta.groupby(KEYS, as_index=False, sort=False).agg({"channels": "first", "spatial": "first"})
    out = meta
    for part in (position_scores(probe, model), corner_scores(similarity, model, corner_control),
                 anomaly_scores(anomalies, channels, model)):
        out = out.merge(part, on=KEYS, how="left")
    scores = out[["position_score", "corner_score", "anomaly_score"]].astype(float)
    out["hazard"] = scores.max(axis=1, skipna=True)  # all-NaN rows stay NaN
    out["safe"] = (out["hazard"] < safe_threshold).astype(bool)  # NaN < x is False
    for col in ("channels", "spatial"):
        out[col] = pd.to_numeric(out[col], errors="coerce").astype("Int64")
    out["layer_index"] = out["layer_index"].astype(np.int64)
    out = out.sort_values(["model", "layer_index"], kind="stable").reset_index(drop=True)
    return out[CREDIBILITY_COLUMNS]
