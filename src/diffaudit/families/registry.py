"""The registry of model families: name -> :class:`~diffaudit.families.base.Family`.

:data:`FAMILIES` lists one object per family (adding a family = its module + one line here). :func:`family_of`
decides a pipeline's family once, at load; downstream code reads the family a store recorded (:func:`of_store`)
instead of re-deriving it. :func:`get` looks a name up; :func:`embedded_models` maps every embedded mini model to its
family's name and :func:`embedded_family` to the family that builds it.
"""
from __future__ import annotations

from collections.abc import Mapping

from ..errors import ModelLoadError
from . import flux, pixart, sd, sd3, sdxl
from .base import Family

#: Every supported family, in the order they are tried and listed.
FAMILIES: tuple[Family, ...] = (sd.FAMILY, sdxl.FAMILY, sd3.FAMILY, flux.FAMILY, pixart.FAMILY)


def names() -> tuple[str, ...]:
    return tuple(f.name for f in FAMILIES)


def get(name: str) -> Family:
    """The family called ``name`` (a ``ValueError`` listing the known ones otherwise)."""
    for fam in FAMILIES:
        if fam.name == name:
            return fam
    raise ValueError(f"unknown model family {name!r}; known: {', '.join(names())}")


def family_of(pipe) -> Family:
    """The family of a loaded pipeline; anything else is refused in one line (:class:`ModelLoadError`)."""
    for fam in FAMILIES:
        if fam.detect(pipe):
            return fam
    reason = next((r for r in (f.refusal(pipe) for f in FAMILIES) if r), None)
    supported = ", ".join(names())
    if reason:
        raise ModelLoadError(f"{reason} (supported families: {supported})")
    raise ModelLoadError(f"{type(pipe).__name__} is not a latent diffusion pipeline with a U-Net or a supported "
                         f"transformer; supported families: {supported}")


#: The family of stores that record none: they predate the other families (SD-1/2).
DEFAULT: Family = sd.FAMILY


def of_store(attrs: Mapping) -> Family:
    """The family a store recorded in its attributes (``family``; :data:`DEFAULT` for stores that record none)."""
    name = attrs.get("family") or (attrs.get("config") or {}).get("family")
    return get(str(name)) if name else DEFAULT


def embedded_models() -> dict[str, str]:
    """Every embedded mini model -> its family's name, in registry order."""
    return {name: fam.name for fam in FAMILIES for name in fam.embedded}


def embedded_family(name: str) -> Family:
    """The family that builds the embedded model ``name``."""
    for fam in FAMILIES:
        if name in fam.embedded:
            return fam
    raise ValueError(f"unknown embedded model {name!r}; known: {', '.join(embedded_models())}")
