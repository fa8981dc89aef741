"""Which torch device a setting names: `auto`, or a checked CUDA device (a job's place among several GPUs, and a
torchrun rank's own GPU: `runtime.placement`)."""

from __future__ import annotations

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

