"""Uniform soup: the plain average of the K ingredients, one streaming pass in float64."""

from __future__ import annotations

from ...core.ingredients import IngredientStore
from ...core.settings import SoupSettings
from ..engine.base import MethodSpec, Objective, SoupResult, check_ingredient_count, uniform_beta


def uniform_soup(store: IngredientStore, objective: Objective, params: SoupSettings, *,
                 name: str = "uniform") -> SoupResult:
    """c = (1/K) sum_k theta_k; needs no data."""
    check_ingredient_count(store)
    model = objective.model_factory()
    dtype = next(model.parameters()).dtype
    state = store.centre(dtype=dtype)
    return SoupResult(method=name, state_dict=state, beta=uniform_beta(len(store), 1), layer_names=["model"],
                      ingredient_names=[i.name for i in store.ingredients], info={"K": len(store)})


SPECS = (MethodSpec("uniform", uniform_soup),)
