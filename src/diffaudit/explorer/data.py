"""The explorer's data layer: what a results directory holds, and the maps computed from single image chunks.

Nothing here reads a whole layer: every map needs the chunks of the images shown (a store chunk is one image of
one layer), read once and kept in a small byte-bounded cache, so that hovering over an image costs one dot
product per shown image.

Metrics of a reference token ``r`` (C,) against every token ``t`` of an image (docs/explorer.md):

* ``cosine``           <r, t> / (|r| |t|)   (0 where a norm is 0)
* ``centred_cosine``   cosine after subtracting from each token the mean token of its own image
* ``dot``              <r, t>
* ``l2``               |r - t|
* ``rel_norm``         |t| / |r|            (the token's norm relative to the clicked token's)

Mitigations (:mod:`diffaudit.harm.mitigations`): every map of a layer can be drawn after a mitigation, fitted on the
run's *fit images* of that layer (the position probe's training images: :func:`diffaudit.harm.evaluate.harm_images`
with the configuration's ``probe`` section, or :func:`diffaudit.analyses.probe.image_split`'s defaults without
one), streamed over chunks of the store and kept in a byte-bounded cache per (run, layer, mitigation).

Correspondence: with the harm pairs (``{results}/harm_pairs``) and their features (``{run}/harm/representations``),
a token of a pair's first image is matched to the nearest token of the second
(:func:`diffaudit.harm.matching.nearest_tokens`, on the mitigated features) and compared with its ground truth
(:func:`diffaudit.harm.pairs.ground_truth`).
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from ..analyses.anomalies import REF_LAYER, LabelFileError, load_label_file, reference_grid, validate_labels
from ..errors import DiffauditError
from ..harm.mitigations import MITIGATIONS, MitigationSettings
from ..layout import BASELINE, DATASET, paper_reference_dir, run_summary_path, stored_runs
from ..store import ReprStore
from .harm import FitCache, HarmViews
from .maps import METRICS, RequestError, Run, _f, _norms, decode, detect_blocks, encode, similarity  # noqa: F401

CURVE_COLUMNS = ("acc_8x8", "corner_ratio", "rel_norm_mean")


class ChunkCache:
    """(run, layer, image) -> float32 (C, H, W), least recently used out beyond ``max_bytes``."""

    def __init__(self, max_bytes: int = 512 * 2 ** 20):
        self.max_bytes = max_bytes
        self._d: OrderedDict = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.reads = 0  # chunks read from disk (tests: no whole layer per request)

    def get(self, key, load):
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                return self._d[key]
        value = load()
        with self._lock:
            self.reads += 1
            if key not in self._d:
                self._d[key] = value
                self._bytes += value.nbytes
            while self._bytes > self.max_bytes and len(self._d) > 1:
                _, old = self._d.popitem(last=False)
                self._bytes -= old.nbytes
        return value

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self._bytes = 0


class Explorer(HarmViews):
    """Everything the page asks for, over one results directory."""

    def __init__(self, results_dir: str | Path, *, labels: str = "{results_dir}/labels/{model}.npy",
                 ref_layer: str = REF_LAYER, threshold: float = 2.0, cache_bytes: int = 512 * 2 ** 20,
                 probe: dict | None = None, mitigation_settings: MitigationSettings | None = None,
                 fit_cache_bytes: int = 256 * 2 ** 20):
        """``probe``: the configuration's ``probe`` section, whose training images the mitigations are fitted on
        (None: :func:`~diffaudit.analyses.probe.image_split`'s defaults); ``mitigation_settings``: their knobs
        (None: the defaults, with ``threshold``)."""
        self.root = Path(results_dir).resolve()
        if not self.root.is_dir():
            raise RequestError(f"results directory {results_dir} does not exist; run the workflow (make demo) first")
        self.labels_template = labels
        self.ref_layer = ref_layer
        self.threshold = float(threshold)
        self.cache = ChunkCache(cache_bytes)
        # chunk reads are I/O bound (zarr's event loop waits on the file reads): several at once
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="explorer-read")
        self.runs: dict[str, dict[str, Run]] = self._discover()
        self._label_locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self.images = self._dataset()
        self.probe = dict(probe) if probe else None
        self.mitigation_settings = mitigation_settings or MitigationSettings(threshold=float(threshold))
        self.fits = FitCache(fit_cache_bytes)
        self._harm: dict[tuple[str, str], tuple] = {}
        self._harm_lock = threading.Lock()

    # -- discovery -----------------------------------------------------------------------------
    def _discover(self) -> dict[str, dict[str, Run]]:
        out: dict[str, dict[str, Run]] = {}
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            runs = {name: Run(model_dir.name, name, dirs, folder)
                    for name, (dirs, folder) in stored_runs(model_dir).items()}
            if runs:
                out[model_dir.name] = runs
        return out

    def _dataset(self) -> list[dict]:
        index = self.root / DATASET / "index.csv"
        if not index.is_file():
            return []
        df = pd.read_csv(index, dtype={"id": str})
        return [{"id": str(r["id"]), "file": f"{DATASET}/{r['file']}"} for _, r in df.iterrows()]

    def run(self, model, run=None) -> Run:
        if model not in self.runs:
            raise RequestError(f"unknown model {model!r}; this results directory has {sorted(self.runs)}", 404)
        run = run or BASELINE
        if run not in self.runs[model]:
            raise RequestError(f"model {model!r} has no run {run!r} (has {sorted(self.runs[model])})", 404)
        r = self.runs[model][run]
        self._open(r)
        return r

    def _open(self, r: Run) -> ReprStore:
        """The run's store; a store that cannot be read (incomplete, foreign) is a 409 with its message."""
        try:
            return r.store
        except DiffauditError as e:
            raise RequestError(f"{r.model}/{r.name}: {e}", 409) from None

    def meta(self) -> dict:
        models, problems = {}, []
        for model, runs in self.runs.items():
            for name, r in runs.items():
                try:
                    s = self._open(r)
                except RequestError as e:
                    problems.append(str(e))
                    continue
                models.setdefault(model, {})
                layers = []
                for layer in s.layers:
                    _, c, h, w = s.shape(layer)
                    layers.append({"name": layer, "index": s.layer_index(layer), "channels": c, "height": h,
                                   "width": w})
                models[model][name] = {"layers": layers, "n_images": s.n_images,
                                       "image_ids": [str(i) for i in s.image_ids],
                                       "image_size": s.attrs.get("image_size"),
                                       "ref_layer": self.ref_layer_of(r),
                                       "has_ref_layer": self.ref_layer_of(r) in s.layers,
                                       "harm_pairs": self.has_harm(r)}
        files = {im["id"]: im["file"] for im in self.images}
        return {"models": models, "metrics": list(METRICS), "mitigations": list(MITIGATIONS),
                "ref_layer": self.ref_layer,
                "threshold": self.threshold, "image_files": files, "problems": problems,
                "labels": {m: self._labels_display(m) for m in models}}

    def ref_layer_of(self, r: Run) -> str:
        """The detector's reference layer for a run: the configured one, or with ``ref_layer: auto`` the layer the
        anomaly rule chose for this run (its ``anomaly_detector.json``; the baseline's for an experiment without
        one)."""
        if self.ref_layer != "auto":
            return self.ref_layer
        for d in (r.analysis_dir, self.root / r.model):
            try:
                return str(json.loads((d / "anomaly_detector.json").read_text())["ref_layer"])
            except (OSError, ValueError, KeyError):
                continue
        return self.ref_layer

    # -- reading -------------------------------------------------------------------------------
    def _layer(self, r: Run, layer: str) -> str:
        if layer not in r.store.layers:
            raise RequestError(f"layer {layer!r} is not in {r.model}/{r.name}", 404)
        return layer

    def _image(self, r: Run, image) -> int:
        try:
            i = int(image)
        except (TypeError, ValueError):
            raise RequestError(f"image must be an integer index, got {image!r}") from None
        if not 0 <= i < r.store.n_images:
            raise RequestError(f"image {i} out of range: {r.model}/{r.name} has {r.store.n_images} images")
        return i

    def chunk(self, r: Run, layer: str, image: int) -> np.ndarray:
        return self.cache.get((r.model, r.name, layer, image),
                              lambda: np.asarray(r.array(layer)[image], dtype=np.float32))

    def _token(self, r: Run, layer: str, y, x) -> tuple[int, int]:
        _, _, h, w = r.store.shape(layer)
        try:
            yi, xi = int(y), int(x)
        except (TypeError, ValueError):
            raise RequestError(f"token coordinates must be integers, got y={y!r} x={x!r}") from None
        if not (0 <= yi < h and 0 <= xi < w):
            raise RequestError(f"token (y={yi}, x={xi}) outside the {h}x{w} map of {layer}")
        return yi, xi

    def prefetch(self, r: Run, pairs) -> None:
        """Read the chunks ``(layer, image)`` not yet cached, several at a time."""
        todo = list(dict.fromkeys(pairs))
        if len(todo) > 1:
            list(self._pool.map(lambda p: self.chunk(r, *p), todo))

    # -- mitigations ---------------------------------------------------------------------------
    def similarity_maps(self, model, run, layer, ref_image, y, x, images, metric="cosine", mitigation="none"
                        ) -> dict:
        """The metric of token (y, x) of ``ref_image`` against every token of each of ``images`` at ``layer``,
        on the features after ``mitigation``."""
        mitigation = self._check_mitigation(mitigation)
        if metric not in METRICS:
            raise RequestError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
        r = self.run(model, run)
        layer = self._layer(r, layer)
        ref_image = self._image(r, ref_image)
        images = [self._image(r, i) for i in images]
        if not images or len(images) > 64:
            raise RequestError("give 1 to 64 images")
        y, x = self._token(r, layer, y, x)
        self.prefetch(r, [(layer, ref_image)] + [(layer, i) for i in images])
        reps, info = self.mitigated(r, layer, [ref_image] + images, mitigation)
        ref_rep = reps[ref_image]
        ref = ref_rep[:, y, x]
        mean = ref_rep.mean(axis=(1, 2), dtype=np.float32) if metric == "centred_cosine" else None
        _, _, h, w = r.store.shape(layer)
        out = []
        for i in images:
            m = similarity(reps[i], ref, metric, mean)
            best = int(np.argmin(m) if metric == "l2" else np.argmax(m))
            if metric == "l2" and i == ref_image:  # the token itself is at distance 0: best other match
                mm = m.copy()
                mm[y, x] = np.inf
                best = int(np.argmin(mm))
            out.append({"image": i, "data": encode(m), "best": [best // w, best % w],
                        "min": _f(np.nanmin(m)), "max": _f(np.nanmax(m))})
        return {"layer": layer, "height": h, "width": w, "metric": metric, "ref_image": ref_image,
                "token": [y, x], "mitigation": info, "maps": out}

    def strip(self, model, run, layer, ref_image, y, x, image, metric="cosine", mitigation="none") -> dict:
        """The token at the clicked position (scaled to every layer's grid) against ``image``, in every layer,
        after ``mitigation`` (fitted in every layer: the first strip of a mitigation fits it in all of them)."""
        mitigation = self._check_mitigation(mitigation)
        if metric not in METRICS:
            raise RequestError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
        r = self.run(model, run)
        layer = self._layer(r, layer)
        ref_image, image = self._image(r, ref_image), self._image(r, image)
        y, x = self._token(r, layer, y, x)
        _, _, h0, w0 = r.store.shape(layer)
        fy, fx = (y + 0.5) / h0, (x + 0.5) / w0
        self.prefetch(r, [(lay, i) for lay in r.store.layers for i in (ref_image, image)])
        out = []
        for lay in r.store.layers:
            _, _, h, w = r.store.shape(lay)
            ly, lx = min(h - 1, int(fy * h)), min(w - 1, int(fx * w))
            reps, info = self.mitigated(r, lay, [ref_image, image], mitigation)
            ref_rep = reps[ref_image]
            mean = ref_rep.mean(axis=(1, 2), dtype=np.float32) if metric == "centred_cosine" else None
            m = similarity(reps[image], ref_rep[:, ly, lx], metric, mean)
            out.append({"layer": lay, "index": r.store.layer_index(lay), "height": h, "width": w,
                        "token": [ly, lx], "data": encode(m), "min": _f(np.nanmin(m)), "max": _f(np.nanmax(m)),
                        "active": info["active"]})
        return {"image": image, "ref_image": ref_image, "metric": metric, "mitigation": mitigation, "layers": out}

    def norms(self, model, run, layer, images, mitigation="none") -> dict:
        """Norm maps (L2 over channels) of ``images`` at ``layer`` after ``mitigation``, with the detected and
        labelled anomalies drawn on that layer's grid (boxes ``[row, col, k]``, the geometry of
        ``relative_norms``); the detector runs on the reference layer's features as stored."""
        mitigation = self._check_mitigation(mitigation)
        r = self.run(model, run)
        layer = self._layer(r, layer)
        images = [self._image(r, i) for i in images]
        if not images or len(images) > 64:
            raise RequestError("give 1 to 64 images")
        s = r.store
        _, _, h, w = s.shape(layer)
        ref_layer = self.ref_layer_of(r)
        h_ref = reference_grid(s, ref_layer)
        has_ref = ref_layer in s.layers
        labels_error = None
        try:
            labels = self.labels(model)["labels"]
        except RequestError as e:  # a hand-edited, invalid file: show the maps and say why the labels are missing
            labels, labels_error = [], str(e)
        paper = self._paper_labels(r)
        scale = h / h_ref
        k = max(1, int(2 * scale))
        self.prefetch(r, [(lay, i) for i in images for lay in dict.fromkeys([layer] + ([ref_layer] if has_ref
                                                                                      else []))])

        def boxes(rows):
            return [[int(yy * scale), int(xx * scale), k] for xx, yy in rows]

        reps, info = self.mitigated(r, layer, images, mitigation)
        out = []
        for i in images:
            n = _norms(reps[i])
            det = detect_blocks(self.chunk(r, ref_layer, i), self.threshold) if has_ref else np.zeros((0, 2))
            lab = [(int(a[1]), int(a[2])) for a in labels if a[0] == i]
            pap = [(int(a[1]), int(a[2])) for a in paper if a[0] == i]
            out.append({"image": i, "data": encode(n), "max": _f(np.nanmax(n)), "mean": _f(np.nanmean(n)),
                        "detected": boxes(det.tolist()), "labelled": boxes(lab), "paper": boxes(pap),
                        "detected_xy": det.tolist(), "labelled_xy": [list(p) for p in lab]})
        return {"layer": layer, "height": h, "width": w, "ref_grid": h_ref, "is_ref_layer": layer == ref_layer,
                "labels_error": labels_error, "mitigation": info, "maps": out}

    # -- harm pairs and correspondence ----------------------------------------------------------
    def _paper_labels(self, r: Run) -> np.ndarray:
        """The authors' hand labels when the workflow found they apply (paper_reference/status.json)."""
        try:
            from ..paper_files import paper_file, read_status

            d = Path(paper_reference_dir(self.root / r.model))
            if not d.is_dir() or not read_status(d).get("applies"):
                return np.zeros((0, 3), np.int64)
            p = paper_file(d, r.model, "labels")
            return load_label_file(p) if p.is_file() else np.zeros((0, 3), np.int64)
        except Exception:  # noqa: BLE001 - the overlay is optional; a broken file only hides it
            return np.zeros((0, 3), np.int64)

    def curves(self, model, run) -> dict:
        """The paper figure's three per-layer curves of one run (experiment_summary/{model}/{run}.csv)."""
        r = self.run(model, run)
        path = Path(run_summary_path(self.root, r.model, r.name))
        if not path.is_file():
            return {"available": False, "message": f"{path.relative_to(self.root)} not found (run the workflow)"}
        df = pd.read_csv(path)
        cols = [c for c in CURVE_COLUMNS if c in df.columns]
        return {"available": True, "source": str(path.relative_to(self.root)),
                "layers": df["layer"].astype(str).tolist(), "layer_index": df["layer_index"].astype(int).tolist(),
                "curves": {c: [None if pd.isna(v) else float(v) for v in df[c]] for c in cols}}

    # -- labels --------------------------------------------------------------------------------
    def labels_path(self, model: str) -> Path:
        if model not in self.runs:
            raise RequestError(f"unknown model {model!r}; this results directory has {sorted(self.runs)}", 404)
        return Path(self.labels_template.format(results_dir=str(self.root), model=model))

    def _labels_display(self, model: str) -> str:
        p = self.labels_path(model)
        try:
            return str(p.relative_to(Path.cwd()))
        except ValueError:
            return str(p)

    def _label_lock(self, path: Path) -> threading.Lock:
        with self._locks_lock:
            return self._label_locks.setdefault(str(path), threading.Lock())

    def _read_labels(self, model: str) -> np.ndarray:
        path = self.labels_path(model)
        if not path.exists():
            return np.zeros((0, 3), np.int64)
        s = self.run(model).store
        try:
            return load_label_file(path, n_images=s.n_images,
                                   grid=reference_grid(s, self.ref_layer_of(self.run(model))))
        except LabelFileError as e:
            raise RequestError(str(e), 409) from None

    def labels(self, model: str) -> dict:
        path = self.labels_path(model)
        return {"model": model, "path": self._labels_display(model), "exists": path.exists(),
                "labels": self._read_labels(model).tolist()}

    def toggle_label(self, model: str, image, x, y) -> dict:
        """Add the 2x2 patch whose upper-left token is (x, y) (snapped to even) of ``image``, or remove it."""
        s = self.run(model).store
        ref_layer = self.ref_layer_of(self.run(model))
        if ref_layer not in s.layers:
            raise RequestError(f"{model} has no reference layer {ref_layer}; nothing to label on", 409)
        i = self._image(self.run(model), image)
        grid = reference_grid(s, ref_layer)
        try:
            xi, yi = int(x), int(y)
        except (TypeError, ValueError):
            raise RequestError(f"x and y must be integers, got x={x!r} y={y!r}") from None
        if not (0 <= xi < grid and 0 <= yi < grid):
            raise RequestError(f"(x={xi}, y={yi}) outside the {grid}x{grid} reference grid")
        xi, yi = xi - xi % 2, yi - yi % 2
        path = self.labels_path(model)
        with self._label_lock(path):
            cur = self._read_labels(model)
            hit = (cur[:, 0] == i) & (cur[:, 1] == xi) & (cur[:, 2] == yi)
            if hit.any():
                new = cur[~hit]
                action = "removed"
            else:
                new = np.vstack([cur, [[i, xi, yi]]])
                action = "added"
            new = validate_labels(new.reshape(-1, 3), n_images=s.n_images, grid=grid, source=str(path))
            if new.size:
                new = new[np.lexsort((new[:, 2], new[:, 1], new[:, 0]))]
            save_labels_atomic(path, new)
        return {**self.labels(model), "action": action, "patch": [i, xi, yi]}


def save_labels_atomic(path: Path, labels: np.ndarray) -> None:
    """Write ``labels`` (K, 3) int64 to ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, np.asarray(labels, dtype=np.int64).reshape(-1, 3), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
