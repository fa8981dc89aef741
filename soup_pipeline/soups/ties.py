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

from ..core.ingredients import IngredientStore
from .base import MethodSpec, Objective, SoupResult
from .layers import Grid
from .task_vectors import (Prune, Pruning, Scale, ScaledParams, Share, anchored_result, anchored_state, checked_anchor,
                           model_dtype, summed, tensor_task_vectors)


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


def disjoint_mean(store: IngredientStore, anchor: Mapping[str, torch.Tensor], key: str, prune: Prune) -> torch.Tensor:
    """The TIES merge of tensor `key` of the pruned task vectors: per entry, the mean of the pruned tau_k whose sign
    is the sign of their sum (0 where none agrees). Two passes over the ingredients; the pruning is recomputed in the
    second."""
    elected = torch.sign(summed(store, anchor, key, prune))
    total, count = torch.zeros_like(elected), torch.zeros_like(elected)
    for index, tau in tensor_task_vectors(store, anchor, key):
        value = prune(index, tau)
        agrees = (torch.sign(value) == elected) & (value != 0)
        total += torch.where(agrees, value, 0.0)
        count += agrees
    return total / count.clamp(min=1)


def disjoint_merge(store: IngredientStore, anchor: Mapping[str, torch.Tensor], dtype: torch.dtype, pruning: Pruning,
                   scale: float) -> dict[str, torch.Tensor]:
    """theta_0 + scale * (the disjoint mean of the pruned task vectors), in `dtype`, tensor by tensor."""
    return anchored_state(anchor, dtype, lambda key: disjoint_mean(store, anchor, key, pruning()), scale)


def ties(store: IngredientStore, objective: Objective, params: TiesParams, *,
         anchor: Mapping[str, torch.Tensor] | None = None, name: str = "ties") -> SoupResult:
    """theta_0 + scale * (the disjoint mean of the task vectors trimmed to `density`)."""
    theta0 = checked_anchor(store, anchor, name)
    state = disjoint_merge(store, theta0, model_dtype(objective), trimming(params.density), params.scale)
    beta = torch.full((len(store), 1), params.scale / len(store), dtype=torch.float64)  # nominal: where all agree
    return anchored_result(store, name, state, beta, ["model"], {})


SPECS = (MethodSpec("ties", ties, TiesParams, anchored=True, searched=True),)
