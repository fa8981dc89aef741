"""Task arithmetic (Ilharco et al., 2023): theta_0 + lambda * sum_k tau_k, lambda chosen on select data."""

from __future__ import annotations

from typing import ClassVar, Mapping

import torch

from ...core.ingredients import IngredientStore
from ..engine.base import MethodSpec, Objective, SoupResult
from ..engine.layers import Grid
from ..engine.task_vectors import (
    Scale,
    ScaledParams,
    anchored_result,
    anchored_state,
    checked_anchor,
    model_dtype,
    summed,
)


class ScaleGrid(Grid):
    """Candidate lambdas (with K fine-tunes of one task, lambda = 1/K is the uniform soup)."""

    SETS: ClassVar[dict[str, str]] = {"scales": "scale"}
    scales: list[Scale] = [0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.3, 0.5, 0.7, 1.0]


class TaskArithmeticParams(ScaledParams):
    search: ScaleGrid = ScaleGrid()


def task_arithmetic(store: IngredientStore, objective: Objective, params: TaskArithmeticParams, *,
                    anchor: Mapping[str, torch.Tensor] | None = None, name: str = "task_arithmetic") -> SoupResult:
    """theta_0 + scale * sum_k (theta_k - theta_0), tensor by tensor, one pass in float64."""
    theta0 = checked_anchor(store, anchor, name)
    state = anchored_state(theta0, model_dtype(objective), lambda key: summed(store, theta0, key), params.scale)
    beta = torch.full((len(store), 1), params.scale, dtype=torch.float64)
    return anchored_result(store, name, state, beta, ["model"], {})


SPECS = (MethodSpec("task_arithmetic", task_arithmetic, TaskArithmeticParams, anchored=True, searched=True),)
