"""Seeded random search over fine-tuning hyperparameters; member k depends only on (seed, k)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..core.settings import FinetuneParams, SweepParams
from ..runtime.errors import SoupError


def sample_hparams(params: SweepParams, member: int) -> dict:
    """Member `member`'s hyperparameters (the keys of FinetuneParams); adding members never changes earlier ones."""
    if member < 0:
        raise SoupError(f"member index {member} must be >= 0")
    rng = np.random.default_rng([params.seed, member])
    low, high = params.lr_range
    return FinetuneParams(
        lr=math.exp(rng.uniform(math.log(low), math.log(high))),
        weight_decay=float(rng.uniform(*params.weight_decay_range)),
        augmentation=params.augmentations[int(rng.integers(len(params.augmentations)))],
        label_smoothing=float(rng.uniform(*params.label_smoothing_range)),
        epochs=int(rng.integers(params.epochs_range[0], params.epochs_range[1] + 1)),
        seed=int(rng.integers(2**31)),
        batch_size=params.batch_size,
        warmup_frac=params.warmup_frac,
        precision=params.precision,
    ).model_dump()


def ingredient_path(out_dir: str | Path, member: int) -> Path:
    """Where member `member`'s ingredient is written."""
    return Path(out_dir) / f"member-{member}.safetensors"

