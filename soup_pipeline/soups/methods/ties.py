"""TIES-Merging (Yadav et al., 2023): trim each task vector, elect each entry's sign, average the agreeing entries.

Trimming is per tensor: each tensor of tau_k keeps its own top `density` share of entries by
magnitude (ties at the threshold are kept). Over the whole vector instead, the tensors whose
updates are small in absolute terms (norms, biases, the head) would lose every entry to the large
matrices; per tensor, every tensor keeps the same share. Tensor by tensor, two passes over the
ingredients' tensor: the sum of the trimmed tensors (its sign is the elected one), then the mean of
the trimmed entries that agree.
"""

from __future__ import annotations

import math
from typing import ClassVar, Mapping

import torch

from ...core.ingredients import IngredientStore
from ..engine.base import MethodSpec, Objective, SoupResult
from ..engine.layers import Grid
from ..engine.task_vectors import (
    Pruning,
    Scale,
    ScaledParams,
    Share,
    anchored_result,
    checked_anchor,
    disjoint_merge,
    model_dtype,
)


class TiesGrid(Grid):
    SETS: ClassVar[dict[str, str]] = {"scales": "scale", "densities": "density"}
    scales: list[Scale] = [0.5, 1.0, 1.5]
    densities: list[Share] = [0.1, 0.2, 0.5, 1.0]


class TiesParams(ScaledParams):
    density: Share = 0.2
    search: TiesGrid = TiesGrid()


def trimmed(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """`tensor` with all but its ceil(density * n) largest-magnitude entries set to 0 (ties at the threshold kept)."""
    n = tensor.numel()
    keep = math.ceil(density * n)
    if keep >= n:
        return tensor
    magnitude = tensor.abs().flatten()
    threshold = torch.kthvalue(magnitude, n - keep + 1).values
    return torch.where(tensor.abs() >= threshold, tensor, torch.zeros_like(tensor))


def trimming(density: float) -> Pruning:
    """Pruning: each tensor of tau_k trimmed to its `density` share of largest-magnitude entries."""
    def prune(_: int, tau: torch.Tensor) -> torch.Tensor:
        return trimmed(tau, density)
    return lambda: prune


def ties(store: IngredientStore, objective: Objective, params: TiesParams, *,
         anchor: Mapping[str, torch.Tensor] | None = None, name: str = "ties") -> SoupResult:
    """theta_0 + scale * (the disjoint mean of the task vectors trimmed to `density`)."""
    theta0 = checked_anchor(store, anchor, name)
    state = disjoint_merge(store, theta0, model_dtype(objective), trimming(params.density), params.scale)
    beta = torch.full((len(store), 1), params.scale / len(store), dtype=torch.float64)  # nominal: where all agree
    return anchored_result(store, name, state, beta, ["model"], {})


SPECS = (MethodSpec("ties", ties, TiesParams, anchored=True, searched=True),)
