"""TIES-Merging (Yadav et al., 2023): trim each task vector, elect each entry's sign, average the agreeing entries.

Trimming is per tensor: each tensor of tau_k keeps its own top `density` share of entries by
magnitude (ties at the threshold are kept). Over the whole vector instead, the tensors whose
updates are small in absolute terms (norms, biases, the head) would lose every entry to the large
matrices; per tensor, every tensor keeps the same share. Two streaming passes: the sum of the
trimmed vectors (its sign is the elected one), then the mean of the trimmed entries that agree.
"""

from __future__ import annotations

import math
from typing import ClassVar, Mapping

import torch

from ..core.ingredients import IngredientStore
from .base import MethodSpec, Objective, SoupResult
from .layers import Grid
from .task_vectors import (Prune, Scale, ScaledParams, Share, State, anchored_result, checked_anchor, model_dtype,
                           moved, summed, task_vectors)


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


def disjoint_merge(store: IngredientStore, theta0: State, prune: Prune) -> State:
    """The TIES merge of the pruned task vectors: per entry, the mean of the pruned tau_k whose sign is the sign
    of their sum (0 where none agrees). Two passes; the pruning is recomputed in the second."""
    elected = {key: torch.sign(value) for key, value in summed(store, theta0, prune).items()}
    total = {key: torch.zeros_like(value) for key, value in elected.items()}
    count = {key: torch.zeros_like(value) for key, value in elected.items()}
    for index, tau in task_vectors(store, theta0):
        for key, value in prune(index, tau).items():
            agrees = (torch.sign(value) == elected[key]) & (value != 0)
            total[key] += torch.where(agrees, value, 0.0)
            count[key] += agrees
    return {key: total[key] / count[key].clamp(min=1) for key in total}


def ties(store: IngredientStore, objective: Objective, params: TiesParams, *,
         anchor: Mapping[str, torch.Tensor] | None = None, name: str = "ties") -> SoupResult:
    """theta_0 + scale * (the disjoint mean of the task vectors trimmed to `density`)."""
    theta0 = checked_anchor(store, anchor, name)
    merged = disjoint_merge(store, theta0, lambda _, tau: {k: trimmed(v, params.density) for k, v in tau.items()})
    state = moved(theta0, merged, model_dtype(objective), params.scale)
    beta = torch.full((len(store), 1), params.scale / len(store), dtype=torch.float64)  # nominal: where all agree
    return anchored_result(store, name, state, beta, ["model"], {})


SPECS = (MethodSpec("ties", ties, TiesParams, anchored=True, searched=True),)
