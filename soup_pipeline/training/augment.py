"""Training augmentation presets, applied to batches of image tensors (so the same for every data source).

Kept apart from `data.py` so that only the code that trains (pre-training and fine-tuning) runs it: a change
to a preset reruns those stages and what depends on them, not data preparation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..runtime.errors import SoupError


@dataclass(frozen=True)
class Augment:
    """Random per-image affine transform plus Gaussian noise."""

    rotate: float = 0.0  # max |rotation| in degrees
    translate: float = 0.0  # max |shift| as a fraction of the image side
    scale: float = 0.0  # max relative zoom in or out
    noise: float = 0.0  # std of the added Gaussian noise, in the tensor's units


AUGMENTATIONS = {  # suited to 32 px digits: small affine, no flips
    "none": Augment(),
    "light": Augment(rotate=10, translate=0.06, scale=0.05),
    "strong": Augment(rotate=25, translate=0.12, scale=0.15, noise=0.1),
}


def random_affine(images: torch.Tensor, aug: Augment, generator: torch.Generator, *,
                  padding_mode: str = "border") -> torch.Tensor:
    """Apply `aug` to a batch [N, C, H, W], one random draw per image from `generator`."""
    n = images.shape[0]
    draws = torch.rand(n, 4, generator=generator) * 2 - 1
    angle = draws[:, 0] * math.radians(aug.rotate)
    zoom = 1 + draws[:, 1] * aug.scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    shift = draws[:, 2:] * 2 * aug.translate
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, padding_mode=padding_mode, align_corners=False)
    if aug.noise:
        out = out + aug.noise * torch.randn(out.shape, generator=generator).to(out)
    return out


def augment(images: torch.Tensor, preset: str, generator: torch.Generator) -> torch.Tensor:
    """A training batch augmented with a named preset ("none" returns it unchanged)."""
    if preset not in AUGMENTATIONS:
        raise SoupError(f"unknown augmentation {preset!r}; use one of {sorted(AUGMENTATIONS)}")
    return images if preset == "none" else random_affine(images, AUGMENTATIONS[preset], generator)
