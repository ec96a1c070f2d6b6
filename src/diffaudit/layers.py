"""Layer names: the one parser (:func:`layer_segments`), and resolution to modules without ``eval``.

Layer names are written as in the paper, e.g. ``up_blocks[1].upsamplers[0]``: attribute
access with ``.`` and integer indexing with ``[i]``. They are resolved by walking
``named_modules`` of the backbone, so only real submodules can ever be reached. The paper's layer lists are the
families' (:mod:`diffaudit.families`); this module knows no family.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .errors import DiffauditError

if TYPE_CHECKING:
    import torch

#: Named layer sets that ``params.yaml`` may use instead of an explicit list: ``paper`` is the paper's list on
#: SD-1/2 and its analogue on other layouts (each family's ``paper_layers``, :mod:`diffaudit.families`).
LAYER_SETS: tuple[str, ...] = ("paper",)

_SEGMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)$")
_INDEX = re.compile(r"\[(\d+)\]")


def parse_segment(part: str) -> tuple[str, tuple[int, ...]] | None:
    """One dotted part of a layer name: ``attentions[0]`` -> ``("attentions", (0,))``; ``None`` if malformed."""
    m = _SEGMENT.match(part)
    if not m:
        return None
    return m.group(1), tuple(int(i) for i in _INDEX.findall(m.group(2)))


def layer_segments(name: str) -> list[tuple[str, tuple[int, ...]]] | None:
    """The one parser of layer names: ``up_blocks[1].attentions[0]`` -> ``[("up_blocks", (1,)), ("attentions",
    (0,))]``; ``None`` if any part is malformed."""
    segs = [parse_segment(part) for part in str(name).strip().split(".")]
    return None if any(s is None for s in segs) else segs


class UnknownLayerError(DiffauditError, KeyError):
    """A requested layer name is not a submodule of the model."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def to_module_path(name: str) -> str:
    """``up_blocks[1].upsamplers[0]`` -> ``up_blocks.1.upsamplers.0`` (torch ``named_modules`` key)."""
    name = name.strip()
    if not name:
        raise UnknownLayerError("empty layer name")
    segs = layer_segments(name)
    if segs is None:
        raise UnknownLayerError(
            f"malformed layer name {name!r}: expected dotted attributes with [i] indices, "
            "e.g. 'up_blocks[1].upsamplers[0]'"
        )
    return ".".join(".".join([attr, *map(str, idx)]) for attr, idx in segs)


def from_module_path(path: str) -> str:
    """``up_blocks.1.upsamplers.0`` -> ``up_blocks[1].upsamplers[0]``."""
    out: list[str] = []
    for part in path.split("."):
        if part.isdigit() and out:
            out[-1] += f"[{part}]"
        else:
            out.append(part)
    return ".".join(out)


def hookable_layers(unet: torch.nn.Module) -> list[str]:
    """All submodule names of ``unet`` in paper notation (module registration order)."""
    return [from_module_path(p) for p, _ in unet.named_modules() if p]


def resolve_layers(unet: torch.nn.Module, names: list[str] | tuple[str, ...]) -> dict[str, torch.nn.Module]:
    """Map each layer name to its submodule; unknown names raise one error listing valid ones."""
    modules = dict(unet.named_modules())
    resolved: dict[str, torch.nn.Module] = {}
    unknown: list[str] = []
    for name in names:
        path = to_module_path(name)
        if path in modules and path:
            resolved[name] = modules[path]
        else:
            unknown.append(name)
    if unknown:
        import difflib

        everything = hookable_layers(unet)
        # block-level names and their indexed children (e.g. up_blocks[1].upsamplers[0]) are the useful ones
        main = [n for n in everything if n.count(".") == 0 and not n.endswith("s")
                or (n.count(".") == 1 and n.endswith("]"))]
        hints = {u: difflib.get_close_matches(u, everything, n=1) for u in unknown}
        did_you_mean = "; ".join(f"{u} -> did you mean {h[0]}?" for u, h in hints.items() if h)
        raise UnknownLayerError(
            f"unknown layer(s) {unknown}: not submodules of the U-Net. {did_you_mean + ' ' if did_you_mean else ''}"
            f"Valid names: any submodule path (`diffaudit layers MODEL` lists all {len(everything)}), e.g. "
            f"{', '.join(main)}"
        )
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if list(names).count(n) > 1})
        raise UnknownLayerError(f"duplicate layer name(s) {dup} in the layer list")
    return resolved


def expand_layers(spec: str | list[str], paper: Sequence[str] | None = None) -> list[str]:
    """A config ``layers`` value: a named set (``paper``: the model's ``paper`` list, given by its family, e.g.
    ``family.paper_layers(net)``) or an explicit list of names."""
    if isinstance(spec, str):
        if spec not in LAYER_SETS:
            raise UnknownLayerError(
                f"unknown layer set {spec!r}; use one of {sorted(LAYER_SETS)} or a list of layer names"
            )
        if paper is None:
            raise UnknownLayerError(f"the layer set {spec!r} depends on the model: pass its family's list")
        return list(paper)
    if not spec:
        raise UnknownLayerError("the layer list is empty")
    return [str(s) for s in spec]


def group_name(layer: str) -> str:
    """Zarr group name of a layer: the torch module path (portable characters only)."""
    return to_module_path(layer)
