"""Qualitative figures (docs/method.md §4.2): token similarity, corner artifacts, high-norm anomalies, PCA maps.

The authors' qualitative panels come from their interactive Representation Similarity Explorer, not from code in
their repository (docs/method.md §6.1). These functions draw static equivalents from a representation store and its
dataset:

* :func:`plot_token_similarity` -- cosine similarity of one reference token to every token of several images
  (the positional-embedding view). Colours as in the explorer: orange with alpha = sim for sim > 0, blue with
  alpha = -sim for sim < 0, drawn over the image on its token grid.
* :func:`plot_corner_similarity` -- the same with a corner token as reference on a low-resolution layer (the
  corner-artifact view).
* :func:`plot_norm_maps` -- per-image L2-norm-over-channels maps divided by the image maximum (as in the authors'
  labelling tool) with hand-labelled or automatically detected 2x2 anomaly patches boxed.
* :func:`plot_pca_rgb` -- the first three principal components of the layer's tokens as an RGB map.

Every function writes ``<out_stem>.png`` (dpi 150) and ``<out_stem>.svg`` and returns a :class:`FigureOutput`
holding the paths, the layer actually drawn, the image indices and the arrays behind the picture. Output is
deterministic (fixed SVG hash salt, no date in the SVG). Only the shown images of the drawn layer are read, except
when :func:`plot_norm_maps` picks its images itself (it then streams the layer once through
:func:`diffaudit.analyses.anomalies.detect_anomalies`, chunk by chunk).

If a requested layer is not in the store, the functions fall back to a store layer with the resolution the
requested layer has in an SD-1.x/2.x U-Net at the store's image size (same block preferred) and say so in the
figure title; if no such layer exists, :class:`LayerNotAvailableError` lists the store's layers and sizes.
"""
from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LinearSegmentedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from ..analyses.anomalies import REF_LAYER, detect_anomalies, reference_grid, validate_labels
from ..datasets import load_images, load_index
from ..errors import DiffauditError, UserError
from ..families import sd
from ..families.registry import of_store
from ..layout import FULL
from ..store import ReprStore

DPI = 150
ORANGE = (1.0, 0.55, 0.0)
BLUE = (0.1, 0.35, 1.0)
#: Colour scale of the similarity overlays as it appears over a white background (for the colour bar).
SIM_CMAP = LinearSegmentedColormap.from_list("diffaudit_sim", [BLUE, (1.0, 1.0, 1.0), ORANGE])
DEFAULT_TOKEN_LAYER = "up_blocks[0].upsamplers[0]"  # the explorer's "up_blocks[0]" output (16x16 at 512 px)
DEFAULT_CORNER_LAYER = "mid_block.attentions[0]"
DEFAULT_PCA_LAYER = REF_LAYER
GRID_MAX = 32  # draw the token grid when the map is at most this many tokens wide
LABEL_COLOR = "lime"
DETECT_COLOR = "cyan"


class LayerNotAvailableError(DiffauditError, ValueError):
    """Neither the requested layer nor a layer of the right resolution is in the store."""


@dataclass
class FigureOutput:
    png: Path
    svg: Path
    layer: str
    images: list[int]
    note: str = ""
    data: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Array helpers (no plotting)
# ---------------------------------------------------------------------------------------------

def token_similarity_map(reps, ref) -> np.ndarray:
    """Cosine similarity of the reference vector ``ref`` (C,) to every token of ``reps`` (..., C, H, W).

    Returns float32 (..., H, W) in [-1, 1]; a zero-norm token (or reference) has similarity 0.
    """
    x = np.asarray(reps, dtype=np.float32)
    r = np.asarray(ref, dtype=np.float32).reshape(-1)
    if x.ndim < 3 or x.shape[-3] != r.shape[0]:
        raise ValueError(f"reps must be (..., C, H, W) with C = len(ref) = {r.shape[0]}, got shape {x.shape}")
    dot = np.einsum("...chw,c->...hw", x, r, dtype=np.float32)
    norms = np.sqrt(np.einsum("...chw,...chw->...hw", x, x, dtype=np.float32))
    denom = norms * np.float32(np.linalg.norm(r))
    with np.errstate(divide="ignore", invalid="ignore"):
        sim = np.where(denom > 0, dot / np.where(denom > 0, denom, 1), 0.0)
    return np.clip(sim, -1.0, 1.0).astype(np.float32)


def similarity_overlay(sim) -> np.ndarray:
    """(H, W) similarity -> RGBA (H, W, 4): orange with alpha = sim for sim > 0, blue with alpha = -sim otherwise."""
    s = np.clip(np.asarray(sim, dtype=np.float32), -1, 1)
    rgba = np.zeros(s.shape + (4,), dtype=np.float32)
    rgba[s > 0, :3] = ORANGE
    rgba[s < 0, :3] = BLUE
    rgba[..., 3] = np.abs(s)
    return rgba


def norm_map(rep, normalize: bool = True) -> np.ndarray:
    """(C, H, W) -> (H, W) L2 norm over channels, divided by the map's maximum (as the authors' labeller)."""
    x = np.asarray(rep, dtype=np.float32)
    n = np.sqrt(np.einsum("chw,chw->hw", x, x, dtype=np.float32))
    if normalize:
        m = float(n.max()) if n.size else 0.0
        n = n / m if m > 0 else n
    return n


def pca_rgb(reps, n_components: int = 3, percentiles: tuple[float, float] = (1.0, 99.0)):
    """PCA of all tokens of ``reps`` ((C, H, W) or (B, C, H, W)), first 3 components as RGB in [0, 1].

    Fit on all given tokens (float32 data, float64 covariance); each component is scaled to [0, 1] between its
    ``percentiles`` over those tokens and clipped. Component signs are fixed (largest |loading| positive), so the
    result is deterministic. Returns ``(rgb, explained_variance_ratio)`` with rgb (H, W, 3) or (B, H, W, 3);
    with fewer than 3 channels the missing components are 0.5 (grey).
    """
    x = np.asarray(reps, dtype=np.float32)
    single = x.ndim == 3
    if single:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"reps must be (C, H, W) or (B, C, H, W), got shape {x.shape}")
    b, c, h, w = x.shape
    tokens = x.transpose(0, 2, 3, 1).reshape(-1, c)
    mean = tokens.mean(axis=0, dtype=np.float64)
    centered = tokens - mean.astype(np.float32)
    cov = (centered.T.astype(np.float64) @ centered.astype(np.float64)) / max(1, tokens.shape[0] - 1)
    evals, evecs = np.linalg.eigh(cov)
    order = np.argsort(evals)[::-1]
    evals, evecs = np.clip(evals[order], 0, None), evecs[:, order]
    k = min(n_components, c)
    comps = evecs[:, :k]
    signs = np.sign(comps[np.abs(comps).argmax(axis=0), np.arange(k)])
    comps = comps * np.where(signs == 0, 1, signs)
    proj = centered.astype(np.float64) @ comps  # (T, k)
    out = np.full((tokens.shape[0], n_components), 0.5, dtype=np.float64)
    for j in range(k):
        lo, hi = np.percentile(proj[:, j], percentiles)
        out[:, j] = np.clip((proj[:, j] - lo) / (hi - lo), 0, 1) if hi > lo else 0.5
    total = float(evals.sum())
    ratio = np.zeros(n_components)
    if total > 0:
        ratio[:k] = evals[:k] / total
    rgb = out.reshape(b, h, w, n_components).astype(np.float32)
    return (rgb[0] if single else rgb), ratio


def anomaly_boxes(labels, h_ref: int, h: int) -> dict[int, list[tuple[int, int, int]]]:
    """Labels (K, 3) ``(image, x, y)`` on the ``h_ref`` grid -> per image ``(row, col, k)`` boxes on an ``h`` grid.

    Same geometry as :func:`diffaudit.analyses.anomalies.relative_norms`: scale = h / h_ref,
    row = int(y * scale), col = int(x * scale), k = max(1, int(2 * scale)).
    """
    scale = h / h_ref
    k = max(1, int(2 * scale))
    out: dict[int, list[tuple[int, int, int]]] = {}
    for img, x, y in np.asarray(labels, dtype=np.int64).reshape(-1, 3):
        out.setdefault(int(img), []).append((int(y * scale), int(x * scale), k))
    return out


# ---------------------------------------------------------------------------------------------
# Layers and images
# ---------------------------------------------------------------------------------------------

def sd_downsampling(layer: str) -> int | None:
    """Pixels per token of ``layer`` in an SD-1.x/2.x U-Net (8 at conv_in ... 64 at mid_block); None if unknown."""
    return sd.token_px(layer)  # the SD family's geometry (diffaudit.families.sd)


def _image_size(store: ReprStore) -> int | None:
    size = store.attrs.get("image_size") or store.attrs.get("config", {}).get("image_size")
    if not size:
        return None
    return int(size) - 2 * int(store.attrs.get("crop_px", 0) or 0)


def _block(layer: str) -> str:
    return layer.split(".")[0]


def _layer_table(store: ReprStore) -> str:
    return ", ".join(f"{l} ({store.shape(l)[2]}x{store.shape(l)[3]})" for l in store.layers)


def resolve_layer(store: ReprStore, layer: str, spatial: int | None = None, prefer_block: str | None = None
                  ) -> tuple[str, str]:
    """``(layer_to_draw, note)``: ``layer`` itself if stored, otherwise a stored layer of the right resolution.

    The right resolution is ``spatial`` if given, else the requested layer's resolution in an SD U-Net at the
    store's image size (:func:`sd_downsampling`). Among stored layers of that height (or within 20 % of it, for
    cropped stores with odd sizes) one of the same block (or ``prefer_block``) is preferred, then the first in
    store order. ``note`` says what was substituted ("" when nothing was).
    """
    if layer in store.layers:
        return layer, ""
    if spatial is None and of_store(store.attrs).single_grid:
        # not a U-Net (a diffusion transformer: every block on one patch grid): the block at mid depth
        chosen = store.layers[len(store.layers) // 2]
        h, w = store.shape(chosen)[2:]
        return chosen, f"{layer} is a U-Net layer; showing {chosen} ({h}x{w}), the stored layer at mid depth"
    if spatial is None:
        factor = sd_downsampling(layer)
        size = _image_size(store)
        if factor is not None and size:
            spatial = max(1, round(size / factor))
    if spatial is None:
        raise LayerNotAvailableError(
            f"layer {layer!r} is not in store {store.path}, and its resolution is unknown (not an SD U-Net layer "
            f"name, or the store records no image_size); choose one of: {_layer_table(store)}")
    heights = {l: store.shape(l)[2] for l in store.layers}
    cands = [l for l in store.layers if heights[l] == spatial]
    if not cands:
        cands = [l for l in store.layers if abs(math.log(heights[l] / spatial)) < math.log(1.2)]
    if not cands:
        raise LayerNotAvailableError(
            f"layer {layer!r} is not in store {store.path} and no stored layer has its {spatial}x{spatial} "
            f"resolution; choose one of: {_layer_table(store)}")
    blocks = [_block(layer)] + ([prefer_block] if prefer_block else [])
    for blk in blocks:
        same = [l for l in cands if _block(l) == blk]
        if same:
            cands = same
            break
    chosen = cands[0]
    h, w = store.shape(chosen)[2:]
    return chosen, f"{layer} not in store; showing {chosen} ({h}x{w}) instead"


def _check_images(store: ReprStore, images: Sequence[int]) -> list[int]:
    out = [int(i) for i in images]
    if not out:
        raise ValueError("no images to show")
    bad = [i for i in out if not 0 <= i < store.n_images]
    if bad:
        raise IndexError(f"image index {bad[0]} out of range for a store of {store.n_images} images")
    return list(dict.fromkeys(out))  # unique, order kept


def _load_reps(store: ReprStore, layer: str, images: Sequence[int]) -> np.ndarray:
    """(k, C, H, W) float32 of the given images only."""
    arr = store.array(layer)
    return np.stack([np.asarray(arr[int(i)], dtype=np.float32) for i in images])


def _load_pictures(store: ReprStore, dataset_dir, images: Sequence[int]) -> list[np.ndarray]:
    """RGB uint8 arrays of the dataset images behind store rows ``images`` (cropped like the store's variant)."""
    index = load_index(dataset_dir)
    ids = list(index["id"])
    pos = {v: k for k, v in enumerate(ids)}
    crop = int(store.attrs.get("crop_px", 0) or 0)
    out = []
    for i in images:
        sid = str(store.image_ids[i])
        row = pos.get(sid, i)  # stores list images in dataset order; ids other than the index's -> position
        if row >= len(index):
            raise IndexError(f"store image {i} ({sid}) has no row in the dataset {dataset_dir} "
                             f"({len(index)} images)")
        img = load_images(dataset_dir, index, row, row + 1)[0]
        if crop:
            img = img.crop((crop, crop, img.size[0] - crop, img.size[1] - crop))
        out.append(np.asarray(img.convert("RGB")))
    return out


def _model_label(store: ReprStore) -> str:
    a = store.attrs
    bits = [str(a["model"])] if a.get("model") else []
    if a.get("timestep") is not None:
        bits.append(f"t={a['timestep']}")
    if a.get("variant") and a.get("variant") != FULL:
        bits.append(str(a["variant"]))
    return ", ".join(bits)


# ---------------------------------------------------------------------------------------------
# Drawing helpers
# ---------------------------------------------------------------------------------------------

def _show_image(ax, picture: np.ndarray, h: int, w: int, grey: bool = False) -> None:
    """The picture stretched over the h x w token grid; ``grey``: light greyscale so colour overlays read clearly."""
    if grey:
        lum = picture[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255.0
        picture = np.repeat((0.3 + 0.6 * lum)[..., None], 3, axis=2)
    ax.imshow(picture, extent=(0, w, h, 0), interpolation="bilinear")
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])


def _grid(ax, h: int, w: int, color: str = "white") -> None:
    if max(h, w) <= GRID_MAX:
        ax.vlines(np.arange(1, w), 0, h, colors=color, linewidths=0.3, alpha=0.45)
        ax.hlines(np.arange(1, h), 0, w, colors=color, linewidths=0.3, alpha=0.45)


def _box(ax, row: int, col: int, k: int = 1, color: str = "black", lw: float = 2.0, ls: str = "-",
         halo: bool = True) -> None:
    if halo:
        ax.add_patch(Rectangle((col, row), k, k, fill=False, edgecolor="white", linewidth=lw + 1.6, linestyle="-",
                               clip_on=False))
    ax.add_patch(Rectangle((col, row), k, k, fill=False, edgecolor=color, linewidth=lw, linestyle=ls, clip_on=False))


MIN_WIDTH = 8.0  # inches, so that titles fit even with one or two panels


def _new_figure(ncols: int, nrows: int, panel: float = 3.0, extra_w: float = 0.9, extra_h: float = 1.0) -> Figure:
    return Figure(figsize=(max(MIN_WIDTH, ncols * panel + extra_w), nrows * panel + extra_h), layout="constrained")


def _wrap(text: str, fig: Figure, fontsize: float = 10) -> str:
    """Wrap each line of ``text`` to the figure width (about 0.52 em per character)."""
    width = int(fig.get_figwidth() * 72 / (0.52 * fontsize)) - 2
    return "\n".join(textwrap.fill(line, width) if len(line) > width else line for line in text.split("\n"))


def _save(fig: Figure, out_stem) -> tuple[Path, Path]:
    stem = Path(out_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    png, svg = Path(f"{stem}.png"), Path(f"{stem}.svg")
    rc = {"svg.hashsalt": "diffaudit", "svg.fonttype": "path"}
    if "svg.id" in matplotlib.rcParams:
        rc["svg.id"] = "diffaudit"
    with matplotlib.rc_context(rc):
        fig.savefig(png, dpi=DPI, metadata={"Software": None})
        fig.savefig(svg, metadata={"Date": None})
    return png, svg


def _title(main: str, store: ReprStore, note: str) -> str:
    """Heading, model label and (if any) the layer-substitution note, one item per line."""
    lines = [main]
    label = _model_label(store)
    if label:
        lines[0] += f"  [{label}]"
    if note:
        lines.append(f"NOTE: {note}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------

def _similarity_figure(store, dataset_dir, out_stem, layer, note, ref_image, ref_token, images, heading, subtitle):
    _, c, h, w = store.shape(layer)
    row, col = (int(v) for v in ref_token)
    if not (0 <= row < h and 0 <= col < w):
        raise ValueError(f"reference token (row {row}, col {col}) outside the {h}x{w} grid of {layer}")
    ref_image = int(ref_image)
    shown = _check_images(store, [ref_image] + [int(i) for i in images])
    reps = _load_reps(store, layer, shown)
    ref_vec = reps[0][:, row, col]
    sims = token_similarity_map(reps, ref_vec)
    pictures = _load_pictures(store, dataset_dir, shown)

    fig = _new_figure(len(shown), 1, panel=3.3, extra_w=1.0, extra_h=1.05)
    axes = fig.subplots(1, len(shown), squeeze=False)[0]
    for j, (ax, img_i) in enumerate(zip(axes, shown)):
        _show_image(ax, pictures[j], h, w, grey=True)
        ax.imshow(similarity_overlay(sims[j]), extent=(0, w, h, 0), interpolation="nearest")
        _grid(ax, h, w)
        s = sims[j]
        if j == 0:
            _box(ax, row, col, color="black", lw=2.0)
            ax.set_title(f"image {store.image_ids[img_i]}: reference\n(token boxed black)", fontsize=9)
        else:
            mr, mc = np.unravel_index(int(np.argmax(s)), s.shape)
            _box(ax, int(mr), int(mc), color="#00c000", lw=2.2)
            ax.add_patch(Rectangle((col + 0.12, row + 0.12), 0.76, 0.76, fill=False, edgecolor="black",
                                   linewidth=1.3, linestyle=(0, (2, 1.5))))
            ax.set_title(f"image {store.image_ids[img_i]}\nsame pos. {s[row, col]:+.2f} (dashed), "
                         f"max {s[mr, mc]:+.2f} (green)", fontsize=9)
    sm = ScalarMappable(norm=Normalize(-1, 1), cmap=SIM_CMAP)
    cb = fig.colorbar(sm, ax=list(axes), shrink=0.85, fraction=0.03, pad=0.01)
    cb.set_label("cosine similarity to the reference token\n(overlay on the greyscale image: orange with "
                 "alpha = sim\nfor sim > 0, blue with alpha = -sim for sim < 0)", fontsize=8)
    cb.ax.tick_params(labelsize=8)
    main = (f"{heading}: cosine similarity to token (row {row}, col {col}) of image {store.image_ids[ref_image]}"
            f"\nlayer {layer} ({h}x{w} tokens, {c} channels). {subtitle}")
    fig.suptitle(_wrap(_title(main, store, note), fig), fontsize=10)
    png, svg = _save(fig, out_stem)
    return FigureOutput(png, svg, layer, shown, note,
                        {"similarity": sims, "ref_token": (row, col), "ref_image": ref_image})


def plot_token_similarity(store: ReprStore, dataset_dir, out_stem, layer: str = DEFAULT_TOKEN_LAYER,
                          ref_image: int = 0, ref_token: tuple[int, int] | None = None,
                          images: Sequence[int] = (0, 1, 2, 3)) -> FigureOutput:
    """Positional-embedding view: similarity of token ``ref_token`` = (row, col) of ``ref_image`` to all tokens.

    The reference image is always shown first. ``ref_token=None`` scales the explorer's preset (row 2, col 13 on
    the 16x16 grid) to the layer's grid. In the other images the reference position is boxed dashed and the most
    similar token green (as in the explorer).
    """
    layer, note = resolve_layer(store, layer)
    _, _, h, w = store.shape(layer)
    if ref_token is None:
        ref_token = (min(h - 1, round(2 * h / 16)), min(w - 1, round(13 * w / 16)))
    return _similarity_figure(store, dataset_dir, out_stem, layer, note, ref_image, ref_token, images,
                              "Positional embedding",
                              "If position is encoded, the same position lights up in every image, "
                              "whatever its content.")


def plot_corner_similarity(store: ReprStore, dataset_dir, out_stem, layer: str = DEFAULT_CORNER_LAYER,
                           ref_image: int = 0, ref_token: tuple[int, int] | None = None,
                           images: Sequence[int] = (0, 1, 2, 3)) -> FigureOutput:
    """Corner-artifact view: similarity of a corner token (default top-right, (0, n-1)) on a low-res layer.

    A missing ``layer`` falls back to a store layer of its resolution (mid_block preferred), or, for a name of
    unknown resolution, to the lowest-resolution layer of the store.
    """
    if layer not in store.layers and sd_downsampling(layer) is None and store.layers:
        low = min(store.shape(l)[2] for l in store.layers)
        layer, note = resolve_layer(store, layer, spatial=low, prefer_block="mid_block")
    else:
        layer, note = resolve_layer(store, layer, prefer_block="mid_block")
    _, _, h, w = store.shape(layer)
    if ref_token is None:
        ref_token = (0, w - 1)
    return _similarity_figure(store, dataset_dir, out_stem, layer, note, ref_image, ref_token, images,
                              "Corner artifact",
                              "With the corner artifact, the corner tokens of all images light up, "
                              "whatever their content.")


def plot_norm_maps(store: ReprStore, dataset_dir, out_stem, layer: str = REF_LAYER,
                   images: Sequence[int] | None = None, labels=None, threshold: float = 2.0,
                   n_images: int = 4, label_name: str = "hand labels") -> FigureOutput:
    """Per-image token-norm maps (L2 over channels / image max) with anomaly patches boxed.

    ``labels`` (K, 3) rows ``(image, x=col, y=row)`` on the reference grid (the labelled layer
    ``up_blocks[1].upsamplers[0]``; see :func:`~diffaudit.analyses.anomalies.reference_grid`) are drawn as hand
    labels (``label_name`` names them), rescaled to the drawn layer like the relative-norm analysis. Without
    labels the automatic detector (:func:`~diffaudit.analyses.anomalies.detect_anomalies` on the drawn layer:
    2x2 blocks whose mean norm exceeds ``threshold`` x the image's median token norm) supplies the boxes.
    ``images=None`` shows the ``n_images - 1`` images with the most boxes plus the first image without any.
    """
    layer, note = resolve_layer(store, layer)
    _, c, h, w = store.shape(layer)
    if labels is not None:
        h_ref = reference_grid(store)
        labels = validate_labels(labels, n_images=store.n_images, grid=h_ref, source="labels")
        boxes = anomaly_boxes(labels, h_ref, h)
        source = f"{label_name} ({len(labels)} 2x2 patches on the {h_ref}x{h_ref} label grid)"
        color = LABEL_COLOR
    else:
        if h % 2 or w % 2:
            raise UserError(f"automatic detection needs an even-sized map, {layer} is {h}x{w}; choose another anomalies.ref_layer")
        det = detect_anomalies(store, layer, threshold=threshold)
        boxes = anomaly_boxes(det, h, h)
        source = (f"automatic detector (2x2 block mean norm > {threshold:g} x image median norm): "
                  f"{len(det)} patch{'es' if len(det) != 1 else ''} in {len(boxes)} of {store.n_images} images")
        color = DETECT_COLOR
    if images is None:
        ranked = sorted(boxes, key=lambda i: (-len(boxes[i]), i))
        pick = ranked[:max(1, n_images - 1)]
        clean = [i for i in range(store.n_images) if i not in boxes]
        if clean:
            pick.append(clean[0])
        images = pick
    shown = _check_images(store, images)
    reps = _load_reps(store, layer, shown)
    norms = np.stack([norm_map(r) for r in reps])
    pictures = _load_pictures(store, dataset_dir, shown)

    fig = _new_figure(len(shown), 2, panel=2.9, extra_w=1.0, extra_h=1.1)
    axes = fig.subplots(2, len(shown), squeeze=False)
    im = None
    for j, img_i in enumerate(shown):
        top, bottom = axes[0, j], axes[1, j]
        _show_image(top, pictures[j], h, w)
        im = bottom.imshow(norms[j], extent=(0, w, h, 0), cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        bottom.set_xticks([])
        bottom.set_yticks([])
        for ax in (top, bottom):
            for r0, c0, k in boxes.get(img_i, []):
                _box(ax, r0, c0, k, color=color, lw=1.6, halo=ax is top)
        nb = len(boxes.get(img_i, []))
        top.set_title(f"image {store.image_ids[img_i]}: {nb} patch{'es' if nb != 1 else ''}", fontsize=9)
    axes[0, 0].set_ylabel("image", fontsize=9)
    axes[1, 0].set_ylabel("token norm / image max", fontsize=9)
    # spanning both rows keeps the image and norm panels aligned; shrunk and anchored next to the norm maps
    cb = fig.colorbar(im, ax=list(axes.ravel()), shrink=0.45, fraction=0.03, pad=0.01, anchor=(0.0, 0.05))
    cb.set_label("||token||_2 / max over the image", fontsize=8)
    cb.ax.tick_params(labelsize=8)
    fig.legend(handles=[Patch(facecolor="none", edgecolor=color, linewidth=1.6, label=source)],
               loc="outside lower center", fontsize=8, frameon=False)
    marks = (f"boxes = 2x2 anomaly patches from {label_name}" if labels is not None else
             f"boxes = automatically detected 2x2 patches (mean norm > {threshold:g} x image median)")
    main = f"High-norm anomalies: token L2 norm at {layer} ({h}x{w} tokens, {c} channels)\n{marks}"
    fig.suptitle(_wrap(_title(main, store, note), fig), fontsize=10)
    png, svg = _save(fig, out_stem)
    return FigureOutput(png, svg, layer, shown, note,
                        {"norms": norms, "boxes": {i: boxes.get(i, []) for i in shown}, "all_boxes": boxes,
                         "source": "labels" if labels is not None else "detector"})


def plot_pca_rgb(store: ReprStore, dataset_dir, out_stem, layer: str = DEFAULT_PCA_LAYER,
                 images: Sequence[int] = (0, 1, 2, 3)) -> FigureOutput:
    """First three principal components of the layer's tokens (fit on the shown images) as RGB, under each image."""
    layer, note = resolve_layer(store, layer)
    _, c, h, w = store.shape(layer)
    shown = _check_images(store, images)
    reps = _load_reps(store, layer, shown)
    rgb, ratio = pca_rgb(reps)
    pictures = _load_pictures(store, dataset_dir, shown)

    fig = _new_figure(len(shown), 2, panel=2.9, extra_w=0.3, extra_h=1.0)
    axes = fig.subplots(2, len(shown), squeeze=False)
    for j, img_i in enumerate(shown):
        _show_image(axes[0, j], pictures[j], h, w)
        axes[0, j].set_title(f"image {store.image_ids[img_i]}", fontsize=9)
        axes[1, j].imshow(rgb[j], extent=(0, w, h, 0), interpolation="nearest")
        axes[1, j].set_xticks([])
        axes[1, j].set_yticks([])
    axes[0, 0].set_ylabel("image", fontsize=9)
    axes[1, 0].set_ylabel("PCA (R, G, B) = (PC1, PC2, PC3)", fontsize=9)
    main = (f"PCA of the tokens of {layer} ({h}x{w} tokens, {c} channels), fit on the {len(shown)} shown images"
            f"\nPC1-3 explain {ratio[0]:.0%}, {ratio[1]:.0%}, {ratio[2]:.0%} of the variance; each scaled to "
            "[0, 1] between its 1st and 99th percentile")
    fig.suptitle(_wrap(_title(main, store, note), fig), fontsize=10)
    png, svg = _save(fig, out_stem)
    return FigureOutput(png, svg, layer, shown, note, {"rgb": rgb, "explained_variance_ratio": ratio})


def render_all(store: ReprStore, dataset_dir, out_dir, prefix: str = "qualitative_",
               labels=None) -> dict[str, FigureOutput]:
    """All four figures with their defaults into ``out_dir`` (``<prefix>{token_similarity,corner,norms,pca}``)."""
    out = Path(out_dir)
    n = min(4, store.n_images)
    imgs = tuple(range(n))
    return {
        "token_similarity": plot_token_similarity(store, dataset_dir, out / f"{prefix}token_similarity",
                                                  images=imgs),
        "corner": plot_corner_similarity(store, dataset_dir, out / f"{prefix}corner", images=imgs),
        "norms": plot_norm_maps(store, dataset_dir, out / f"{prefix}norms", labels=labels),
        "pca": plot_pca_rgb(store, dataset_dir, out / f"{prefix}pca", images=imgs),
    }
