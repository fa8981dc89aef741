"""Choosing a method's setting on select data: fit one soup per candidate, keep the lowest select loss.

The candidates are the method's declared grid `search` (a `layers.Grid`: for a hyperplane soup with
`grouping: auto`, groupings x learning rates x weight decays; for a merge method its scale, density,
drop rate or alpha). Each candidate is an ordinary run of the method, one after another, so each keeps the method's
memory bound; between runs only the best candidate's state dict is kept. The select data decide
the choice and nothing else: no candidate is trained on them. The chosen soup is not refitted
on fit + select data, so its fit and select numbers stay those of the soup that is returned.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from typing import Literal

from ...core.ingredients import IngredientStore
from ...core.settings import SoupSettings
from ...runtime.devices import resolve_device
from ...runtime.errors import SoupError
from ..engine.base import Method, MethodSpec, Objective, OverfittingWarning, SoupResult, model_at, role_metrics
from .hyperplane import BLOCKWISE, MEHLPlusParams, hyperplane_soup


class AutoParams(MEHLPlusParams):
    """mehl_soup_auto: MEHL-Soup+ whose grouping, lr and weight decay are always chosen from `search`."""

    grouping: Literal["auto"] = "auto"  # always chosen on select data; set the candidates in `search`


def candidate_settings(params: SoupSettings) -> list[SoupSettings]:
    """One setting per point of the grid `params.search`, in grid order (its first list varies slowest)."""
    grid = params.search
    names = list(grid.SETS.values())
    return [params.model_copy(update=dict(zip(names, values)))
            for values in itertools.product(*(getattr(grid, field) for field in grid.SETS))]


def searched_soup(method: Method, store: IngredientStore, objective: Objective, params: SoupSettings, *,
                  name: str, **options) -> SoupResult:
    """Run `method` once per candidate setting; return the soup with the lowest select loss.

    Ties keep the earlier candidate. `info["search"]` holds one row per candidate (setting, L,
    K x L against the fit size, fit and select loss and accuracy, and which one was chosen).
    """
    if objective.select is None or len(objective.select) == 0:
        raise SoupError(f"{name} chooses its setting on select data, and the objective has none; give "
                        "Objective(select=...) (or, for a hyperplane soup, a fixed grouping: 'tensor', 'block', "
                        "'model')")
    device = resolve_device(params.device)
    settings = list(params.search.SETS.values())
    rows, best, best_loss, blocks_reused = [], None, float("inf"), 0
    for candidate in candidate_settings(params):
        with warnings.catch_warnings():  # K x L against the fit size is a column of the candidate table here
            warnings.simplefilter("ignore", OverfittingWarning)
            result = method(store, objective, candidate, name=name, **options)
        blocks_reused += result.info.get("blocks_reused", 0)
        scores = role_metrics(model_at(objective, result.state_dict, device), objective, device)
        L = len(result.layer_names)
        rows.append({**{key: getattr(candidate, key) for key in settings},
                     "L": L, "coefficients": len(store) * L, "fit_size": len(objective.fit), **scores})
        if scores["select_loss"] < best_loss:
            best, best_loss = result, scores["select_loss"]
            chosen = len(rows) - 1
        del result
    if best is None:
        raise SoupError(f"every candidate of {name} gave a non-finite select loss ({rows}); "
                        "change the method's search grid or check the ingredients")
    for index, row in enumerate(rows):
        row["chosen"] = index == chosen
    best.info.update({"search": rows, "chosen": {key: rows[chosen][key] for key in settings},
                      "blocks_reused": blocks_reused})  # over every candidate
    return best


def with_search(method: Method) -> Method:
    """`method` made to search the grid of `params.search`, choosing on select data."""
    return functools.partial(searched_soup, method)


# MEHL-Soup+ that always chooses its grouping, lr and weight decay on select data
SPECS = (MethodSpec("mehl_soup_auto", functools.partial(hyperplane_soup, layerwise=True), AutoParams, searched=True,
                    **BLOCKWISE),)
