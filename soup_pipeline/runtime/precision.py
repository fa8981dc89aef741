"""The arithmetic precision of a model's forward passes: float32, or bfloat16 autocast where the device has it.

Autocast runs the matrix products and convolutions in bfloat16 and keeps the weights, the losses and the optimiser's
state in float32 (no loss scaling needed for bfloat16). It wraps a model's forward pass only: the soups' coefficient
arithmetic never runs under it.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from .errors import SoupError


def autocast(precision: str, device: torch.device | str) -> ContextManager:
    """A context that runs forward passes on `device` in `precision` ("float32": nothing; "bf16"): a clear error
    where the device has no bfloat16 autocast."""
    if precision == "float32":
        return contextlib.nullcontext()
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SoupError(f"precision bf16 asked for on {device} ({torch.cuda.get_device_name(device)}), which has no "
                        "bfloat16 support; use precision: float32")
    if device.type not in ("cuda", "cpu"):
        raise SoupError(f"precision bf16 is supported on CUDA GPUs and the CPU, not on {device}; use float32")
    return torch.autocast(device.type, dtype=torch.bfloat16)
