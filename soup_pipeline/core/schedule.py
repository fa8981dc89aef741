"""The one learning-rate schedule of the package: linear warm-up, then cosine decay to 0, per optimizer step.

Fine-tuning and pre-training use it over all their steps; MEHL-Soup over each block's steps.
"""

from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor before optimizer step `step` (0-based) of `total`: linear warm-up over the first
    `warmup` steps, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, total_steps: int,
                            warmup_frac: float) -> torch.optim.lr_scheduler.LambdaLR:
    """`optimizer`'s learning rate scaled by `warmup_cosine`, the first `warmup_frac` of `total_steps` warming up."""
    warmup = int(warmup_frac * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, total_steps, warmup))
