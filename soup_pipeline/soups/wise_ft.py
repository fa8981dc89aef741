"""WiSE-FT (Wortsman et al., 2022): interpolate the best fine-tune with the zero-shot model,
(1 - alpha) * theta_0 + alpha * theta_best, alpha chosen on select data.

The best fine-tune is the ingredient with the highest fit accuracy (its sidecar's), as the
evaluation's best individual; only it and theta_0 are read.
"""

from __future__ import annotations

from typing import ClassVar, Mapping

import torch

from ..config import SoupSettings
from ..ingredients import IngredientStore
from .base import MethodSpec, Objective, SoupResult, best_individual
from .layers import Grid
from .task_vectors import Mix, anchored_result, checked_anchor, model_dtype, moved


class AlphaGrid(Grid):
    SETS: ClassVar[dict[str, str]] = {"alphas": "alpha"}
    alphas: list[Mix] = [0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


class WiseFTParams(SoupSettings):
    alpha: Mix = 0.5
    search: AlphaGrid = AlphaGrid()


def wise_ft(store: IngredientStore, objective: Objective, params: WiseFTParams, *,
            anchor: Mapping[str, torch.Tensor] | None = None, name: str = "wise_ft") -> SoupResult:
    """theta_0 + alpha * (theta_best - theta_0)."""
    theta0 = checked_anchor(store, anchor, name)
    best = best_individual(store)
    theta = store.load(best)
    delta = {key: params.alpha * (theta[key].to(torch.float64) - value) for key, value in theta0.items()
             if value.is_floating_point()}
    beta = torch.zeros(len(store), 1, dtype=torch.float64)
    beta[best] = params.alpha
    return anchored_result(store, name, moved(theta0, delta, model_dtype(objective)), beta, ["model"],
                           {"members": [store.ingredients[best].name]})


SPECS = (MethodSpec("wise_ft", wise_ft, WiseFTParams, anchored=True, searched=True),)
