"""Token-group (corner / border / other) cosine similarity: cropped image vs full image ring removed.

Method (docs/method.md §3.2). For a layer with an n x n map (token size t = image_size // n) there are two
representation stores: ``full`` (n x n maps) and ``crop<t>`` (the image cropped by one token ring, m x m maps,
m = n - 2). Both are compared on the m-grid:

* ``full_image_ring_removed`` = ``full[..., 1:-1, 1:-1]``; ``cropped_image`` = the crop map.
* groups on the m-grid: corner = the 4 corner tokens, border = the 4 edge strips without corners,
  other = the interior ``[1:-1, 1:-1]``.
* for each map set and group pair (i, j), pooled over all images (a ratio of sums)::

      R[i, j] = (sum over ordered pairs (a in i, b in j) of cos(u_a, u_b) - S_self) / (count - S_self)

  where S_self (only for i == j) removes the self pairs a == b.
* plotted: ``corner_ratio = R_crop[0, 0] / R_full_ring[0, 0]``, likewise border (1) and other (2).

Count modes
-----------
``count_quirk=True`` ("paper" mode) reproduces the authors' code exactly: ``count`` and ``S_self`` come from a ones
tensor of the FULL size n (``torch.ones((n, n, n, n))``) indexed with the same group slices (``0``, ``-1``,
``slice(1, -1)``) that are applied to the m-sized maps. With K_g(s) the number of tokens that the group slices
select on an s x s grid, K_corner = 4, K_border = 4(s - 2), K_other = (s - 2)^2, this gives per layer (N images)::

      count[i, j] = K_i(n) * K_j(n) * N,     S_self[i] = K_i(n) * N      (self-cosine taken as 1)

while the maps only hold K_i(m) tokens per group. Corner is unaffected; border uses 4(n-2) instead of 4(n-4),
other (n-2)^2 instead of (n-4)^2. Because the per-image pair sum includes the true diagonal (K_i(m) ones), the
paper value is R_q = (off + K(m)N - K(n)N) / ((K(n)^2 - K(n)) N), i.e. for border (off - 8N)/(...).

``count_quirk=False`` ("corrected" mode) uses the true m-grid counts, count = K_i(m) K_j(m) N, and excludes the
self pairs by explicit diagonal masking: S_self[i] is the actual sum of self-cosines (sum over tokens of |u_a|^2),
and the denominator is (K_i(m)^2 - K_i(m)) N. For tokens with non-zero norm |u_a|^2 = 1 and this equals
subtracting K_i(m) N; see "zero-norm tokens" below.

Efficient algorithm
-------------------
Never form token x token maps. With u_a the L2-normalised tokens of one image, the sum of cosines over all ordered
pairs (a in A, b in B) is ``(sum_{a in A} u_a) . (sum_{b in B} u_b)``. Per image and map set only three group-sum
vectors s_g (C,) are needed; per layer we accumulate, in float64 over streamed image chunks,
``G[i, j] = sum_images s_i . s_j`` (3 x 3), the self-cosine sums ``D[i] = sum_images sum_{a in i} |u_a|^2`` and N.
Time O(N * tokens * C), memory O(chunk_images * C * n^2), independent of N.

Uncertainty (docs/method.md §3.7): ``<group>_ratio_ci_low`` / ``_ci_high`` for corner and border are percentile
bootstrap intervals over images. Every R_ii is a ratio of sums over images, so the accumulator also keeps each
image's diagonal pair sum and self-cosine sum (a few numbers per image, the memory stays one chunk of maps); a
resample draws images with replacement, the same images for both map sets, and recomputes both R_ii from the
resampled numerator and denominator sums and then their ratio.

Zero-norm tokens: normalisation is ``u = x / max(|x|, eps)`` with eps = 1e-12 (``torch.nn.functional.normalize``;
``torch.cosine_similarity`` likewise gives 0 for a zero vector), so a zero token has u = 0 and *all* its cosines,
including its self-cosine, are 0. The pair sums (and the brute-force maps) therefore contain a 0 on the diagonal
for such a token. Paper mode still subtracts the constant K(n) N (exactly what the authors' code does); corrected
mode subtracts the actual diagonal sum D, so the result is exactly the mean of the off-diagonal cosines, a zero
token counting as cosine 0 with every other token.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from ..errors import MissingInputError, UserError
from ..layout import crop_variant
from ..tables import SIMILARITY_CI_COLUMNS, SIMILARITY_COLUMNS, SIMILARITY_TABLE_COLUMNS
from .bootstrap import Bootstrap

GROUPS: tuple[str, ...] = ("corner", "border", "other")
MAP_SETS: tuple[str, ...] = ("cropped_image", "full_image_ring_removed")
EPS = 1e-12  # as torch.nn.functional.normalize

# COLUMNS (the published table's), CI_COLUMNS (appended by token_group_similarity: the bootstrap intervals of the
# plotted ratios) and TABLE_COLUMNS are the schemas of diffaudit.tables.
COLUMNS = SIMILARITY_COLUMNS
CI_COLUMNS = SIMILARITY_CI_COLUMNS
TABLE_COLUMNS = SIMILARITY_TABLE_COLUMNS
#: The groups whose ratio gets an interval.
CI_GROUPS: tuple[str, ...] = ("corner", "border")

MODES = {"paper": True, "corrected": False}

# The group index sets as (row, col) index pairs, exactly as the authors apply them to a grid axis. The same
# slices mean different token counts on an n-axis and on an m-axis; that is the count quirk.
_MID = slice(1, -1)
GROUP_INDEX: dict[str, tuple[tuple[object, object], ...]] = {
    "corner": ((0, 0), (0, -1), (-1, 0), (-1, -1)),
    "border": ((0, _MID), (-1, _MID), (_MID, 0), (_MID, -1)),
    "other": ((_MID, _MID),),
}


# ---------------------------------------------------------------------------------------------
# Counts
# ---------------------------------------------------------------------------------------------

def group_sizes(grid: int) -> np.ndarray:
    """Tokens the group slices select on a ``grid x grid`` axis pair: (4, 4(grid-2), (grid-2)^2)."""
    if grid < 2:
        raise ValueError(f"grid size must be >= 2, got {grid}")
    return np.array([4, 4 * (grid - 2), (grid - 2) ** 2], dtype=np.float64)


def pair_counts(m: int, n_images: int, count_quirk: bool, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(count (3,3), self_count (3,))`` for maps on the m-grid, pooled over ``n_images`` images.

    ``count_quirk=True``: the authors' formula, built on the full grid size ``n`` (default m + 2):
    ``count = outer(K(n), K(n)) * N``, ``self_count = K(n) * N``. ``count_quirk=False``: the same on ``m``.
    """
    size = (m + 2 if n is None else int(n)) if count_quirk else m
    k = group_sizes(size)
    return np.outer(k, k) * n_images, k * n_images


def similarity_from_sums(pair_sums: np.ndarray, self_sums: np.ndarray, n_images: int, m: int,
                         count_quirk: bool, n: int | None = None) -> np.ndarray:
    """The 3x3 matrix R from pooled pair sums ``G`` (3,3) and self-cosine sums ``D`` (3,).

    Paper mode subtracts the quirk's constant self count K(n) N (ignores ``self_sums``); corrected mode subtracts
    the actual self-cosine sums D and divides by the true number of off-diagonal pairs.
    """
    g = np.asarray(pair_sums, dtype=np.float64)
    count, self_count = pair_counts(m, n_images, count_quirk, n)
    subtract = self_count if count_quirk else np.asarray(self_sums, dtype=np.float64)
    num = g - np.diag(subtract)
    den = count - np.diag(self_count)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)  # no pairs -> undefined


def corrected_from_paper(table: pd.DataFrame) -> pd.DataFrame:
    """A paper-mode similarity table (e.g. the authors' published one) in corrected mode, from its raw values.

    Per group and map set, R_paper = (P - K(n)N) / ((K(n)^2 - K(n))N) gives the pooled pair sum P (diagonal
    included), and R_corrected = (P - K(m)N) / ((K(m)^2 - K(m))N): exact when every token has a non-zero norm
    (self-cosine 1; see "zero-norm tokens"). The corner group is unchanged (K = 4 on both grids); the ratios are
    recomputed from the converted values; bootstrap interval columns, if any, are dropped (they cannot be
    converted)."""
    out = table.drop(columns=[c for c in CI_COLUMNS if c in table.columns]).copy()
    for row in out.index:
        n = int(out.at[row, "spatial"])
        m = n - 2
        count_q, self_q = pair_counts(m, 1, count_quirk=True)
        count_c, self_c = pair_counts(m, 1, count_quirk=False)
        for gi, g in enumerate(GROUPS):
            for ms in MAP_SETS:
                col = f"{g}_sim_{ms}"
                pair_sum = float(out.at[row, col]) * (count_q[gi, gi] - self_q[gi]) + self_q[gi]
                den = count_c[gi, gi] - self_c[gi]
                out.at[row, col] = (pair_sum - self_c[gi]) / den if den > 0 else np.nan
            with np.errstate(divide="ignore", invalid="ignore"):
                out.at[row, f"{g}_ratio"] = (np.float64(out.at[row, f"{g}_sim_cropped_image"])
                                             / np.float64(out.at[row, f"{g}_sim_full_image_ring_removed"]))
    return out


# ---------------------------------------------------------------------------------------------
# Group sums (the efficient algorithm)
# ---------------------------------------------------------------------------------------------

def group_masks(m: int) -> np.ndarray:
    """(3, m*m) float64 0/1 masks of corner, border, other on the m-grid."""
    if m < 3:
        raise ValueError(f"the m-grid must be at least 3x3 to hold corner/border/other groups, got {m}")
    masks = np.zeros((3, m, m))
    for gi, g in enumerate(GROUPS):
        for r, c in GROUP_INDEX[g]:
            masks[gi][r, c] = 1.0
    return masks.reshape(3, m * m)


def _grid_masks(s: int, ring: bool) -> np.ndarray:
    """(3, s*s) float32 group masks on an s x s map; ``ring=True`` places the groups of the inner
    (s-2) x (s-2) grid (the ring tokens get weight 0), so ``x[..., 1:-1, 1:-1]`` never has to be copied."""
    if not ring:
        return group_masks(s).astype(np.float32)
    masks = np.zeros((3, s, s), dtype=np.float32)
    masks[:, 1:-1, 1:-1] = group_masks(s - 2).reshape(3, s - 2, s - 2)
    return masks.reshape(3, s * s)


def group_sums(x: np.ndarray, ring: bool = False) -> dict:
    """Per-image group sums of L2-normalised tokens.

    ``x``: (b, C, s, s) representations of one map set (any float dtype; stores hold float16). The groups live
    on the m-grid: m = s, or m = s - 2 with ``ring=True``, which means the map set ``x[..., 1:-1, 1:-1]`` (full
    image, ring removed) without copying the slice. Returns a dict with
    ``corner``, ``border``, ``other``: (b, C) float64 sums of unit tokens over the group;
    ``self``: (b, 3) float64 sums of self-cosines |u_a|^2 per group (= group size unless a token is zero);
    ``sizes``: (3,) token counts on the m-grid; ``m``: grid size.
    The per-image pair sum of group pair (i, j) is ``sum_c s_i[c] * s_j[c]``.

    One image at a time, in buffers allocated once and small enough to stay in the CPU cache: cast to float32,
    squared norms as a sum over channels, then the three group sums as one (3, T) x (T, C) matrix product with
    the weights ``mask / |x_a|`` (float32 accumulation, relative error ~1e-7, far below the float16 storage
    precision). The costly parts of a naive version were the fresh chunk-sized float32 copies (page faults on
    every chunk) and ``vector_norm`` over the strided channel axis, both avoided here.
    """
    import torch

    x = np.asarray(x)
    if x.ndim != 4 or x.shape[2] != x.shape[3]:
        raise ValueError(f"expected (b, C, s, s), got shape {x.shape}")
    b, c, s, _ = x.shape
    m = s - 2 if ring else s
    masks = torch.from_numpy(_grid_masks(s, ring))  # (3, T), validates m >= 3
    t = s * s
    if x.dtype not in (np.float16, np.float32, np.float64) or not x.dtype.isnative:
        x = x.astype(np.float32)
    if min(x.strides) < 0:
        x = np.ascontiguousarray(x)
    with warnings.catch_warnings():  # a read-only array is fine: it is only read
        warnings.simplefilter("ignore", UserWarning)
        xt = torch.from_numpy(x)  # a view, also of strided slices; cast per image below
    sums = torch.empty((b, 3, c), dtype=torch.float32)
    unit = torch.empty((b, t), dtype=torch.float32)  # |x_a| / max(|x_a|, eps): 1, or < 1 for a (near) zero token
    buf = torch.empty((c, s, s), dtype=torch.float32)
    flat = buf.view(c, t)
    sq = torch.empty((c, t), dtype=torch.float32)
    norm = torch.empty(t, dtype=torch.float32)
    inv = torch.empty(t, dtype=torch.float32)
    w = torch.empty((3, t), dtype=torch.float32)
    with torch.no_grad():
        for i in range(b):
            buf.copy_(xt[i])
            torch.sum(torch.mul(flat, flat, out=sq), dim=0, out=norm)
            norm.sqrt_()
            torch.reciprocal(torch.clamp_min(norm, EPS, out=inv), out=inv)
            torch.mul(norm, inv, out=unit[i])
            torch.mm(torch.mul(masks, inv, out=w), flat.t(), out=sums[i])  # (3, C): sum of x_a / |x_a| per group
        selfs = (unit.double() ** 2 @ masks.double().t()).numpy()  # (b, 3) sums of |u_a|^2
    sums = sums.double().numpy()
    res = {g: sums[:, gi] for gi, g in enumerate(GROUPS)}
    res.update({"self": selfs, "sizes": group_sizes(m), "m": m})
    return res


class GroupSimilarityAccumulator:
    """Streaming float64 accumulator of pooled group pair sums for one map set.

    ``ring=True``: the map set is the chunk's ``x[..., 1:-1, 1:-1]`` (full image, ring removed).
    Besides the pooled sums it keeps, per image, the diagonal pair sums ``s_i . s_i`` and the self-cosine sums
    (3 + 3 numbers an image), from which :meth:`per_image_diagonal` splits each diagonal R_ii into per-image
    numerator and denominator terms for the bootstrap over images."""

    def __init__(self, m: int | None = None, ring: bool = False):
        self.m = m
        self.ring = ring
        self.pair_sums = np.zeros((3, 3))
        self.self_sums = np.zeros(3)
        self.n_images = 0
        self._image_diag: list[np.ndarray] = []
        self._image_self: list[np.ndarray] = []

    def update(self, x: np.ndarray) -> None:
        gs = group_sums(x, ring=self.ring)
        if self.m is None:
            self.m = gs["m"]
        elif gs["m"] != self.m:
            raise ValueError(f"grid size changed from {self.m} to {gs['m']}")
        s = np.stack([gs[g] for g in GROUPS], axis=1)  # (b, 3, C)
        self.pair_sums += np.einsum("bic,bjc->ij", s, s)
        self.self_sums += gs["self"].sum(axis=0)
        self.n_images += s.shape[0]
        self._image_diag.append(np.einsum("bic,bic->bi", s, s))
        self._image_self.append(np.asarray(gs["self"], dtype=np.float64))

    def per_image_diagonal(self, count_quirk: bool = True, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(num, den)``, both (N, 3): per image the terms whose sums over images give the diagonal of
        :meth:`matrix`, ``R_ii = sum num[:, i] / sum den[:, i]`` (NaN where the denominator is not positive).

        ``num = s_i . s_i - subtract_i`` with ``subtract_i`` = K_i (paper: the quirk's constant, K on the n-grid)
        or the image's self-cosine sum (corrected); ``den = K_i^2 - K_i`` on the same grid as the counts."""
        if self.n_images == 0:
            raise ValueError("no images accumulated")
        count, self_count = pair_counts(self.m, 1, count_quirk, n)
        diag = np.concatenate(self._image_diag)
        subtract = self_count[None, :] if count_quirk else np.concatenate(self._image_self)
        den = np.broadcast_to(np.diag(count) - self_count, diag.shape)
        return diag - subtract, den

    def matrix(self, count_quirk: bool = True, n: int | None = None) -> np.ndarray:
        if self.n_images == 0:
            raise ValueError("no images accumulated")
        return similarity_from_sums(self.pair_sums, self.self_sums, self.n_images, self.m, count_quirk, n)


# ---------------------------------------------------------------------------------------------
# Brute force (the authors' algorithm; for tests and benchmarks)
# ---------------------------------------------------------------------------------------------

def cosine_maps(x, torch_threads: int | None = None):
    """(N, C, s, s) representations -> (N, s, s, s, s) float32 torch cosine maps, one image at a time, stacked."""
    import torch
    import torch.nn.functional as F

    if torch_threads:
        torch.set_num_threads(torch_threads)
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    nimg, c, s, _ = x.shape
    maps = []
    for i in range(nimg):
        u = F.normalize(x[i].reshape(c, s * s), dim=0, eps=EPS)
        maps.append(torch.einsum("ca,cb->ab", u, u).reshape(s, s, s, s))
    return torch.stack(maps)


def _group_pair_sum(t, gi: str, gj: str):
    """Sum of ``t[..., A, B]`` over the group index sets on the last four axes (and any leading image axis)."""
    import torch

    total = 0.0
    for ra, ca in GROUP_INDEX[gi]:
        for rb, cb in GROUP_INDEX[gj]:
            total = total + t[..., ra, ca, rb, cb].sum(dtype=torch.float64)
    return total


def brute_force_matrix_from_maps(sim, count_quirk: bool = True, n: int | None = None) -> np.ndarray:
    """The authors' group reduction on materialised (N, m, m, m, m) cosine maps (torch tensor)."""
    import torch

    nimg, m = sim.shape[0], sim.shape[1]
    size = (m + 2 if n is None else int(n)) if count_quirk else m
    ones = torch.ones((size,) * 4, dtype=torch.float64)
    eye = torch.eye(size * size, dtype=torch.float64).reshape((size,) * 4)
    r = np.zeros((3, 3))
    for i, gi in enumerate(GROUPS):
        for j, gj in enumerate(GROUPS):
            total = float(_group_pair_sum(sim, gi, gj))
            count = float(_group_pair_sum(ones, gi, gj)) * nimg
            self_count = float(_group_pair_sum(eye, gi, gj)) * nimg if i == j else 0.0
            if i == j and not count_quirk:  # explicit diagonal masking: subtract the actual self-cosines
                diag = torch.diagonal(sim.reshape(nimg, m * m, m * m), dim1=1, dim2=2).reshape(nimg, m, m)
                subtract = float(sum(diag[:, a, b].sum(dtype=torch.float64) for a, b in GROUP_INDEX[gi]))
            else:
                subtract = self_count
            r[i, j] = (total - subtract) / (count - self_count) if count != self_count else np.nan
    return r


def brute_force_group_similarity(x_maps, count_quirk: bool = True, n: int | None = None) -> np.ndarray:
    """Brute-force 3x3 R of one map set: (N, C, m, m) representations on the m-grid.

    Materialises the full (N, m, m, m, m) float32 cosine maps via einsum (as the authors did), then applies the
    group slices with the authors' count formula (``count_quirk=True``: ones/eye tensors of size n = m + 2 unless
    ``n`` is given) or the corrected one (m-sized counts, explicit diagonal masking).
    """
    return brute_force_matrix_from_maps(cosine_maps(x_maps), count_quirk, n)


def brute_force_token_group_similarity(full_maps, crop_maps, count_quirk: bool = True) -> dict[str, np.ndarray]:
    """The authors' whole pipeline in memory: (N, n^4) full cosine maps, padded copy, (N, m^4) crop maps."""
    import torch.nn.functional as F

    sim_full = cosine_maps(full_maps)
    n = sim_full.shape[1]
    sim_full_ring = F.pad(sim_full, [-1] * 8)
    del sim_full
    sim_crop = cosine_maps(crop_maps)
    if sim_crop.shape[1] != n - 2:
        raise ValueError(f"crop maps are {sim_crop.shape[1]}x{sim_crop.shape[1]}, expected {n - 2}")
    return {
        "cropped_image": brute_force_matrix_from_maps(sim_crop, count_quirk, n),
        "full_image_ring_removed": brute_force_matrix_from_maps(sim_full_ring, count_quirk, n),
    }


# ---------------------------------------------------------------------------------------------
# Store-level API
# ---------------------------------------------------------------------------------------------

def _count_quirk(mode: str) -> bool:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    return MODES[mode]


def _resolve_crop(crops, token_size: int, layer: str, n: int):
    variant = crop_variant(token_size)
    where = f"layer {layer!r} ({n}x{n}, token size {token_size})"
    if callable(crops) and not isinstance(crops, Mapping):
        try:
            store = crops(token_size)
        except (FileNotFoundError, KeyError) as e:
            raise MissingInputError(f"crop store variant {variant!r} needed by {where} is missing ({e}); set extraction.crops: true and re-extract") from e
        if store is None:
            raise MissingInputError(f"crop store variant {variant!r} needed by {where} is missing; set extraction.crops: true and re-extract")
        return store
    if token_size not in crops:
        raise KeyError(f"no crop store variant {variant!r} for {where}; available: "
                       f"{[crop_variant(t) for t in sorted(crops)]}")
    return crops[token_size]


def _accumulate(store, layer: str, chunk_images: int, ring: bool) -> GroupSimilarityAccumulator:
    acc = GroupSimilarityAccumulator(ring=ring)
    # dtype=None keeps the stored dtype (float16): group_sums casts one image at a time into a cached float32
    # buffer, which saves a whole-chunk float32 copy in fresh memory (page faults on every chunk)
    for _, x in store.iter_chunks(layer, chunk_images=chunk_images, dtype=None):
        acc.update(x)
        del x  # else the previous chunk stays alive while the next one is read (two chunks in memory)
    return acc


def group_similarity_matrix(full, crop, layer: str, count_quirk: bool = True,
                            chunk_images: int = 20) -> dict[str, np.ndarray]:
    """Both 3x3 R matrices of one layer, streamed from the stores: ``{map set name: R (3,3)}``.

    ``full`` has the n x n maps; ``crop`` the m x m maps (m = n - 2) of the cropped images. Rows and columns are
    ordered corner, border, other.
    """
    acc_crop, acc_full, n = _layer_accumulators(full, crop, layer, chunk_images)
    return {
        "cropped_image": acc_crop.matrix(count_quirk, n),
        "full_image_ring_removed": acc_full.matrix(count_quirk, n),
    }


def _layer_accumulators(full, crop, layer: str, chunk_images: int
                        ) -> tuple[GroupSimilarityAccumulator, GroupSimilarityAccumulator, int]:
    """(cropped image, full image ring removed) accumulators of one layer and its full side n, after checking
    that the stores match."""
    if layer not in full.layers:
        raise KeyError(f"layer {layer!r} not in the full store {full.path}")
    nimg, c, n, w = full.shape(layer)
    if n != w:
        raise UserError(f"{layer}: non-square map {n}x{w}; the corner analysis needs square maps (remove the layer from `layers`)")
    variant = getattr(crop, "path", "crop store")
    if layer not in crop.layers:
        raise KeyError(f"layer {layer!r} missing from crop store {variant}")
    cn, cc, m, mw = crop.shape(layer)
    if (m, mw) != (n - 2, n - 2) or cc != c:
        raise ValueError(f"{layer}: crop store {variant} has shape {(cn, cc, m, mw)}, expected "
                         f"(*, {c}, {n - 2}, {n - 2}) for a {n}x{n} layer")
    if cn != nimg or not np.array_equal(np.asarray(full.image_ids), np.asarray(crop.image_ids)):
        raise ValueError(f"{layer}: full and crop store {variant} hold different images")
    return _accumulate(crop, layer, chunk_images, ring=False), _accumulate(full, layer, chunk_images, ring=True), n


def ratio_intervals(acc_crop: GroupSimilarityAccumulator, acc_full: GroupSimilarityAccumulator, count_quirk: bool,
                    n: int, bootstrap: Bootstrap) -> dict[str, float]:
    """Bootstrap intervals of ``corner_ratio`` and ``border_ratio`` (:data:`CI_COLUMNS`).

    Both map sets hold the same images, so they are resampled together: in each resample every R_ii is
    recomputed as the ratio of the resampled sums of its per-image numerator and denominator
    (:meth:`GroupSimilarityAccumulator.per_image_diagonal`), and the ratio is R_crop / R_ring of those."""
    if acc_crop.n_images != acc_full.n_images:
        raise ValueError(f"the map sets hold {acc_crop.n_images} and {acc_full.n_images} images")
    num_c, den_c = acc_crop.per_image_diagonal(count_quirk, n)
    num_f, den_f = acc_full.per_image_diagonal(count_quirk, n)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = bootstrap.ratio_resamples(num_c, den_c) / bootstrap.ratio_resamples(num_f, den_f)  # (B, 3)
    lo, hi = bootstrap.interval(ratio)
    out = {}
    for g in CI_GROUPS:
        gi = GROUPS.index(g)
        out[f"{g}_ratio_ci_low"], out[f"{g}_ratio_ci_high"] = float(lo[gi]), float(hi[gi])
    return out


def ratio_columns(r_crop: np.ndarray, r_full_ring: np.ndarray) -> dict[str, float]:
    """The table's value columns from the two 3x3 matrices: per group the ratio of the diagonals and both
    diagonal values (``<group>_ratio``, ``<group>_sim_cropped_image``, ``<group>_sim_full_image_ring_removed``)."""
    out = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for gi, g in enumerate(GROUPS):
            out[f"{g}_ratio"] = float(r_crop[gi, gi] / r_full_ring[gi, gi])
    for gi, g in enumerate(GROUPS):
        out[f"{g}_sim_cropped_image"] = float(r_crop[gi, gi])
        out[f"{g}_sim_full_image_ring_removed"] = float(r_full_ring[gi, gi])
    return out


def token_group_similarity(full, crops: Mapping[int, object] | Callable[[int], object],
                           layers: Sequence[str] | None = None, mode: str = "paper", image_size: int = 512,
                           chunk_images: int = 20, model_name: str = "",
                           bootstrap: Bootstrap | None = None, image_records: list | None = None) -> pd.DataFrame:
    """Per-layer corner/border/other similarity ratios (cropped image / full image ring removed).

    ``full``: the ``full`` variant ReprStore. ``crops``: ``{token_size: ReprStore}`` or a callable
    ``token_size -> ReprStore``; the layer with an n x n map uses the store of token size ``image_size // n``
    (variant ``crop<t>``). ``mode``: ``"paper"`` (the authors' count quirk) or ``"corrected"``.
    Columns :data:`TABLE_COLUMNS`: :data:`COLUMNS`, then the percentile bootstrap intervals over images of the
    corner and border ratios (:func:`ratio_intervals`; ``bootstrap`` defaults to ``Bootstrap()``).
    ``image_records``, a list, collects per layer and map set the per-image terms of the corner group's R_00
    (quantities ``corner_sim_cropped_image`` and ``corner_sim_full_image_ring_removed``; records of
    :func:`diffaudit.analyses.paired.per_image_frame`), the input of the experiments' paired comparison.
    """
    return token_group_similarity_modes(full, crops, (mode,), layers, image_size, chunk_images, model_name,
                                        bootstrap, image_records)[mode]


def token_group_similarity_modes(full, crops: Mapping[int, object] | Callable[[int], object],
                                 modes: Sequence[str] = tuple(MODES), layers: Sequence[str] | None = None,
                                 image_size: int = 512, chunk_images: int = 20, model_name: str = "",
                                 bootstrap: Bootstrap | None = None, image_records: list | None = None
                                 ) -> dict[str, pd.DataFrame]:
    """:func:`token_group_similarity` in several count modes from ONE pass over the stores: ``{mode: table}``;
    ``image_records`` collects the per-image terms (as :func:`token_group_similarity`) in the first mode's counts.

    The modes differ only in the counts applied to the same pooled sums, so the paper-mode table and the
    corrected-mode one (the credibility score's input, free of the count quirk) cost one read of the stores.
    Every mode's intervals use the same resamples (:meth:`Bootstrap.weights` depends only on the seed and N), so
    the paper-mode table is the one :func:`token_group_similarity` writes alone.
    """
    quirks = {mode: _count_quirk(mode) for mode in modes}
    boot = Bootstrap() if bootstrap is None else bootstrap
    layers = list(full.layers if layers is None else layers)
    rows: dict[str, list] = {mode: [] for mode in modes}
    for layer in layers:
        if layer not in full.layers:
            raise KeyError(f"layer {layer!r} not in the full store {full.path} (has {full.layers})")
        attrs = full.layer_attrs(layer)
        _, c, n, _ = full.shape(layer)
        t = image_size // n
        crop = _resolve_crop(crops, t, layer, n)
        if layer not in crop.layers:
            raise KeyError(f"layer {layer!r} missing from crop store variant {crop_variant(t)!r} ({crop.path})")
        acc_crop, acc_full, _ = _layer_accumulators(full, crop, layer, chunk_images)
        layer_index = attrs.get("layer_index", full.layer_indices[full.layers.index(layer)])
        for mode, count_quirk in quirks.items():
            rc, rf = acc_crop.matrix(count_quirk, n), acc_full.matrix(count_quirk, n)
            rows[mode].append({"model": model_name, "layer_index": int(layer_index), "layer": layer,
                               "channels": int(c), "spatial": int(n), **ratio_columns(rc, rf),
                               **ratio_intervals(acc_crop, acc_full, count_quirk, n, boot)})
        if image_records is not None:  # in the first mode's counts (the run's own table)
            for name, acc in (("cropped_image", acc_crop), ("full_image_ring_removed", acc_full)):
                num, den = acc.per_image_diagonal(quirks[modes[0]], n)
                image_records.append({"layer": layer, "spatial": int(n), "quantity": f"corner_sim_{name}",
                                      "images": np.arange(num.shape[0]), "num": num[:, 0], "den": den[:, 0]})
    return {mode: pd.DataFrame(r, columns=list(TABLE_COLUMNS)) for mode, r in rows.items()}
