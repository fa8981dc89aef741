"""Greedy soup (Wortsman et al., 2022): add ingredients in order of fit accuracy while it improves.

Every accuracy here is measured on the objective's fit data: the order, the first ingredient and
each inclusion test. Select data are never read, so they can judge the soup afterwards.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ...core.ingredients import IngredientStore
from ...core.settings import SoupSettings
from ...evaluation.scoring import loss_and_accuracy
from ...runtime.devices import resolve_device
from ..engine.base import MethodSpec, Objective, SoupResult, check_ingredient_count, model_at


def fit_accuracy(objective: Objective, state: dict[str, torch.Tensor], device: torch.device) -> float:
    """Accuracy of the objective's model holding `state` on the fit data."""
    return loss_and_accuracy(model_at(objective, state, device), objective.fit, objective.batch_size, device,
                             objective.loss_fn)[1]


def fit_order(store: IngredientStore, objective: Objective, device: torch.device) -> list[tuple[int, float]]:
    """(index, fit accuracy) by accuracy, descending; a stable sort, so ties keep ingredient order.

    Measured here, one ingredient at a time, so the order always comes from the fit data.
    """
    scored = [(index, fit_accuracy(objective, store.load(index), device)) for index in range(len(store))]
    return sorted(scored, key=lambda pair: -pair[1])


def greedy_soup(store: IngredientStore, objective: Objective, params: SoupSettings, *,
                name: str = "greedy") -> SoupResult:
    """Start from the best ingredient; keep each next one only if the fit accuracy strictly improves.

    Memory: the float64 running sum, one ingredient and the candidate.
    """
    check_ingredient_count(store)
    device = resolve_device(params.device)
    dtype = next(objective.model_factory().parameters()).dtype
    order = fit_order(store, objective, device)
    first = order[0][0]
    total = {k: v.to(torch.float64) if v.is_floating_point() else v for k, v in store.load(first).items()}
    members = [first]
    best = order[0][1]
    trail = [{"ingredient": store.ingredients[first].name, "fit_acc": best, "kept": True}]
    for index, _ in tqdm(order[1:], desc=name, unit="ingredient", disable=None):
        current = store.load(index)
        candidate = _average(total, len(members) + 1, dtype, extra=current)
        acc = fit_accuracy(objective, candidate, device)
        kept = acc > best
        if kept:
            for key, value in total.items():
                if value.is_floating_point():
                    value += current[key]
            members.append(index)
            best = acc
        trail.append({"ingredient": store.ingredients[index].name, "fit_acc": acc, "kept": kept})
        del current, candidate
    beta = torch.zeros(len(store), 1, dtype=torch.float64)
    beta[members] = 1.0 / len(members)
    return SoupResult(method=name, state_dict=_average(total, len(members), dtype), beta=beta, layer_names=["model"],
                      ingredient_names=[i.name for i in store.ingredients],
                      info={"K": len(store), "members": [store.ingredients[i].name for i in members],
                            "fit_acc": best, "trail": trail})


def _average(total: dict[str, torch.Tensor], count: int, dtype: torch.dtype,
             extra: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """(total [+ extra]) / count in `dtype`, one tensor at a time; non-floating entries pass through."""
    out = {}
    for key, value in total.items():
        if value.is_floating_point():
            out[key] = ((value if extra is None else value + extra[key]) / count).to(dtype)
        else:
            out[key] = value
    return out


SPECS = (MethodSpec("greedy", greedy_soup),)
