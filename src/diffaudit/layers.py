"""Layer names: the paper's list, parsing, and resolution to modules without ``eval``.

Layer names are written as in the paper, e.g. ``up_blocks[1].upsamplers[0]``: attribute
access with ``.`` and integer indexing with ``[i]``. They are resolved by walking
``named_modules`` of the U-Net, so only real submodules can ever be reached.
"""
from __future__ import annotations

import re

import torch

from .errors import DiffauditError

# The 45 hooked submodules of the paper (``sd15_all_blocks`` in the authors' code). It omits
# ``up_blocks[0].resnets[2]``. Index in this list = ``layer_index`` in every table.
PAPER_LAYERS: tuple[str, ...] = (
    "conv_in",
    "down_blocks[0].resnets[0]",
    "down_blocks[0].attentions[0]",
    "down_blocks[0].resnets[1]",
    "down_blocks[0].attentions[1]",
    "down_blocks[0].downsamplers[0]",
    "down_blocks[1].resnets[0]",
    "down_blocks[1].attentions[0]",
    "down_blocks[1].resnets[1]",
    "down_blocks[1].attentions[1]",
    "down_blocks[1].downsamplers[0]",
    "down_blocks[2].resnets[0]",
    "down_blocks[2].attentions[0]",
    "down_blocks[2].resnets[1]",
    "down_blocks[2].attentions[1]",
    "down_blocks[2].downsamplers[0]",
    "down_blocks[3].resnets[0]",
    "down_blocks[3].resnets[1]",
    "mid_block.resnets[0]",
    "mid_block.attentions[0]",
    "mid_block.resnets[1]",
    "up_blocks[0].resnets[0]",
    "up_blocks[0].resnets[1]",
    "up_blocks[0].upsamplers[0]",
    "up_blocks[1].resnets[0]",
    "up_blocks[1].attentions[0]",
    "up_blocks[1].resnets[1]",
    "up_blocks[1].attentions[1]",
    "up_blocks[1].resnets[2]",
    "up_blocks[1].attentions[2]",
    "up_blocks[1].upsamplers[0]",
    "up_blocks[2].resnets[0]",
    "up_blocks[2].attentions[0]",
    "up_blocks[2].resnets[1]",
    "up_blocks[2].attentions[1]",
    "up_blocks[2].resnets[2]",
    "up_blocks[2].attentions[2]",
    "up_blocks[2].upsamplers[0]",
    "up_blocks[3].resnets[0]",
    "up_blocks[3].attentions[0]",
    "up_blocks[3].resnets[1]",
    "up_blocks[3].attentions[1]",
    "up_blocks[3].resnets[2]",
    "up_blocks[3].attentions[2]",
    "conv_out",
)

# Named layer sets that ``params.yaml`` may use instead of an explicit list.
LAYER_SETS: dict[str, tuple[str, ...]] = {"paper": PAPER_LAYERS}

_SEGMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\[\d+\])*$")


class UnknownLayerError(DiffauditError, KeyError):
    """A requested layer name is not a submodule of the model."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def to_module_path(name: str) -> str:
    """``up_blocks[1].upsamplers[0]`` -> ``up_blocks.1.upsamplers.0`` (torch ``named_modules`` key)."""
    name = name.strip()
    if not name:
        raise UnknownLayerError("empty layer name")
    parts = name.split(".")
    if not all(_SEGMENT.match(p) for p in parts):
        raise UnknownLayerError(
            f"malformed layer name {name!r}: expected dotted attributes with [i] indices, "
            "e.g. 'up_blocks[1].upsamplers[0]'"
        )
    return re.sub(r"\[(\d+)\]", r".\1", name)


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


def unet_layers(unet: torch.nn.Module) -> list[str]:
    """Every resnet, attention, down/upsampler and the in/out convolutions of a diffusers U-Net, in execution order:
    the paper's choice of layers, for any U-Net layout (SDXL's three levels, attention-free blocks, ...)."""
    names = ["conv_in"]

    def block(prefix: str, blk) -> None:
        resnets = getattr(blk, "resnets", None) or []
        attentions = getattr(blk, "attentions", None) or []
        if prefix == "mid_block":  # resnet, then (attention, resnet) pairs
            names.append(f"{prefix}.resnets[0]")
            for i in range(1, len(resnets)):
                if i - 1 < len(attentions):
                    names.append(f"{prefix}.attentions[{i - 1}]")
                names.append(f"{prefix}.resnets[{i}]")
            return
        for i in range(len(resnets)):
            names.append(f"{prefix}.resnets[{i}]")
            if i < len(attentions):
                names.append(f"{prefix}.attentions[{i}]")
        for kind in ("downsamplers", "upsamplers"):
            for i in range(len(getattr(blk, kind, None) or [])):
                names.append(f"{prefix}.{kind}[{i}]")

    for i, blk in enumerate(unet.down_blocks):
        block(f"down_blocks[{i}]", blk)
    if getattr(unet, "mid_block", None) is not None:
        block("mid_block", unet.mid_block)
    for i, blk in enumerate(unet.up_blocks):
        block(f"up_blocks[{i}]", blk)
    names.append("conv_out")
    return names


def paper_layers(model: torch.nn.Module) -> list[str]:
    """``layers: paper`` for ``model``: the paper's 45 layers on an SD-1/2 U-Net (they omit
    ``up_blocks[0].resnets[2]``), else every layer of :func:`unet_layers` (the same choice on the model's layout);
    on a diffusion transformer the patch embedding and every block (:func:`diffaudit.dit.paper_layers`)."""
    if hasattr(model, "transformer_blocks"):
        from .dit import paper_layers as dit_layers

        return dit_layers(model)
    every = unet_layers(model)
    if every == [*PAPER_LAYERS[:23], "up_blocks[0].resnets[2]", *PAPER_LAYERS[23:]]:
        return list(PAPER_LAYERS)
    return every


def expand_layers(spec: str | list[str], model: torch.nn.Module | None = None) -> list[str]:
    """A config ``layers`` value: a named set (``paper``: the paper's list, or with ``model`` its analogue for the
    model's layout, :func:`paper_layers`) or an explicit list of names."""
    if isinstance(spec, str):
        if spec not in LAYER_SETS:
            raise UnknownLayerError(
                f"unknown layer set {spec!r}; use one of {sorted(LAYER_SETS)} or a list of layer names"
            )
        if spec == "paper" and model is not None:
            return paper_layers(model)
        return list(LAYER_SETS[spec])
    if not spec:
        raise UnknownLayerError("the layer list is empty")
    return [str(s) for s in spec]


def group_name(layer: str) -> str:
    """Zarr group name of a layer: the torch module path (portable characters only)."""
    return to_module_path(layer)
