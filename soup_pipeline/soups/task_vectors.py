"""Task vectors: each fine-tune measured from the pre-trained model, tau_k = theta_k - theta_0, streamed.

The merge methods (task arithmetic, TIES, DARE, Model Stock, WiSE-FT) are all anchored on theta_0,
the pre-trained model with its zero-shot head (the `anchor`, a state dict with the ingredients'
keys). They read one ingredient at a time and keep float64 sums the size of one model, so their
peak memory does not grow with K.
"""

from __future__ import annotations

from typing import Annotated, Callable, Iterator, Mapping

import torch
from pydantic import Field

from ..core.settings import SoupSettings
from ..runtime.errors import SoupError
from ..core.ingredients import IngredientStore
from .base import Objective, SoupResult

State = dict[str, torch.Tensor]
Prune = Callable[[int, State], State]  # (ingredient index, its task vector) -> the entries it keeps
Scale = Annotated[float, Field(gt=0)]  # lambda: how far theta_0 moves along the merged task vector
Share = Annotated[float, Field(gt=0, le=1)]  # TIES's density: the share of each tensor's entries kept
DropRate = Annotated[float, Field(ge=0, lt=1)]  # DARE's p
Mix = Annotated[float, Field(ge=0, le=1)]  # WiSE-FT's alpha


class ScaledParams(SoupSettings):
    """A method that adds `scale` times a merged task vector to theta_0."""

    scale: Scale = 1.0


def checked_anchor(store: IngredientStore, anchor: Mapping[str, torch.Tensor] | None, method: str) -> State:
    """The anchor as float64 where floating, checked against the ingredients' keys and shapes."""
    if anchor is None:
        raise SoupError(f"{method} measures the ingredients from the pre-trained model theta_0, and none was given; "
                        "pass anchor= (the zero-shot classifier's state dict), as the soup stage does from runs/base")
    missing, extra = sorted(set(store.keys) - set(anchor)), sorted(set(anchor) - set(store.keys))
    wrong = [key for key in store.keys if key in anchor and tuple(anchor[key].shape) != store.header[key][0]]
    if missing or extra or wrong:
        raise SoupError(f"the pre-trained model does not match the ingredients: keys missing {missing[:5]}, extra "
                        f"{extra[:5]}, other shapes {wrong[:5]}; give the model the ingredients were fine-tuned from")
    return {key: anchor[key].to(torch.float64) if anchor[key].is_floating_point() else anchor[key] for key in store.keys}


def task_vectors(store: IngredientStore, anchor: State) -> Iterator[tuple[int, State]]:
    """(k, tau_k) for each ingredient in turn, in float64, floating entries only; one ingredient is resident."""
    for index in range(len(store)):
        current = store.load(index)
        yield index, {key: current[key].to(torch.float64) - anchor[key] for key in store.keys
                      if anchor[key].is_floating_point()}
        del current


def summed(store: IngredientStore, anchor: State, prune: Prune | None = None) -> State:
    """sum_k tau_k (each pruned by `prune` first, when given), one pass."""
    total: State = {}
    for index, tau in task_vectors(store, anchor):
        for key, value in (prune(index, tau) if prune else tau).items():
            if key in total:
                total[key] += value
            else:
                total[key] = value.clone()
    return total


def moved(anchor: State, delta: Mapping[str, torch.Tensor], dtype: torch.dtype, scale: float = 1.0) -> State:
    """theta_0 + scale * delta in `dtype`, one tensor at a time; entries delta lacks (non-floating) are theta_0's."""
    return {key: (value + scale * delta[key]).to(dtype) if key in delta else value.clone()
            for key, value in anchor.items()}


def model_dtype(objective: Objective) -> torch.dtype:
    return next(objective.model_factory().parameters()).dtype


def anchored_result(store: IngredientStore, name: str, state: State, beta: torch.Tensor, layer_names: list[str],
                    info: dict) -> SoupResult:
    """A merge method's result: `beta[k, l]` is the weight of ingredient k in group l where it is one number
    (task arithmetic, Model Stock, WiSE-FT); the rest of each column's 1 is theta_0's."""
    return SoupResult(method=name, state_dict=state, beta=beta, layer_names=layer_names,
                      ingredient_names=[i.name for i in store.ingredients], info={"K": len(store), **info})


def mean_cosine_from_sums(unit_sum_sq: float, nonzero: int, K: int) -> float:
    """The mean over the K(K - 1)/2 pairs of cos(tau_i, tau_j), from ||sum_k u_k||^2 with u_k = tau_k / ||tau_k||
    over the n nonzero vectors (sum_{i<j} cos_ij = (||sum_k u_k||^2 - n) / 2; a zero vector counts 0); 1 for K = 1."""
    return 1.0 if K == 1 else (unit_sum_sq - nonzero) / (K * (K - 1))


def mean_pairwise_cosine(store: IngredientStore, anchor: State) -> float:
    """The mean pairwise cosine of the whole-model task vectors (every floating entry), one ingredient resident."""
    directions = {key: torch.zeros_like(value) for key, value in anchor.items() if value.is_floating_point()}
    nonzero = 0
    for _, tau in task_vectors(store, anchor):
        norm = torch.sqrt(sum((value ** 2).sum() for value in tau.values()))
        if norm > 0:
            nonzero += 1
            for key, value in tau.items():
                directions[key] += value / norm
    return mean_cosine_from_sums(float(sum((value ** 2).sum() for value in directions.values())), nonzero, len(store))
