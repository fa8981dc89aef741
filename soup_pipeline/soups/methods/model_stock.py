"""Model Stock (Jang et al., 2024): per layer group, move from theta_0 towards the fine-tunes' mean by a ratio t
that grows with how aligned their task vectors are.

    cos = the mean pairwise cosine of the task vectors tau_k restricted to the group (0 for a zero vector),
    t = K cos / (1 + (K - 1) cos), cos clamped to [0, 1] (so t is in [0, 1]; K = 1 gives t = 1),
    theta = t * mean_k theta_k + (1 - t) * theta_0.

The sum of the normalised tau_k / ||tau_k|| per group gives every pairwise cosine at once,
sum_{i<j} cos_ij = (||sum_k u_k||^2 - n) / 2 with n the nonzero vectors. Tensor by tensor, three
passes over the ingredients (the norms per group, the normalised sum, then the sum of the tau_k
once every t_g is known), so no model-sized sum is kept. The grouping (a tensor, a transformer
block, the whole model) is chosen on select data.
"""

from __future__ import annotations

from typing import ClassVar, Mapping

import torch

from ...core.ingredients import IngredientStore
from ...core.settings import SoupSettings
from ..engine.base import MethodSpec, Objective, SoupResult
from ..engine.layers import Grid, GroupingName, LayerwiseParams, group_layers
from ..engine.task_vectors import (
    anchored_result,
    anchored_state,
    checked_anchor,
    floating_keys,
    group_cosines,
    model_dtype,
    summed,
)


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
    dtype = model_dtype(objective)
    keys = floating_keys(theta0)
    grouping = group_layers(keys, params.grouping)
    cosines = group_cosines(store, theta0, keys, grouping.group_of, grouping.size)
    ratios = [1.0 if K == 1 else interpolation_ratio(cosine, K) for cosine in cosines]
    state = anchored_state(theta0, dtype, lambda key: ratios[grouping.group_of[key]] * summed(store, theta0, key) / K)
    beta = torch.tensor(ratios, dtype=torch.float64).repeat(K, 1) / K
    return anchored_result(store, name, state, beta, grouping.names, {})


SPECS = (MethodSpec("model_stock", model_stock, ModelStockParams, anchored=True, searched=True),)
