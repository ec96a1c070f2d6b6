"""The compute device: the first CUDA device when there is one, else the CPU (as sdhelper chooses)."""
from __future__ import annotations


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
