"""Model Stock (Jang et al., 2024): per layer group, move from theta_0 towards the fine-tunes' mean by a ratio t
that grows with how aligned their task vectors are.

    cos = the mean pairwise cosine of the task vectors tau_k restricted to the group (0 for a zero vector),
    t = K cos / (1 + (K - 1) cos), cos clamped to [0, 1] (so t is in [0, 1]; K = 1 gives t = 1),
    theta = t * mean_k theta_k + (1 - t) * theta_0.

One streaming pass: the sum of the tau_k and the sum of the normalised tau_k / ||tau_k|| per group
give every pairwise cosine at once, sum_{i<j} cos_ij = (||sum_k u_k||^2 - n) / 2 with n the
nonzero vectors. The grouping (a tensor, a transformer block, the whole model) is chosen on
select data.
"""

from __future__ import annotations

from typing import ClassVar, Mapping

import torch

from ..core.settings import SoupSettings
from ..core.ingredients import IngredientStore
from .base import MethodSpec, Objective, SoupResult
from .layers import GroupingName, Grid, LayerwiseParams, group_layers
from .task_vectors import anchored_result, checked_anchor, mean_cosine_from_sums, model_dtype, moved, task_vectors


class GroupingGrid(Grid):
    SETS: ClassVar[dict[str, str]] = {"groupings": "grouping"}
    groupings: list[GroupingName] = ["tensor", "block", "model"]


class ModelStockParams(SoupSettings, LayerwiseParams):
    search: GroupingGrid = GroupingGrid()


def interpolation_ratio(mean_cosine: float, K: int) -> float:
    """t = K cos / (1 + (K - 1) cos), cos clamped to [0, 1]."""
    cos = min(max(mean_cosine, 0.0), 1.0)
    return K * cos / (1 + (K - 1) * cos) if cos > 0 else 0.0


def model_stock(store: IngredientStore, objective: Objective, params: ModelStockParams, *,
                anchor: Mapping[str, torch.Tensor] | None = None, name: str = "model_stock") -> SoupResult:
    """theta_0 + t_g * mean_k tau_k in each group g, t_g from the group's mean pairwise cosine."""
    theta0 = checked_anchor(store, anchor, name)
    K = len(store)
    keys = [key for key in store.keys if theta0[key].is_floating_point()]
    grouping = group_layers(keys, params.grouping)
    members = [[key for key in keys if grouping.group_of[key] == group] for group in range(grouping.size)]
    total = {key: torch.zeros_like(theta0[key]) for key in keys}
    directions = {key: torch.zeros_like(theta0[key]) for key in keys}
    nonzero = [0] * grouping.size
    for _, tau in task_vectors(store, theta0):
        for group, group_keys in enumerate(members):
            norm = torch.sqrt(sum((tau[key] ** 2).sum() for key in group_keys))
            for key in group_keys:
                total[key] += tau[key]
                if norm > 0:
                    directions[key] += tau[key] / norm
            nonzero[group] += int(norm > 0)
    ratios = []
    for group, group_keys in enumerate(members):
        aligned = float(sum((directions[key] ** 2).sum() for key in group_keys))
        ratios.append(1.0 if K == 1 else interpolation_ratio(mean_cosine_from_sums(aligned, nonzero[group], K), K))
    delta = {key: ratios[grouping.group_of[key]] * total[key] / K for key in keys}
    beta = torch.tensor(ratios, dtype=torch.float64).repeat(K, 1) / K
    return anchored_result(store, name, moved(theta0, delta, model_dtype(objective)), beta, grouping.names, {})


SPECS = (MethodSpec("model_stock", model_stock, ModelStockParams, anchored=True, searched=True),)
