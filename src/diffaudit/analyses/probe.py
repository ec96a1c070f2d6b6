"""Positional linear probe: can a token's (row, column) be read out linearly from its feature vector?

Method (docs/method.md §3.1). For every layer with an n x n map of C channels, one sample is one token
(its C-dim feature vector, stored as float16, cast to float32, **no normalisation**), flattened in the order
(image, row, column); its label is (row, column). The probe is a single ``nn.Linear(C, 2n)`` whose logits are
viewed as ``(batch, n, 2)``: logit ``2i + a`` scores class i on axis a (a = 0 row, a = 1 column). The loss is
``F.cross_entropy(logits, labels)`` with the class dimension 1, i.e. two n-way softmax classifiers sharing one
linear layer, averaged over the batch and both axes. Optimiser ``Adam(lr)`` (defaults otherwise). Each epoch
draws one ``torch.randperm`` over the training tokens and steps over minibatches of ``batch_size`` (the last one
partial). After every epoch the whole test set is evaluated in one pass: ``pred = argmax(dim=1)`` -> (row, col).

Metrics at granularity g (see :func:`accuracy_at_granularity`):

* ``per_axis`` (the paper's number): mean over tokens AND both axes of ``(pred*g)//n == (label*g)//n``.
  Chance is ``1/min(g, n)``. For g >= n the value equals the native accuracy.
* ``joint``: fraction of tokens whose row AND column are both right at granularity g (chance ``1/min(g,n)^2``).

Interior probe (docs/method.md §3.7). ``interior_accuracy`` is the same metric, of the same probe, on the test
tokens at least ``interior_k`` bins of the evaluated grid from its border (G = ``min(g, n)`` bins per axis; the bin
of row and column in ``[k, G-1-k]``; NaN when ``G <= 2k``). At native granularity a bin is a token. It separates two things a high ``accuracy`` may mean. *Decoding the border*: features that only
say "this token is at (or near) an edge, and which one" (zero padding, edge artifacts) let the probe place the
outer rings, most of the tokens of a small map, and that alone gives an accuracy far above chance. *Encoding
position*: features that tell interior tokens apart from each other, i.e. a positional code everywhere on the
map. Only the second lifts ``interior_accuracy``. The interior's own chance level is higher than the whole map's:
a probe that knows only "interior" can put every interior token in the interior's most populated bin
(:func:`interior_chance_level`: ``1/(G-2k)`` per axis, e.g. 1/4 for G = 8, k = 2), so
compare ``interior_accuracy`` with that, not with ``1/min(g, n)``.

Uncertainty. ``ci_low``/``ci_high`` are the percentile bootstrap interval of ``accuracy`` over the run's test
images (:mod:`~diffaudit.analyses.bootstrap`): per image the accuracy on its own tokens (every image has n^2
test tokens, so their mean is ``accuracy``), resampled with replacement. The interval covers which images were
tested, not the training randomness of the probe nor the choice of the split (the seeds' spread,
``accuracy_sd``, shows those).

Modes
-----
``paper`` replays the authors' code: ``torch.manual_seed(seed)`` and ``torch.cuda.manual_seed(seed)`` are set
ONCE before looping over the layers in the given order (cuDNN deterministic, no benchmark), so the probe
initialisation (``nn.Linear`` built on the CPU, then moved to the device) and the per-epoch permutations (CPU
RNG) are drawn sequentially across layers: an exact replay needs the same layer list and order. The split is
positional: training tokens are all tokens of images ``0 .. int(train_frac*N) - 1``, the test tokens are the rest
(dataset order). The global RNG is left as the authors' loop leaves it; the cuDNN flags are restored afterwards
(the probe itself uses no cuDNN kernel, so this does not change any number).

The positional split inherits the dataset order: on a class-ordered set (``imagenet_subset`` with
``imagenet.source: local`` reads the classes one after another; the hub source keeps the stream's order) of the
paper's 5 x 100 images the last 20 % are the last class, so the test accuracy is measured on one class the probe
never saw in training. Paper mode keeps
the split (it replays the authors) but logs a warning when the test images hold a single class while the whole
set holds several, and the test set's class mix is recorded for every run (see :func:`summarize_probe`).

``corrected`` repeats the probe for each seed in ``seeds``: the image split is a seeded permutation of the images
(``numpy.random.default_rng(seed).permutation(N)``, first ``int(train_frac*N)`` for training), shared by all
layers of that seed; the probe initialisation (PyTorch's default ``nn.Linear`` init drawn from a private
generator) and the epoch permutations use a generator seeded from a hash of (seed, layer), so the result of a
layer does not depend on which other layers ran or in which order. The global RNG is untouched.

Memory
------
One layer at a time: its N*H*W tokens are held as float16 (N*H*W*C*2 bytes, e.g. 1.34 GB for 500 images of a
320x64x64 layer, 0.33 GB for 1280x16x16) on the compute device (GPU when available), filled chunk by chunk from
the store with ``iter_chunks``. Evaluation adds one float32 copy of the test tokens plus their logits
(about (1 - train_frac) * N*H*W*(C + 2n)*4 bytes, 0.6 GB for the largest paper layer). No other layer is held.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..store import ReprStore
from ..tables import PROBE_COLUMNS  # noqa: F401 (the table schemas live in diffaudit.tables)
from ..tables import PROBE_EXTRA_COLUMNS as EXTRA_COLUMNS  # noqa: F401
from ..tables import PROBE_SPLIT_COLUMNS as SPLIT_COLUMNS
from ..tables import PROBE_SUMMARY_COLUMNS as SUMMARY_COLUMNS
from ..tables import PROBE_SUMMARY_EXTRA as SUMMARY_EXTRA
from ..tables import PROBE_SUMMARY_KEYS as SUMMARY_KEYS
from ..tables import PROBE_SUMMARY_VALUES as SUMMARY_VALUES  # noqa: F401
from ..tables import PROBE_TABLE_COLUMNS as TABLE_COLUMNS
from .bootstrap import Bootstrap
from .probe_tokens import derived_seed as _derived_seed
from .probe_tokens import _layer_token_subset, _layer_tokens, _token_indices, _train_token_indices

#: ``test_class_mix`` of a test set without any class label (folder images at the top level, hand-made stores).
UNLABELLED = "unlabelled"
METRICS = ("per_axis", "joint")
MODES = ("paper", "corrected")

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

def accuracy_at_granularity(pred, label, n: int, g: int, joint: bool = False) -> float:
    """Accuracy of (row, col) predictions on an n x n grid, coarsened to a g x g grid by floor quantisation.

    ``pred`` and ``label`` are integer arrays/tensors of shape (T, 2) holding (row, col) in [0, n).
    Index i falls into bin ``(i*g)//n``. ``joint=False`` (the paper's metric) averages correctness over tokens
    and both axes; ``joint=True`` counts a token as right only if both axes are right.
    """
    p = torch.as_tensor(pred).long()
    t = torch.as_tensor(label).long()
    if p.shape != t.shape or p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"pred and label must both have shape (T, 2), got {tuple(p.shape)} and {tuple(t.shape)}")
    ok = (p * g) // n == (t * g) // n
    if joint:
        ok = ok.all(dim=1)
    return ok.float().mean().item()


def chance_level(n: int, g: int, joint: bool = False) -> float:
    """Chance accuracy of :func:`accuracy_at_granularity` for a uniform guess (g dividing n or g >= n)."""
    k = min(g, n)
    return 1.0 / (k * k) if joint else 1.0 / k


def interior_bins(n: int, g: int) -> int:
    """The number of bins per axis of the grid evaluated at granularity ``g`` on an n x n map: ``min(g, n)``."""
    return min(int(g), int(n))


def interior_chance_level(n: int, g: int, k: int, joint: bool = False) -> float:
    """Accuracy on the interior tokens (row and col in the bins ``[k, G-1-k]`` of the evaluated G x G grid,
    G = ``min(g, n)``) of a guess that knows only that a token is interior: the share of interior rows in the
    interior's most populated bin, ``1/(G-2k)`` when G divides n (squared for ``joint``). NaN when ``G <= 2k``."""
    bins = interior_bins(n, g)
    if bins <= 2 * k:
        return float("nan")
    b = (np.arange(n) * bins) // n
    inner = b[(b >= k) & (b <= bins - 1 - k)]
    p = np.bincount(inner).max() / inner.size
    return float(p * p) if joint else float(p)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def _resolve_device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _layer_geometry(store: ReprStore, layer: str) -> tuple[int, int, int]:
    if layer not in store.layers:
        raise KeyError(f"layer {layer!r} not in store {store.path} (has {store.layers})")
    n_img, c, h, w = store.shape(layer)
    if h != w:
        raise UserError(f"probe needs square maps, but layer {layer!r} is {h}x{w} (H x W) in {store.path}")
    return n_img, c, h


def _init_linear_(lin: nn.Linear, gen: torch.Generator) -> None:
    """PyTorch's default ``nn.Linear`` initialisation, drawn from ``gen`` instead of the global RNG."""
    with torch.no_grad():
        nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5), generator=gen)
        if lin.bias is not None:
            fan_in = lin.weight.shape[1]
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            nn.init.uniform_(lin.bias, -bound, bound, generator=gen)


def _train_and_eval(x: torch.Tensor, n: int, train_tok: torch.Tensor, test_tok: torch.Tensor, probe: nn.Linear,
                    *, epochs: int, batch_size: int, lr: float, granularities: Sequence[int],
                    gen: torch.Generator | None, device: torch.device, interior_k: int = 2,
                    row_of: torch.Tensor | None = None) -> list[tuple]:
    """Train ``probe`` on tokens ``x[train_tok]`` and evaluate on ``x[test_tok]`` after every epoch.

    ``train_tok``/``test_tok`` are int64 CPU tensors of token indices (image-major over the layer's n x n maps); the
    label of token t is ``(row, col) = ((t % n^2) // n, t % n)``; the test tokens are whole images, image after
    image. ``x`` holds every token (row t), or, with ``row_of``, only the tokens used (token t in row ``row_of[t]``).
    Returns rows
    (epoch, granularity, metric, accuracy, interior accuracy, per-image accuracies (float64, one per test image),
    per-image interior accuracies (the same on each image's interior tokens; None without an interior)).
    """
    hw = n * n
    train_dev = train_tok.to(device)
    test_dev = test_tok.to(device)
    rows = (lambda t: t) if row_of is None else (lambda t, r=row_of.to(device): r[t])
    y_test = torch.stack([(test_dev % hw) // n, test_dev % n], dim=1)
    n_test_img = test_tok.numel() // hw
    interiors = {int(g): _interior_mask(y_test, n, int(g), interior_k) for g in granularities}  # fixed per g
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    n_train = train_tok.numel()
    out: list[tuple] = []
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(n_train, generator=gen) if gen is not None else torch.randperm(n_train)
        perm = perm.to(device)
        probe.train()
        for i in range(0, n_train, batch_size):
            tok = train_dev[perm[i:i + batch_size]]
            xb = x[rows(tok)].float()
            yb = torch.stack([(tok % hw) // n, tok % n], dim=1)
            logits = probe(xb).view(-1, n, 2)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        probe.eval()
        with torch.no_grad():
            pred = probe(x[rows(test_dev)].float()).view(-1, n, 2).argmax(dim=1)
        for g in granularities:
            g = int(g)
            ok = (pred * g) // n == (y_test * g) // n  # (T, 2) hits per axis
            per_image = {"per_axis": ok.view(n_test_img, hw * 2).double().mean(dim=1),
                         "joint": ok.all(dim=1).view(n_test_img, hw).double().mean(dim=1)}
            interior = interiors[g]
            inner_image = {}
            if interior is not None:  # the same tokens of every image are interior: one row per image
                inner_ok = ok[interior].view(n_test_img, -1, 2)
                inner_image = {"per_axis": inner_ok.double().mean(dim=(1, 2)),
                               "joint": inner_ok.all(dim=2).double().mean(dim=1)}
            for metric in METRICS:
                joint = metric == "joint"
                inner = (accuracy_at_granularity(pred[interior], y_test[interior], n, g, joint=joint)
                         if interior is not None else float("nan"))
                out.append((epoch, g, metric, accuracy_at_granularity(pred, y_test, n, g, joint=joint), inner,
                            per_image[metric].cpu().numpy(),
                            inner_image[metric].cpu().numpy() if inner_image else None))
    return out


def _interior_mask(y: torch.Tensor, n: int, g: int, k: int) -> torch.Tensor | None:
    """Boolean mask of the tokens (rows of ``y``, (T, 2) row/col labels) at least ``k`` bins of the evaluated grid
    (G = ``min(g, n)`` bins per axis) from the border: bin of row and column in [k, G-1-k]. Counting in bins, not
    tokens, keeps the outermost bins out of the interior at every granularity, so features that only tell where a
    token of an outer bin is cannot lift the interior accuracy. None when the grid is too small (``G <= 2k``)."""
    bins = interior_bins(n, g)
    if bins <= 2 * k:
        return None
    b = (y * bins) // n
    return ((b >= k) & (b <= bins - 1 - k)).all(dim=1)


def _class_name(label: int, class_names) -> str:
    if class_names is not None:
        try:
            return str(class_names[label])
        except (IndexError, KeyError, TypeError):
            pass
    return str(label)


def class_mix(labels, class_names: Sequence | Mapping | None = None) -> tuple[int | None, str]:
    """``(number of classes, mix)`` of a set of images from their labels (-1 = unlabelled).

    ``mix`` is ``"<class>:<count>"`` per class joined by ``;`` in label order (``"980:100"``,
    ``"235:20;242:20;282:21"``), then ``"unlabelled:<count>"`` if some images have no label; ``"unlabelled"``
    with ``None`` classes if none has one. ``<class>`` is ``class_names[label]`` when given (a sequence indexed
    by label or a mapping), else the label itself.
    """
    lab = np.asarray(labels, dtype=np.int64).reshape(-1)
    known = lab[lab >= 0]
    if known.size == 0:
        return None, UNLABELLED
    values, counts = np.unique(known, return_counts=True)
    parts = [f"{_class_name(int(v), class_names)}:{int(n)}" for v, n in zip(values, counts)]
    if known.size < lab.size:
        parts.append(f"{UNLABELLED}:{int(lab.size - known.size)}")
    return int(values.size), ";".join(parts)


def _image_splits(n_img: int, train_frac: float, mode: str, seed: int,
                  seeds: Sequence[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """seed -> (training images, test images) as sorted image indices (see the module docstring); both sides
    must hold at least one image."""
    n_train_img = int(train_frac * n_img)
    if not 0 < n_train_img < n_img:
        raise UserError(f"probe.train_frac={train_frac} with {n_img} images leaves {n_train_img} training and "
                        f"{n_img - n_train_img} test images; both must be >= 1")
    if mode == "paper":
        return {int(seed): (np.arange(n_train_img), np.arange(n_train_img, n_img))}
    splits = {}
    for s in seeds:
        perm = np.random.default_rng(int(s)).permutation(n_img)
        splits[int(s)] = (np.sort(perm[:n_train_img]), np.sort(perm[n_train_img:]))
    return splits


def image_split(n_img: int, train_frac: float = 0.8, mode: str = "paper", seed: int = 42,
                seeds: Sequence[int] = (42, 43, 44)) -> tuple[np.ndarray, np.ndarray]:
    """``(training images, test images)`` of the probe's first run with these settings (paper mode: the positional
    split; corrected mode: the first seed's shuffled split), sorted image indices. The harm analysis fits its
    mitigations on the training images and scores on the test images (:mod:`diffaudit.harm.evaluate`)."""
    if mode not in MODES:
        raise ValueError(f"unknown probe mode {mode!r}; use one of {MODES}")
    return next(iter(_image_splits(int(n_img), train_frac, mode, seed, seeds).values()))


def _describe_splits(labels: np.ndarray, splits: dict, mode: str, class_names, model_name: str,
                     train_frac: float) -> pd.DataFrame:
    """One row per run (:data:`SPLIT_COLUMNS`); warns when a test set holds one class of several."""
    n_all, _ = class_mix(labels)
    rows = []
    who = f"probe {model_name} ({mode} mode)" if model_name else f"probe ({mode} mode)"
    for s, (_, te_img) in splits.items():
        n_cls, mix = class_mix(labels[te_img], class_names)
        rows.append((int(s), int(len(te_img)), n_cls, mix))
        if n_cls == 1 and n_all is not None and n_all > 1:
            test_labels = labels[te_img]
            only = _class_name(int(test_labels[test_labels >= 0][0]), class_names)
            if mode == "paper":
                log.warning("%s: the positional test split (the last %d of %d images, dataset order) holds a single "
                            "class, %s, of the %d in the set, so the accuracy is measured on that class only; "
                            "`probe.mode: corrected` shuffles the split (one per seed) so it mixes the classes",
                            who, len(te_img), len(labels), only, n_all)
            else:
                log.warning("%s: the shuffled test split of seed %d (%d images) holds a single class, %s, of the %d "
                            "in the set; use more images or a larger test share (lower `probe.train_frac`, now %s)",
                            who, s, len(te_img), only, n_all, train_frac)
    out = pd.DataFrame(rows, columns=SPLIT_COLUMNS)
    out["test_classes"] = out["test_classes"].astype("Int64")
    return out


def probe_splits(store: ReprStore, mode: str = "paper", train_frac: float = 0.8, seed: int = 42,
                 seeds: Sequence[int] = (42, 43, 44), class_names: Sequence | Mapping | None = None,
                 model_name: str = "") -> pd.DataFrame:
    """The test set of every run of :func:`run_probe` with these settings: :data:`SPLIT_COLUMNS`.

    ``test_images`` is the number of test images, ``test_classes`` the number of distinct class labels among
    them (``<NA>`` if unlabelled) and ``test_class_mix`` their mix (:func:`class_mix`; labels are the store's
    ``label`` coordinate, named by ``class_names`` when given). Logs a warning for every run whose test images
    hold a single class while the whole set holds several (paper mode: the positional split of a
    class-ordered set).
    """
    if mode not in MODES:
        raise ValueError(f"unknown probe mode {mode!r}; use one of {MODES}")
    splits = _image_splits(store.n_images, train_frac, mode, seed, seeds)
    return _describe_splits(_store_labels(store), splits, mode, class_names, model_name, train_frac)


def _store_labels(store: ReprStore) -> np.ndarray:
    labels = getattr(store, "labels", None)
    if labels is None or len(labels) != store.n_images:
        return np.full(store.n_images, -1, dtype=np.int64)
    return np.asarray(labels, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------

def run_probe(store: ReprStore, layers: list[str] | None = None, mode: str = "paper", epochs: int = 5,
              batch_size: int = 512, lr: float = 1e-3, train_frac: float = 0.8, seed: int = 42,
              seeds: Sequence[int] = (42, 43, 44), granularities: Sequence[int] = (8, 16, 32, 64), device=None,
              model_name: str = "", progress: bool = False, chunk_images: int = 20,
              class_names: Sequence | Mapping | None = None, interior_k: int = 2,
              bootstrap: Bootstrap | None = None, image_records: list | None = None,
              train_tokens: int | None = None) -> pd.DataFrame:
    """Train the positional linear probe on each layer; long-format accuracies (see the module docstring).

    Columns (:data:`TABLE_COLUMNS`): ``model, layer_index, layer, channels, spatial, epoch, granularity, metric,
    seed, accuracy``, with ``metric`` in {"per_axis", "joint"} and epochs 1..``epochs``, then ``ci_low, ci_high``
    (the ``bootstrap`` percentile interval of the accuracy over the run's test images; default ``Bootstrap()``)
    and ``interior_accuracy`` (the same metric on the test tokens at least ``interior_k`` bins of the evaluated
    grid from its border; NaN when ``min(g, n) <= 2 * interior_k``). ``mode="paper"`` uses ``seed`` (one run, the authors' RNG stream and
    positional split); ``mode="corrected"`` one run per seed in ``seeds``.
    ``device=None`` picks CUDA when available. Memory: one layer's tokens in float16 at a time (module docstring).

    The test set of every run (:func:`probe_splits`, its class mix named by ``class_names``) is attached as
    ``df.attrs["probe_splits"]`` (a list of row dicts), which :func:`summarize_probe` reads; a test set holding a
    single class of several is logged as a warning before any training. The bootstrap interval of the mean over
    all seeds (:func:`_seed_mean_interval`) is attached as ``df.attrs["probe_seed_mean_ci"]`` (columns as lists),
    for :func:`summarize_probe` as well.

    ``train_tokens`` (None: every token, the analysis's own setting) trains on at most that many tokens of each
    training image (drawn per image from a generator seeded by the layer, the same in every run of the layer):
    the harm analysis's probe of mitigated features (:mod:`diffaudit.harm.evaluate`) uses it to bound its cost on
    large maps; the test tokens are always all tokens.

    ``image_records``, a list, collects the final epoch's ``per_axis`` accuracies of every test image, per layer,
    seed and granularity (records of :func:`diffaudit.analyses.paired.per_image_frame`: quantities
    ``acc_<g>x<g>`` and ``interior_acc_<g>x<g>``), the input of the experiments' paired comparison.
    """
    if mode not in MODES:
        raise ValueError(f"unknown probe mode {mode!r}; use one of {MODES}")
    layers = list(store.layers) if layers is None else list(layers)
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    if int(interior_k) < 0:
        raise ValueError(f"interior_k must be >= 0, got {interior_k}")
    boot = Bootstrap() if bootstrap is None else bootstrap
    geoms = {layer: _layer_geometry(store, layer) for layer in layers}  # validate everything before training
    splits = _image_splits(store.n_images, train_frac, mode, seed, seeds)
    dev = _resolve_device(device)
    split_info = _describe_splits(_store_labels(store), splits, mode, class_names, model_name, train_frac)

    it = layers
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(layers, desc=f"probe {model_name} ({mode})".strip())

    rows: list[tuple] = []
    seed_mean_ci: dict[str, list] = {k: [] for k in ("layer", "epoch", "granularity", "metric", "seeds", "ci_low",
                                                     "ci_high")}
    cudnn_flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        if mode == "paper":
            torch.manual_seed(seed)
            torch.cuda.manual_seed(seed)
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        for layer in it:
            _, c, n = geoms[layer]
            tokens = {s: (_train_token_indices(tr_img, n, train_tokens, layer), _token_indices(te_img, n * n))
                      for s, (tr_img, te_img) in splits.items()}
            row_of = None
            if train_tokens is None or int(train_tokens) >= n * n:
                x = _layer_tokens(store, layer, dev, chunk_images=chunk_images)
            else:  # only the tokens the runs use
                used = torch.unique(torch.cat([t for pair in tokens.values() for t in pair]))
                x, row_of = _layer_token_subset(store, layer, dev, used, chunk_images=chunk_images)
            meta = (model_name, store.layer_index(layer), layer, int(c), int(n))
            per_image = []  # per seed: (test images, (rows, test images) per-image accuracies)
            for s, (tr_img, te_img) in splits.items():
                if mode == "paper":
                    gen = None
                    probe = nn.Linear(c, 2 * n).to(dev)  # built on the CPU (global RNG), then moved
                else:
                    gen = torch.Generator().manual_seed(_derived_seed("probe", s, layer))
                    probe = nn.Linear(c, 2 * n)
                    _init_linear_(probe, gen)
                    probe = probe.to(dev)
                res = _train_and_eval(x, n, *tokens[s], probe,
                                      epochs=epochs, batch_size=batch_size, lr=lr, granularities=granularities,
                                      gen=gen, device=dev, interior_k=int(interior_k), row_of=row_of)
                acc_img = np.stack([r[5] for r in res])  # (rows, test images)
                lo, hi = boot.mean_interval(acc_img.T)
                rows.extend((*meta, ep, g, metric, int(s), acc, float(a), float(b), inner)
                            for (ep, g, metric, acc, inner, *_), a, b in zip(res, lo, hi))
                if image_records is not None:
                    image_records.extend(_per_image_records(res, layer, n, int(s), te_img))
                per_image.append((te_img, acc_img))
            lo, hi = _seed_mean_interval(boot, per_image)
            for (ep, g, metric, *_), a, b in zip(res, lo, hi):
                for key, v in zip(seed_mean_ci, (layer, ep, g, metric, sorted(int(s) for s in splits), float(a),
                                                 float(b))):
                    seed_mean_ci[key].append(v)
            del x
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_flags
    out = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    out.attrs["probe_seed_mean_ci"] = seed_mean_ci
    out.attrs["probe_splits"] = [
        {"seed": int(r.seed), "test_images": int(r.test_images),
         "test_classes": None if pd.isna(r.test_classes) else int(r.test_classes), "test_class_mix": r.test_class_mix}
        for r in split_info.itertuples(index=False)]
    return out


def _per_image_records(res: Sequence[tuple], layer: str, n: int, seed: int, test_images) -> list[dict]:
    """The final epoch's per-image ``per_axis`` accuracies of one layer and seed as per-image records."""
    last = max(r[0] for r in res)
    out = []
    for ep, g, metric, _, _, acc_img, inner_img in res:
        if ep != last or metric != "per_axis":
            continue
        for quantity, values in ((f"acc_{g}x{g}", acc_img), (f"interior_acc_{g}x{g}", inner_img)):
            if values is not None:
                out.append({"layer": layer, "spatial": int(n), "quantity": quantity, "seed": seed,
                            "images": np.asarray(test_images, dtype=np.int64), "num": values, "den": 1.0})
    return out


def _seed_mean_interval(boot: Bootstrap, per_image: Sequence[tuple[np.ndarray, np.ndarray]]
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap interval of the mean over seeds of the accuracy, one per row of the per-image accuracies.

    ``per_image``: per seed (its sorted test images, (rows, test images) per-image accuracies). The pool is the
    union of the seeds' test images; each resample draws from the pool, every seed's accuracy is the weighted
    mean over its own test images in that resample, and the seeds' accuracies are averaged. One seed (paper
    mode): the pool is its test set and the interval equals the run's own.
    """
    pool = np.unique(np.concatenate([np.asarray(te, dtype=np.int64) for te, _ in per_image]))
    subsets = [(np.searchsorted(pool, te), acc.T) for te, acc in per_image]
    return boot.interval(boot.subset_mean_resamples(pool.size, subsets))


def _pooled_split(seeds: tuple, by_seed: Mapping[int, tuple]) -> tuple:
    """(test_images, test_classes, test_class_mix) of the runs of ``seeds`` pooled in one summary row."""
    runs = [by_seed[s] for s in seeds if s in by_seed]
    if not runs or len(runs) < len(seeds):
        return None, None, None
    if len(runs) == 1:
        return runs[0]
    images = {r[0] for r in runs}
    classes = [r[1] for r in runs if r[1] is not None]
    mix = " | ".join(f"{r[2]} (seed {s})" for s, r in zip(seeds, runs))
    return (images.pop() if len(images) == 1 else min(images)), (min(classes) if classes else None), mix


def _summary_interval(out: pd.DataFrame, records: Mapping[str, list] | None) -> np.ndarray:
    """(rows, 2) seed-mean interval of each summary row: from ``records`` (run_probe's
    ``probe_seed_mean_ci``) when they hold the row's seeds, else the row's own interval if it pools one seed."""
    ci = np.full((len(out), 2), np.nan)
    single = (out["n_seeds"] == 1).to_numpy()
    ci[single] = out.loc[single, ["ci_low", "ci_high"]].to_numpy(dtype=float)
    if records:
        lookup = {(str(la), int(e), int(g), str(m), tuple(s)): (lo, hi)
                  for la, e, g, m, s, lo, hi in zip(*(records[k] for k in ("layer", "epoch", "granularity", "metric",
                                                                           "seeds", "ci_low", "ci_high")))}
        keys = zip(out["layer"].astype(str), out["epoch"], out["granularity"], out["metric"].astype(str),
                   out["seeds"])
        for i, (la, e, g, m, s) in enumerate(keys):
            hit = lookup.get((la, int(e), int(g), m, tuple(s)))
            if hit is not None:
                ci[i] = hit
    return ci


def summarize_probe(df: pd.DataFrame, splits: pd.DataFrame | Sequence[Mapping] | None = None) -> pd.DataFrame:
    """Mean and sample sd (ddof=1; NaN for a single seed) of the accuracy over seeds, with each row's test split.

    One row per (model, layer_index, layer, channels, spatial, epoch, granularity, metric), columns
    ``..., accuracy, accuracy_sd, n_seeds, test_images, test_classes, test_class_mix`` (:data:`SUMMARY_VALUES`).
    The split columns describe the test images of the pooled runs (one per seed; the same for every layer):
    ``test_images`` the number of test images of a run, ``test_classes`` the number of distinct classes among
    them -- the fewest of any pooled run -- (empty if unlabelled) and ``test_class_mix`` the classes and their
    counts (:func:`class_mix`, e.g. ``980:100``; ``unlabelled``); for several seeds the runs' mixes are joined
    as ``<mix> (seed 42) | <mix> (seed 43) | ...``. ``splits`` (:func:`probe_splits` or its records) defaults to
    ``df.attrs["probe_splits"]`` as :func:`run_probe` leaves it; without either the split columns are empty.

    Then (:data:`SUMMARY_EXTRA`) ``ci_low, ci_high``, the bootstrap interval of the seed-mean accuracy (images
    resampled jointly over the seeds' test sets, see :func:`_seed_mean_interval`), taken from
    ``df.attrs["probe_seed_mean_ci"]`` as :func:`run_probe` leaves it for the same seeds; without it, a single
    seed's row keeps its own ``ci_low, ci_high`` and several seeds get NaN. ``interior_accuracy`` is the mean over
    seeds (NaN where the table has none).
    """
    columns = list(SUMMARY_COLUMNS)
    if df.empty:
        return pd.DataFrame(columns=columns)
    if splits is None:
        splits = df.attrs.get("probe_splits")
    records = (splits.to_dict("records") if isinstance(splits, pd.DataFrame) else list(splits or []))
    by_seed = {int(r["seed"]): (int(r["test_images"]),
                                None if r["test_classes"] is None or pd.isna(r["test_classes"])
                                else int(r["test_classes"]), str(r["test_class_mix"]))
               for r in records}
    extra = {c: (c, "mean") for c in SUMMARY_EXTRA if c in df.columns}
    out = (df.groupby(SUMMARY_KEYS, sort=False, dropna=False)
           .agg(accuracy=("accuracy", "mean"), accuracy_sd=("accuracy", "std"), n_seeds=("accuracy", "count"),
                seeds=("seed", lambda x: tuple(sorted({int(v) for v in x}))), **extra)
           .reset_index())
    for c in SUMMARY_EXTRA:
        if c not in out.columns:
            out[c] = np.nan
    out[["ci_low", "ci_high"]] = _summary_interval(out, df.attrs.get("probe_seed_mean_ci"))
    out["n_seeds"] = out["n_seeds"].astype(int)
    pooled = [_pooled_split(seeds, by_seed) for seeds in out["seeds"]]
    out["test_images"] = pd.array([p[0] for p in pooled], dtype="Int64")
    out["test_classes"] = pd.array([p[1] for p in pooled], dtype="Int64")
    out["test_class_mix"] = pd.array([p[2] for p in pooled], dtype="object")
    out = out[columns]
    return out.sort_values(["model", "layer_index", "metric", "epoch", "granularity"], kind="stable",
                           ignore_index=True)
