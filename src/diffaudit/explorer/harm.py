"""The explorer's harm views (docs/explorer.md): every map drawn after a mitigation (:mod:`diffaudit.harm.mitigations`,
fitted on the run's fit images and cached per run, layer and mitigation), and the correspondence of the harm pairs
(a token of a pair's first image, its nearest token on the second under the mitigation, and its ground truth)."""
from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd

from ..datasets.format import DatasetError
from ..harm.matching import nearest_tokens, tokens_of
from ..harm.mitigations import MITIGATIONS, AnomalyInpaint, Mitigation, fit_store_mitigations
from ..harm.pairs import PAIRS_TABLE, ground_truth, load_pairs
from ..layout import HARM_PAIRS, REPRESENTATIONS, harm_dir, harm_pairs_dir, stored_rep_dirs
from .maps import RequestError, Run, _f, encode, similarity


def _fit_bytes(mit: Mitigation) -> int:
    """The arrays a fitted mitigation holds (the per-position mean map dominates)."""
    return sum(v.nbytes for st in mit.steps for v in vars(st).values() if isinstance(v, np.ndarray)) + 1024


class FitCache:
    """(model, run, layer, mitigation) -> fitted :class:`Mitigation`, least recently used out beyond ``max_bytes``;
    one fit at a time per key (concurrent requests for the same fit wait for it instead of fitting twice)."""

    def __init__(self, max_bytes: int = 256 * 2 ** 20):
        self.max_bytes = max_bytes
        self._d: OrderedDict = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._key_locks: dict = {}
        self.fits = 0  # fits computed (tests: cached, not refitted)

    def get(self, key, fit):
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                return self._d[key]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._d:
                    return self._d[key]
            value = fit()
            with self._lock:
                self.fits += 1
                self._d[key] = value
                self._bytes += _fit_bytes(value)
                while self._bytes > self.max_bytes and len(self._d) > 1:
                    _, old = self._d.popitem(last=False)
                    self._bytes -= _fit_bytes(old)
                self._key_locks.pop(key, None)
        return value


def fresh(mit: Mitigation) -> Mitigation:
    """A copy of a fitted mitigation that shares its fitted arrays but counts ``anomaly_inpaint``'s replaced
    tokens from zero, so that ``acts_on`` and ``active`` describe the images of one request."""
    steps = []
    for st in mit.steps:
        st = copy.copy(st)
        if isinstance(st, AnomalyInpaint):
            st.replaced = 0
        steps.append(st)
    return Mitigation(mit.name, steps)


class HarmViews:
    """The mitigation and correspondence methods of :class:`diffaudit.explorer.data.Explorer` (a mixin: it uses the
    explorer's runs, chunks and settings)."""

    def fit_images(self, r: Run) -> np.ndarray:
        """The run's fit images: the position probe's training images (module docstring)."""
        from ..analyses.probe import image_split
        from ..harm.evaluate import harm_images

        n = r.store.n_images
        return harm_images(n, self.probe, 0)[0] if self.probe else image_split(n)[0]

    def _check_mitigation(self, name) -> str:
        name = "none" if name in (None, "") else name
        if name not in MITIGATIONS:
            raise RequestError(f"unknown mitigation {name!r}; use one of {', '.join(MITIGATIONS)}")
        return name

    def mitigation(self, r: Run, layer: str, name: str) -> Mitigation:
        """Mitigation ``name`` of ``layer`` fitted on the run's fit images (cached), as a :func:`fresh` copy."""
        name = self._check_mitigation(name)
        if name == "none":
            return Mitigation("none")

        def fit():
            fit_images = self.fit_images(r)
            if not len(fit_images):
                raise RequestError(f"{r.model}/{r.name} has no fit images to fit {name} on", 409)
            return fit_store_mitigations(r.store, layer, [int(i) for i in fit_images], [name],
                                         self.mitigation_settings)[name]

        return fresh(self.fits.get((r.model, r.name, layer, name), fit))

    @staticmethod
    def _apply(mit: Mitigation, rep: np.ndarray) -> np.ndarray:
        return rep if not mit.steps else mit.apply(rep[None])[0]

    @staticmethod
    def _mitigation_info(mit: Mitigation, n_fit: int | None) -> dict:
        return {"name": mit.name, "active": bool(mit.active) or mit.name == "none", "acts_on": mit.acts_on,
                "fit_images": n_fit}

    def mitigated(self, r: Run, layer: str, images, name: str) -> tuple[dict, dict]:
        """``{image: map}`` of ``images`` at ``layer`` after mitigation ``name``, and what it did (name, active,
        acts_on on these images, the number of fit images)."""
        mit = self.mitigation(r, layer, name)
        maps = {i: self._apply(mit, self.chunk(r, layer, i)) for i in dict.fromkeys(images)}
        return maps, self._mitigation_info(mit, None if mit.name == "none" else len(self.fit_images(r)))

    # -- maps ----------------------------------------------------------------------------------
    def _harm_paths(self, r: Run) -> tuple[Path, list[Path] | None]:
        rep = Path(harm_dir(r.analysis_dir)) / REPRESENTATIONS
        return Path(harm_pairs_dir(self.root)), (stored_rep_dirs(rep) if rep.is_dir() else None)

    def has_harm(self, r: Run) -> bool:
        pairs_dir, dirs = self._harm_paths(r)
        return (pairs_dir / PAIRS_TABLE).is_file() and bool(dirs)

    def harm(self, r: Run) -> tuple:
        """The run's harm pairs: ``(the pair images' store as a Run, pairs.csv, the stereo disparity, the pair
        images' files relative to the results directory)``, read once; 404 when the run has none."""
        key = (r.model, r.name)
        with self._harm_lock:
            if key in self._harm:
                return self._harm[key]
        pairs_dir, dirs = self._harm_paths(r)
        if not (pairs_dir / PAIRS_TABLE).is_file() or not dirs:
            rep = Path(harm_dir(r.analysis_dir)) / REPRESENTATIONS
            missing = pairs_dir / PAIRS_TABLE if not (pairs_dir / PAIRS_TABLE).is_file() else rep
            raise RequestError(f"{r.model}/{r.name} has no harm pairs ({self._display(missing)} not found; "
                               "run the workflow with harm.enabled: true)", 404)
        try:
            pairs, disparity = load_pairs(pairs_dir)
            index = pd.read_csv(pairs_dir / "index.csv", dtype={"id": str})
        except (DatasetError, OSError, ValueError, KeyError) as e:
            raise RequestError(f"{HARM_PAIRS}: {e}", 409) from None
        hr = Run(r.model, f"{r.name}/harm", dirs, r.analysis_dir)
        hs = self._open(hr)
        n_pairs_images = len(index)
        bad = pairs[(pairs["target_index"] >= min(hs.n_images, n_pairs_images))
                    | ((pairs["source_store"] == "pairs") & (pairs["source_index"] >= hs.n_images))
                    | ((pairs["source_store"] == "base") & (pairs["source_index"] >= r.store.n_images))]
        if len(bad):
            raise RequestError(f"{HARM_PAIRS}/{PAIRS_TABLE}: pair {int(bad['pair'].iloc[0])} indexes an image "
                               f"that {r.model}/{r.name}'s stores do not hold", 409)
        out = (hr, pairs, disparity, [f"{HARM_PAIRS}/{f}" for f in index["file"].astype(str)])
        with self._harm_lock:
            self._harm[key] = out
        return out

    def _display(self, p: Path) -> str:
        try:
            return str(Path(p).relative_to(self.root))
        except ValueError:
            return str(p)

    def _pair_files(self, r: Run, row, files: list[str]) -> tuple[str | None, str]:
        if row["source_store"] == "base":
            ids = {im["id"]: im["file"] for im in self.images}
            src = ids.get(str(r.store.image_ids[int(row["source_index"])]))
        else:
            src = files[int(row["source_index"])]
        return src, files[int(row["target_index"])]

    def pairs(self, model, run) -> dict:
        """The run's harm pairs: id, task, source image id, and both images' files (under the results directory;
        a flip pair's source is the run's own dataset image)."""
        r = self.run(model, run)
        _, pairs, _, files = self.harm(r)
        out = []
        for _, row in pairs.iterrows():
            src, tgt = self._pair_files(r, row, files)
            out.append({"pair": int(row["pair"]), "task": str(row["task"]), "source_image": str(row["source_image"]),
                        "source_store": str(row["source_store"]), "source_file": src, "target_file": tgt})
        return {"model": r.model, "run": r.name, "pairs": out}

    def _pair(self, pairs: pd.DataFrame, pair):
        try:
            k = int(pair)
        except (TypeError, ValueError):
            raise RequestError(f"pair must be an integer id, got {pair!r}") from None
        hit = pairs[pairs["pair"] == k]
        if hit.empty:
            raise RequestError(f"pair {k} out of range: the harm pairs are 0..{len(pairs) - 1}")
        return hit.iloc[0]

    def correspondence(self, model, run, layer, pair, y, x, mitigation="none") -> dict:
        """Token (y, x) of the pair's first image at ``layer``: its nearest token on the second image by cosine
        (:func:`~diffaudit.harm.matching.nearest_tokens`) after ``mitigation`` (fitted on the run's fit images,
        applied to both), the cosine map over the second image, and the ground truth
        (:func:`~diffaudit.harm.pairs.ground_truth`), ``None`` with a note where there is none."""
        from ..analyses.paired import store_image_size

        mitigation = self._check_mitigation(mitigation)
        r = self.run(model, run)
        layer = self._layer(r, layer)
        hr, pairs, disparity, files = self.harm(r)
        if layer not in hr.store.layers or hr.store.shape(layer)[1:] != r.store.shape(layer)[1:]:
            raise RequestError(f"layer {layer!r} is not in {r.model}/{r.name}'s harm pairs store (or has another "
                               "shape there); extract the harm pairs again", 409)
        row = self._pair(pairs, pair)
        y, x = self._token(r, layer, y, x)
        _, _, h, w = r.store.shape(layer)
        src_run = r if row["source_store"] == "base" else hr
        si, ti = int(row["source_index"]), int(row["target_index"])
        mit = self.mitigation(r, layer, mitigation)
        src = self._apply(mit, self.chunk(src_run, layer, si))
        tgt = self._apply(mit, self.chunk(hr, layer, ti))
        k = y * w + x
        match = int(nearest_tokens(tokens_of(src)[[k]], tokens_of(tgt))[0])
        sim = similarity(tgt, src[:, y, x], "cosine")
        truth, note = None, ""
        size = store_image_size(r.store) or store_image_size(hr.store)
        if h != w:
            note = f"no ground truth: the {h}x{w} map is not square"
        elif size is None:
            note = "no ground truth: the store does not record its image size"
        else:
            try:
                target, valid, why = ground_truth(row, h, size, disparity)
            except (ValueError, DatasetError) as e:
                target, valid, why = None, None, str(e)
            if valid is not None and valid[k]:
                truth = [int(v) for v in target[k]]
            else:
                note = "no ground truth" + (f": {why}" if why else " for this token (it falls outside the second "
                                                                     "image or has no valid disparity)")
        src_file, tgt_file = self._pair_files(r, row, files)
        return {"layer": layer, "height": h, "width": w, "pair": int(row["pair"]), "task": str(row["task"]),
                "token": [y, x], "match": [match // w, match % w], "truth": truth, "truth_note": note,
                "match_cosine": _f(sim.reshape(-1)[match]), "data": encode(sim),
                "source_file": src_file, "target_file": tgt_file,
                "mitigation": self._mitigation_info(mit, None if mit.name == "none" else len(self.fit_images(r)))}
