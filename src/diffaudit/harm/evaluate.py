"""Harm and mitigation tables of one run: the body of rule ``harm`` (docs/harm.md).

Per layer, every mitigation (:mod:`diffaudit.harm.mitigations`) is fitted on the *fit images* (the position probe's
training images) and then

* **harm** (``harm.csv``): the pairs of :mod:`diffaudit.harm.pairs` (their sources are the probe's test images, or
  the stereo photograph) are matched token by token (:mod:`diffaudit.harm.matching`) on the mitigated features of
  both images, and scored (pck, position_following, hub_ratio) with a percentile bootstrap over the pairs (images),
  or over the tokens for a task with one pair (stereo, ``unit`` = tokens);
* **artifact and content** (``mitigations.csv``): the three artifact measures recomputed on the mitigated features,
  with the analyses' own code run on a :class:`diffaudit.store.StoreView` that applies the mitigation:
  ``probe_acc8`` (the position probe, trained on the fit images and tested on the test images: final-epoch per-axis
  accuracy at the fixed 8 x 8 grid), ``corner_ratio`` (corner similarity ratio of the test images in corrected
  mode, each crop variant's mitigation fitted on that variant's fit images), ``rel_norm`` (the relative norm, in
  corrected mode, of the run's anomaly labels on the test images), and ``semantic_acc``, a linear probe of the
  image's class from mean-pooled features (:func:`class_probe`, trained on the fit images, tested on the test
  images) that shows whether a mitigation keeps the content.

Memory: one pair's maps (harm) or one chunk of images (fits, measures) at a time, except the position probe, which
holds one layer's tokens as the probe analysis does.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..analyses.anomalies import flagged_tokens, relative_norms, token_norms
from ..analyses.bootstrap import Bootstrap
from ..analyses.probe import image_split, run_probe
from ..analyses.similarity import token_group_similarity
from ..store import LayerCache, StoreView
from ..tables import HARM_COLUMNS, MITIGATION_COLUMNS
from . import matching
from .mitigations import MITIGATIONS, MitigationSettings, fit_store_mitigations
from .pairs import ground_truth

log = logging.getLogger(__name__)

#: The fixed probe grid of ``probe_acc8`` (the paper's 8 x 8, as the credibility score's position axis).
PROBE_GRID = 8


@dataclass(frozen=True)
class HarmSettings:
    """The ``harm`` section (and what it borrows): ``tasks``, ``source_tokens`` (at most this many source tokens
    per pair, drawn with ``seed``; None = all), ``probe_tokens`` (the position probe of ``probe_acc8`` trains on at
    most this many tokens of each training image; None = all), ``mitigations``, and the mitigations' knobs."""

    tasks: tuple = ("flip", "shift", "stereo")
    mitigations: tuple = MITIGATIONS
    source_tokens: int | None = 1024
    probe_tokens: int | None = 256
    seed: int = 0
    mitigation: MitigationSettings = MitigationSettings()
    chunk_images: int = 10
    device: str = "cpu"


def harm_images(n_images: int, probe: Mapping, n_harm: int) -> tuple[np.ndarray, np.ndarray]:
    """``(fit images, harm images)``: the position probe's training images, and the first ``n_harm`` of its test
    images (the pairs' sources), for the probe settings ``probe`` (its first seed's split in corrected mode)."""
    fit, test = image_split(n_images, float(probe["train_frac"]), probe["mode"], int(probe["seed"]),
                            list(probe["seeds"]))
    return fit, test[: int(n_harm)]


# ---------------------------------------------------------------------------------------------
# Harm
# ---------------------------------------------------------------------------------------------

class _Terms:
    """Per (task, mitigation, metric): the per-pair (or per-token) numerators and denominators."""

    def __init__(self):
        self.parts: dict[tuple, list] = {}

    def add(self, task: str, mitigation: str, terms: Mapping[str, tuple[np.ndarray, np.ndarray]], per_token: bool):
        for metric, (num, den) in terms.items():
            key = (task, mitigation, metric)
            if per_token:
                self.parts.setdefault(key, []).append((num, den))
            else:
                self.parts.setdefault(key, []).append((np.array([num.sum()]), np.array([den.sum()])))

    def _arrays(self, key) -> tuple[np.ndarray, np.ndarray]:
        parts = self.parts[key]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def rows(self, meta: dict, boot: Bootstrap, units: Mapping[str, str], notes: Mapping[tuple, str]) -> list[dict]:
        """One row per (task, mitigation, metric): the pooled value and its interval, and for a mitigation its
        paired difference to ``none`` (``diff``: the same pairs, or tokens, resampled together on both sides)."""
        out = []
        for (task, mitigation, metric) in self.parts:
            num, den = self._arrays((task, mitigation, metric))
            note = notes.get((task, mitigation), "")
            value = lo = hi = diff = dlo = dhi = np.nan
            if den.sum() > 0:
                value = float(num.sum() / den.sum())
                if num.size > 1:
                    lo, hi = (float(v) for v in boot.ratio_interval(num, den))
                else:
                    note = note or "one unit: no interval"
                base = (task, "none", metric)
                if mitigation != "none" and base in self.parts:
                    bnum, bden = self._arrays(base)
                    if bnum.size == num.size and bden.sum() > 0:
                        diff = value - float(bnum.sum() / bden.sum())
                        if num.size > 1:
                            w = boot.weights(num.size)
                            d = boot.ratio_resamples(num, den, w) - boot.ratio_resamples(bnum, bden, w)
                            dlo, dhi = (float(v) for v in boot.interval(d))
            elif metric == "hub_ratio":
                note = note or "the detector flags no token of the targets at this layer"
            elif metric == "position_following":
                note = note or f"no source token's ground truth is {matching.MOVED} or more tokens from its position"
            else:
                note = note or "no valid source token"
            out.append({**meta, "task": task, "mitigation": mitigation, "metric": metric, "value": value,
                        "ci_low": lo, "ci_high": hi, "diff": diff, "diff_ci_low": dlo, "diff_ci_high": dhi,
                        "n": int(num.size), "unit": units[task], "note": note})
        return out


def nothing_to_do(mit) -> bool:
    """Whether a fitted mitigation (not ``none``) has nothing to act on in its layer, known from its fit (no outlier
    channel, no positions); ``anomaly_inpaint`` depends on the images it is applied to and is always measured."""
    return mit.name != "none" and bool(mit.steps) and not any(
        s.active for s in mit.steps)


def _map(store, index: int, layer: str) -> np.ndarray:
    return np.asarray(store.array(layer)[int(index):int(index) + 1], dtype=np.float32)


def layer_harm(base, pairs_store, pairs: pd.DataFrame, disparity, layer: str, mitigations: Mapping,
               settings: HarmSettings, image_size: int, boot: Bootstrap, model_name: str = "") -> list[dict]:
    """harm.csv rows of one layer (:data:`HARM_COLUMNS`) for fitted ``mitigations`` ``{name: Mitigation}``."""
    _, c, n, w = base.shape(layer)
    meta = {"model": model_name, "layer_index": base.layer_index(layer), "layer": layer}
    terms, notes = _Terms(), {}
    units = {}
    pairs = pairs[pairs["task"].isin(settings.tasks)]
    for task, group in pairs.groupby("task", sort=False):
        units[task] = "tokens" if len(group) == 1 else "images"
        for _, pair in group.iterrows():
            target, valid, note = ground_truth(pair, n, image_size, disparity)
            if note:
                notes.update({(task, m): note for m in mitigations})
            rng = np.random.default_rng([int(settings.seed), int(pair["pair"]), int(n)])
            tokens = matching.sample_tokens(valid, settings.source_tokens, rng)
            src_store = base if pair["source_store"] == "base" else pairs_store
            src = _map(src_store, pair["source_index"], layer)
            tgt = _map(pairs_store, pair["target_index"], layer)
            flagged = flagged_tokens(token_norms(tgt), settings.mitigation.threshold)[0].reshape(-1) \
                if n >= 2 and w >= 2 else None
            for name, mit in mitigations.items():
                if nothing_to_do(mit):
                    notes[(task, name)] = f"nothing to act on ({mit.acts_on}): not measured"
                    terms.add(task, name, {m: (np.zeros(0), np.zeros(0)) for m in matching.METRICS},
                              per_token=True)
                    continue
                s, t = mit.apply(src)[0], mit.apply(tgt)[0]
                match = (matching.nearest_tokens(matching.tokens_of(s)[tokens], matching.tokens_of(t),
                                                 settings.device) if tokens.size else np.zeros(0, np.int64))
                terms.add(task, name, matching.pair_terms(tokens, match, target, n, flagged),
                          per_token=units[task] == "tokens")
    return terms.rows(meta, boot, units, notes)


# ---------------------------------------------------------------------------------------------
# Artifact measures and content on mitigated features
# ---------------------------------------------------------------------------------------------

def class_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                ridge: float = 1.0) -> np.ndarray:
    """A linear probe of the class: ridge regression of the one-hot class on the features (standardised with the
    training images' mean and sd; penalty ``ridge`` x the number of training images), solved in closed form
    (deterministic, no iterations), predicting the class of largest score. Trained on ``train_x`` (n, C) with labels
    ``train_y``, evaluated on ``test_x``. Returns per test image 1.0 (right) or 0.0 (wrong; also for a class absent
    from the training images)."""
    classes = np.unique(train_y)
    mu, sd = train_x.mean(axis=0), train_x.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    xtr = (np.asarray(train_x, np.float64) - mu) / sd
    xte = (np.asarray(test_x, np.float64) - mu) / sd
    onehot = (np.asarray(train_y)[:, None] == classes[None, :]).astype(np.float64)
    target = onehot - onehot.mean(axis=0)
    n = xtr.shape[0]
    # the dual form (n x n) when there are fewer images than channels, the primal (C x C) otherwise
    if n <= xtr.shape[1]:
        w = xtr.T @ np.linalg.solve(xtr @ xtr.T + ridge * n * np.eye(n), target)
    else:
        w = np.linalg.solve(xtr.T @ xtr + ridge * n * np.eye(xtr.shape[1]), xtr.T @ target)
    pred = classes[(xte @ w).argmax(axis=1)]
    return (pred == np.asarray(test_y)).astype(np.float64)


def _pooled(view: StoreView, layer: str, chunk_images: int) -> np.ndarray:
    return np.concatenate([x.mean(axis=(2, 3)) for _, x in view.iter_chunks(layer, chunk_images=chunk_images)])


def _probe_acc8(view: StoreView, layer: str, probe: Mapping, device: str, boot: Bootstrap,
                train_tokens: int | None) -> tuple:
    seed = int(probe["seed"]) if probe["mode"] == "paper" else int(list(probe["seeds"])[0])
    df = run_probe(view, layers=[layer], mode=probe["mode"], epochs=int(probe["epochs"]),
                   batch_size=int(probe["batch_size"]), lr=float(probe["lr"]), train_frac=float(probe["train_frac"]),
                   seed=seed, seeds=(seed,), granularities=(PROBE_GRID,), device=device, bootstrap=boot,
                   train_tokens=train_tokens)
    row = df[(df["metric"] == "per_axis") & (df["epoch"] == df["epoch"].max())].iloc[0]
    return float(row["accuracy"]), float(row["ci_low"]), float(row["ci_high"])


def layer_measures(base, crops: Mapping[int, object], layer: str, mitigations: Mapping, crop_mitigations: Mapping,
                   fit_images: np.ndarray, test_images: np.ndarray, labels: np.ndarray | None, ref_grid: int,
                   probe: Mapping, image_size: int, settings: HarmSettings, boot: Bootstrap,
                   model_name: str = "") -> list[dict]:
    """mitigations.csv rows of one layer (:data:`MITIGATION_COLUMNS`). ``labels`` (K, 3) anomaly label rows
    ``(image, x, y)`` on the ``ref_grid`` (indices into ``base``), or None."""
    _, c, n, w = base.shape(layer)
    t = image_size // n if n else 0
    crop = crops.get(t)
    classes = np.asarray(base.labels)
    y_fit, y_test = classes[fit_images], classes[test_images]
    test_pos = {int(i): k for k, i in enumerate(test_images)}
    lab = None
    if labels is not None and len(labels):
        keep = np.isin(labels[:, 0], test_images)
        lab = labels[keep].copy()
        lab[:, 0] = [test_pos[int(i)] for i in lab[:, 0]]
    rows = []
    for name, mit in mitigations.items():
        notes = []
        out = {"model": model_name, "layer_index": base.layer_index(layer), "layer": layer, "channels": int(c),
               "spatial": int(n), "mitigation": name}
        if nothing_to_do(mit):
            rows.append({**out, "active": False, "acts_on": mit.acts_on,
                         "note": "nothing to act on: not measured (it would repeat `none`)"})
            continue
        full_view = StoreView(base, None, mit)
        if n == w and n >= 2:
            out["probe_acc8"], out["probe_acc8_ci_low"], out["probe_acc8_ci_high"] = _probe_acc8(
                full_view, layer, probe, settings.device, boot, settings.probe_tokens)
        else:
            notes.append("probe_acc8: the probe needs a square map of at least 2x2")
        if crop is not None and layer in crop.layers and n >= 3:
            tab = token_group_similarity(StoreView(base, test_images, mit),
                                         {t: StoreView(crop, test_images, crop_mitigations[name])}, layers=[layer],
                                         mode="corrected", image_size=image_size,
                                         chunk_images=settings.chunk_images, bootstrap=boot).iloc[0]
            out["corner_ratio"] = float(tab["corner_ratio"])
            out["corner_ratio_ci_low"], out["corner_ratio_ci_high"] = (float(tab["corner_ratio_ci_low"]),
                                                                       float(tab["corner_ratio_ci_high"]))
        else:
            notes.append("corner_ratio: no crop variant for this layer" if crop is None or layer not in crop.layers
                         else "corner_ratio: the map has no ring to crop")
        if lab is not None and len(lab):
            tab = relative_norms(StoreView(base, test_images, mit), lab, layers=[layer], mode="corrected",
                                 chunk_images=settings.chunk_images, bootstrap=boot, ref_grid=ref_grid).iloc[0]
            out["rel_norm"] = float(tab["rel_norm_mean"])
            out["rel_norm_ci_low"], out["rel_norm_ci_high"] = float(tab["rel_norm_ci_low"]), float(
                tab["rel_norm_ci_high"])
        else:
            notes.append("rel_norm: no anomaly label on the test images")
        if (y_fit >= 0).all() and (y_test >= 0).all() and np.unique(y_fit).size > 1:
            pooled_fit = _pooled(StoreView(base, fit_images, mit), layer, settings.chunk_images)
            pooled_test = _pooled(StoreView(base, test_images, mit), layer, settings.chunk_images)
            right = class_probe(pooled_fit, y_fit, pooled_test, y_test)
            out["semantic_acc"] = float(right.mean())
            lo, hi = boot.mean_interval(right[:, None])
            out["semantic_acc_ci_low"], out["semantic_acc_ci_high"] = float(lo[0]), float(hi[0])
        else:
            notes.append("semantic_acc: the images carry no class labels (or one class)")
        out["active"] = bool(mit.active) if name != "none" else False
        out["acts_on"] = mit.acts_on
        out["note"] = "; ".join(notes)
        rows.append(out)
    return rows


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def harm_tables(base, crops: Mapping[int, object], pairs_store, pairs: pd.DataFrame, disparity, *,
                layers: Sequence[str] | None, fit_images: np.ndarray, test_images: np.ndarray,
                labels: np.ndarray | None, ref_grid: int, probe: Mapping, image_size: int,
                settings: HarmSettings = HarmSettings(), bootstrap: Bootstrap | None = None, model_name: str = "",
                measures: bool = True, progress: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(harm table, mitigations table)`` of a run (module docstring). ``base`` the run's full store, ``crops``
    ``{token size: crop store}``, ``pairs_store`` the pair images' store, ``pairs``/``disparity`` from
    :func:`diffaudit.harm.pairs.load_pairs`. ``measures=False`` skips the mitigations table."""
    boot = bootstrap or Bootstrap()
    layers = base.select_layers(layers)
    missing = [layer for layer in layers if layer not in pairs_store.layers]
    if missing:
        raise KeyError(f"the pair images' store {pairs_store.path} lacks layers {missing}")
    harm_rows, measure_rows = [], []
    it = layers
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(layers, desc=f"harm {model_name}".strip())
    for layer in it:
        mem = LayerCache(base, layer)  # every mitigation reads the layer several times
        mits = fit_store_mitigations(mem, layer, fit_images, settings.mitigations, settings.mitigation,
                                     settings.chunk_images)
        harm_rows += layer_harm(mem, pairs_store, pairs, disparity, layer, mits, settings, image_size, boot,
                                model_name)
        if measures:
            _, _, n, _ = base.shape(layer)
            t = image_size // n if n else 0
            crop = crops.get(t)
            layer_crops = {}
            crop_mits = {}
            if crop is not None and layer in crop.layers and n >= 3:
                layer_crops = {t: LayerCache(crop, layer)}
                crop_mits = fit_store_mitigations(layer_crops[t], layer, fit_images, settings.mitigations,
                                                  settings.mitigation, settings.chunk_images)
            measure_rows += layer_measures(mem, layer_crops, layer, mits, crop_mits, fit_images, test_images,
                                           labels, ref_grid, probe, image_size, settings, boot, model_name)
    harm = pd.DataFrame(harm_rows, columns=HARM_COLUMNS)
    return harm, pd.DataFrame(measure_rows, columns=MITIGATION_COLUMNS)
