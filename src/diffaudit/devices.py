"""The compute device: the first CUDA device when there is one, else the CPU (as sdhelper chooses); ``auto`` in the
configuration resolves to it."""
from __future__ import annotations


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str) -> str:
    """A configured device (``extraction.device``): ``auto`` is :func:`default_device`, anything else is itself."""
    return default_device() if device == "auto" else device
