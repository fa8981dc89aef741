"""Which torch device a setting names: `auto`, a checked CUDA device, and a torchrun rank's own GPU."""

from __future__ import annotations

import os

import torch

from .errors import SoupError


def resolve_device(name: str) -> torch.device:
    """`auto` is the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SoupError(f"device '{name}' asked for but no CUDA GPU is available; use device: auto or cpu")
    return device


def rank_device(device: torch.device) -> torch.device:
    """The device of this rank: its own GPU (LOCAL_RANK) under torchrun, else `device` as given."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device
