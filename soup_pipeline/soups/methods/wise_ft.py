"""WiSE-FT (Wortsman et al., 2022): interpolate a fine-tuned model with the zero-shot model,
(1 - alpha) * theta_0 + alpha * theta, alpha chosen on select data.

`wise_ft` takes theta to be the best fine-tune (the paper's setting): the ingredient with the highest
fit accuracy (its sidecar's), as the evaluation's best individual; only it and theta_0 are read.
`wise_ft_soup` takes theta to be a soup already built (its `soup` parameter, default the registered
`mehl_soup_auto`): it refines that soup, so its stage runs after the soup's (`soup.refine` in params.yaml).
"""

from __future__ import annotations

from typing import Callable, ClassVar, Mapping

import torch

from ...core.ingredients import IngredientStore
from ...core.settings import SoupSettings
from ...runtime.errors import SoupError
from ..engine.base import MethodSpec, Objective, SoupResult, best_individual
from ..engine.layers import Grid
from ..engine.task_vectors import (
    Mix,
    State,
    anchored_result,
    anchored_state,
    checked_anchor,
    ingredient_tensor,
    model_dtype,
)


class AlphaGrid(Grid):
    SETS: ClassVar[dict[str, str]] = {"alphas": "alpha"}
    alphas: list[Mix] = [0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


class WiseFTParams(SoupSettings):
    alpha: Mix = 0.5
    search: AlphaGrid = AlphaGrid()


class WiseFTSoupParams(WiseFTParams):
    soup: str = "mehl_soup_auto"  # the built soup interpolated with theta_0 (one of soup.methods)


def interpolated(theta0: Mapping[str, torch.Tensor], theta: Callable[[str], torch.Tensor], alpha: float,
                 dtype: torch.dtype) -> State:
    """theta_0 + alpha * (theta - theta_0) in `dtype`, tensor by tensor (`theta(key)`: theta's tensor), in
    float64."""
    return anchored_state(theta0, dtype, lambda key: theta(key).to(torch.float64) - theta0[key].to(torch.float64),
                          alpha)


def wise_ft(store: IngredientStore, objective: Objective, params: WiseFTParams, *,
            anchor: Mapping[str, torch.Tensor] | None = None, name: str = "wise_ft") -> SoupResult:
    """theta_0 + alpha * (theta_best - theta_0)."""
    theta0 = checked_anchor(store, anchor, name)
    best = best_individual(store)
    beta = torch.zeros(len(store), 1, dtype=torch.float64)
    beta[best] = params.alpha
    state = interpolated(theta0, lambda key: ingredient_tensor(store, best, key), params.alpha, model_dtype(objective))
    return anchored_result(store, name, state, beta, ["model"], {"members": [store.ingredients[best].name]})


def wise_ft_soup(store: IngredientStore, objective: Objective, params: WiseFTSoupParams, *,
                 anchor: Mapping[str, torch.Tensor] | None = None, soup: SoupResult | None = None,
                 name: str = "wise_ft_soup") -> SoupResult:
    """theta_0 + alpha * (theta_soup - theta_0); the soup's mixing weights scaled by alpha (theta_0 holds the rest)."""
    theta0 = checked_anchor(store, anchor, name)
    names = [i.name for i in store.ingredients]
    if soup is None or soup.state_dict is None:
        raise SoupError(f"{name} interpolates the built soup {params.soup!r} with theta_0, and none was given; "
                        f"build {params.soup} first (its stage runs before this one) or pass soup=")
    if soup.ingredient_names != names:
        raise SoupError(f"{name}: the soup {soup.method!r} was built from {soup.ingredient_names}, not from these "
                        f"ingredients {names}; rebuild it first")
    state = interpolated(theta0, soup.state_dict.__getitem__, params.alpha, model_dtype(objective))
    return anchored_result(store, name, state, params.alpha * soup.beta, soup.layer_names, {"soup": soup.method})


SPECS = (MethodSpec("wise_ft", wise_ft, WiseFTParams, anchored=True, searched=True),
         MethodSpec("wise_ft_soup", wise_ft_soup, WiseFTSoupParams, anchored=True, searched=True, refines=True))
