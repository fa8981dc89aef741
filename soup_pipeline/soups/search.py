"""`grouping: auto`: fit one soup per candidate setting on fit data, keep the one with the lowest select loss.

The candidates are the method's declared grid `search` (groupings x learning rates x weight decays).
Each candidate is an ordinary run of the method, one after another, so each keeps the method's
memory bound; between runs only the best candidate's state dict is kept. The select data decide
the choice and nothing else: no candidate is trained on them. The chosen soup is not refitted
on fit + select data, so its fit and select numbers stay those of the soup that is returned.
"""

from __future__ import annotations

import functools
import warnings
from typing import Literal

from ..errors import SoupError
from ..ingredients import IngredientStore
from .base import Method, MethodSpec, Objective, SoupResult, model_at, resolve_device, role_metrics
from .hyperplane import BLOCKWISE, MEHLPlusParams, hyperplane_soup
from .layers import SearchableParams


class AutoParams(MEHLPlusParams):
    """mehl_soup_auto: MEHL-Soup+ whose grouping, lr and weight decay are always chosen from `search`."""

    grouping: Literal["auto"] = "auto"  # always chosen on select data; set the candidates in `search`


def candidate_settings(params: SearchableParams) -> list[SearchableParams]:
    """One setting per point of the grid `params.search`, in grid order (grouping, then lr, then weight decay)."""
    grid = params.search
    return [params.model_copy(update={"grouping": grouping, "lr": lr, "weight_decay": weight_decay})
            for grouping in grid.groupings for lr in grid.lrs for weight_decay in grid.weight_decays]


def searched_soup(method: Method, store: IngredientStore, objective: Objective, params: SearchableParams, *,
                  name: str, **options) -> SoupResult:
    """Run `method` once per candidate setting; return the soup with the lowest select loss.

    Ties keep the earlier candidate. `info["search"]` holds one row per candidate (setting, L,
    K x L against the fit size, fit and select loss and accuracy, and which one was chosen).
    """
    if objective.select is None or len(objective.select) == 0:
        raise SoupError("grouping: auto chooses on select data, and the objective has none; "
                        "give Objective(select=...) or a fixed grouping ('tensor', 'block', 'model')")
    device = resolve_device(params.device)
    rows, best, best_loss, blocks_reused = [], None, float("inf"), 0
    for candidate in candidate_settings(params):
        with warnings.catch_warnings():  # K x L against the fit size is a column of the candidate table here
            warnings.filterwarnings("ignore", message=r".*learned coefficients .* exceed")
            result = method(store, objective, candidate, name=name, **options)
        blocks_reused += result.info.get("blocks_reused", 0)
        scores = role_metrics(model_at(objective, result.state_dict, device), objective, device)
        L = len(result.layer_names)
        rows.append({"grouping": candidate.grouping, "lr": candidate.lr, "weight_decay": candidate.weight_decay,
                     "L": L, "coefficients": len(store) * L, "fit_size": len(objective.fit), **scores})
        if scores["select_loss"] < best_loss:
            best, best_loss = result, scores["select_loss"]
            chosen = len(rows) - 1
        del result
    if best is None:
        raise SoupError(f"every candidate of grouping: auto gave a non-finite select loss ({rows}); "
                        "lower the method's search.lrs or check the ingredients")
    for index, row in enumerate(rows):
        row["chosen"] = index == chosen
    best.info.update({"search": rows, "chosen": {key: rows[chosen][key] for key in ("grouping", "lr", "weight_decay")},
                      "blocks_reused": blocks_reused})  # over every candidate
    return best


def with_search(method: Method) -> Method:
    """`method` made to search the grid of `params.search`, choosing on select data."""
    return functools.partial(searched_soup, method)


# MEHL-Soup+ whose grouping (always auto) makes the registry run it through `with_search`
SPECS = (MethodSpec("mehl_soup_auto", functools.partial(hyperplane_soup, layerwise=True), AutoParams, **BLOCKWISE),)
