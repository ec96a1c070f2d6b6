"""Short labels of layer names for the figures' layer axis: block (in, dn0, mid, up1, out, tb3, stb0), type (conv,
res, attn, down, up, block, embed) and the block runs that the axis separates (:func:`block_spans`).

Used by :mod:`diffaudit.figures.style` (the layer axis under the panels) and :mod:`diffaudit.figures.cross_model`.
"""
from __future__ import annotations

from collections.abc import Sequence

from ..layers import parse_segment

# ---------------------------------------------------------------------------------------------
# Layer names -> type and block labels
# ---------------------------------------------------------------------------------------------

_TYPE_OF_LIST = {"resnets": "res", "attentions": "attn", "downsamplers": "down", "upsamplers": "up"}
#: The patch embeddings of diffusion transformers (SD3 ``pos_embed``, FLUX ``x_embedder``): their first layer.
PATCH_EMBEDDINGS = ("pos_embed", "x_embedder", "patch_embed")
#: DiT block lists -> (per-block label prefix, label of a run of them on the layer axis): SD3's MMDiT blocks and
#: FLUX's double-stream blocks are "joint" (text and image streams), FLUX's single-stream blocks "single".
DIT_BLOCKS = {"transformer_blocks": ("tb", "joint"), "single_transformer_blocks": ("stb", "single")}


def layer_segments(name: str) -> list[tuple[str, list[int]]]:
    """``(attribute, indices)`` per dotted part of a layer name, by :func:`diffaudit.layers.parse_segment` (the one
    parser of layer names); a malformed part is kept whole with no indices."""
    parts = str(name).strip().split(".")
    return [(seg[0], list(seg[1])) if seg else (raw, []) for seg, raw in zip(map(parse_segment, parts), parts)]


def layer_block(name: str) -> str:
    """Block label of a layer: in, dn0..dn3, mid, up0..up3, out, tb{i}, stb{i} (else the name's first attribute).

    ``conv_in`` -> in; ``down_blocks[i]...`` -> dn{i}; ``mid_block...`` -> mid; ``up_blocks[i]...`` -> up{i};
    ``conv_out``, ``conv_norm_out``, ``conv_act`` -> out; on diffusion transformers the patch embedding
    (``pos_embed`` of SD3, ``x_embedder`` of FLUX) -> in, ``transformer_blocks[i]...`` -> tb{i},
    ``single_transformer_blocks[i]...`` -> stb{i}; anything else (e.g. ``time_embedding.linear_1``) -> its first
    attribute name.
    """
    segs = layer_segments(name)
    head, idx = segs[0]
    if head == "conv_in" or (head in PATCH_EMBEDDINGS and len(segs) == 1):
        return "in"
    if head in ("conv_out", "conv_norm_out", "conv_act"):
        return "out"
    if head == "mid_block":
        return "mid"
    if head in ("down_blocks", "up_blocks") and idx:
        return f"{'dn' if head == 'down_blocks' else 'up'}{idx[0]}"
    if head in DIT_BLOCKS and idx:
        return f"{DIT_BLOCKS[head][0]}{idx[0]}"
    return head


def layer_type(name: str) -> str:
    """Type label of a layer: conv, res, attn, down, up (else a short form of the deepest attribute).

    The first ``resnets``/``attentions``/``downsamplers``/``upsamplers`` segment decides (so a sub-module such as
    ``up_blocks[1].attentions[0].proj_out`` is still ``attn``); ``conv_in``/``conv_out`` are ``conv``; a whole
    block (``down_blocks[1]``, ``mid_block``, a DiT's ``transformer_blocks[i]`` or ``single_transformer_blocks[i]``)
    is ``block``; a DiT's patch embedding (``pos_embed``, ``x_embedder``) is ``embed``.
    """
    segs = layer_segments(name)
    for attr, _ in segs[1:]:
        if attr in _TYPE_OF_LIST:
            return _TYPE_OF_LIST[attr]
    head, idx = segs[0]
    if head.startswith("conv"):
        return "conv"
    if len(segs) == 1 and head in PATCH_EMBEDDINGS:
        return "embed"
    if len(segs) == 1 and (head == "mid_block" or (head in ("down_blocks", "up_blocks", *DIT_BLOCKS) and idx)):
        return "block"
    last = segs[-1][0]
    return last if len(last) <= 6 else last[:5] + "."


def block_group(name: str) -> str:
    """The group a layer belongs to on the layer axis: its :func:`layer_block`, except that a diffusion
    transformer's blocks group by stream (``transformer_blocks[i]`` -> joint, ``single_transformer_blocks[i]`` ->
    single), so a DiT's axis reads in | joint | single rather than one group per block."""
    head, idx = layer_segments(name)[0]
    if head in DIT_BLOCKS and idx:
        return DIT_BLOCKS[head][1]
    return layer_block(name)


def layer_label(name: str) -> str:
    """The per-layer tick label: :func:`layer_type`, but a whole DiT block is named by its block (tb3, stb0)."""
    t = layer_type(name)
    if t == "block" and layer_segments(name)[0][0] in DIT_BLOCKS:
        return layer_block(name)
    return t


def block_boundaries(names: Sequence[str]) -> list[int]:
    """Positions i in ``names`` where the block (:func:`block_group`) changes from ``names[i-1]`` to
    ``names[i]``."""
    blocks = [block_group(n) for n in names]
    return [i for i in range(1, len(blocks)) if blocks[i] != blocks[i - 1]]


def block_spans(names: Sequence[str]) -> list[tuple[str, int, int]]:
    """Runs of consecutive layers of one block (:func:`block_group`): (block, first position, last position)."""
    cuts = [0, *block_boundaries(names), len(names)]
    return [(block_group(names[a]), a, b - 1) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
