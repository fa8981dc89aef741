"""Output ensemble: the average of the K models' logits. Reported for accuracy; it is not a soup."""

from __future__ import annotations

import functools

import torch
from torch.utils.data import Dataset

from ...core.ingredients import IngredientStore
from ...core.settings import Precision, SoupSettings
from ...evaluation.scoring import model_logits
from ...runtime.devices import resolve_device
from ..engine.base import MethodSpec, Objective, SoupResult, check_ingredient_count, model_at, uniform_beta


@torch.no_grad()
def ensemble_logits(store: IngredientStore, objective: Objective, device: torch.device, dataset: Dataset, *,
                    workers: int | None = 0, precision: Precision = "float32") -> torch.Tensor:
    """Mean logits of the K models over a data set, one model resident at a time (each read by `workers` processes,
    its forward passes in `precision`; the mean in float64)."""
    total = None
    for index in range(len(store)):
        model = model_at(objective, store.load(index), device)
        logits = model_logits(model, dataset, objective.batch_size, device, workers=workers,
                              precision=precision).double()
        total = logits if total is None else total + logits
        del model
    return (total / len(store)).float()


def ensemble(store: IngredientStore, objective: Objective, params: SoupSettings, *,
             name: str = "ensemble") -> SoupResult:
    """The ensemble as a result with no state dict; `info["predict"](dataset)` gives its logits."""
    check_ingredient_count(store)
    predict = functools.partial(ensemble_logits, store, objective, resolve_device(params.device))
    return SoupResult(method=name, state_dict=None, beta=uniform_beta(len(store), 1), layer_names=["model"],
                      ingredient_names=[i.name for i in store.ingredients], info={"K": len(store), "predict": predict})


SPECS = (MethodSpec("ensemble", ensemble, kind="ensemble"),)
