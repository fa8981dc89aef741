"""Task vectors: each fine-tune measured from the pre-trained model, tau_k = theta_k - theta_0, tensor by tensor.

The merge methods (task arithmetic, TIES, DARE, Model Stock, WiSE-FT) are all anchored on theta_0,
the pre-trained model with its zero-shot head (the `anchor`, a state dict with the ingredients'
keys). They build the soup one tensor at a time: for each key, that tensor of each ingredient in
turn (read on its own from its file), its float64 sums, and the soup's tensor written out before
the next key. Besides theta_0 (the caller's) and the soup they build, they hold float64 sums the
size of one tensor and one tensor of one ingredient, so their peak memory is about one model
whatever K. A method that needs a whole-vector number first (a norm) reads the ingredients again.
"""

from __future__ import annotations

import math
from typing import Annotated, Callable, Iterator, Mapping, Sequence

import torch
from pydantic import Field

from ...core.ingredients import IngredientStore
from ...core.settings import SoupSettings
from ...runtime.errors import SoupError
from .base import Objective, SoupResult

State = dict[str, torch.Tensor]
Prune = Callable[[int, torch.Tensor], torch.Tensor]  # (ingredient index, one tensor of its tau) -> the entries it keeps
# A Prune for the next floating key, in the store's key order; called again for an index, it keeps the same entries
Pruning = Callable[[], Prune]
Scale = Annotated[float, Field(gt=0)]  # lambda: how far theta_0 moves along the merged task vector
Share = Annotated[float, Field(gt=0, le=1)]  # TIES's density: the share of each tensor's entries kept
DropRate = Annotated[float, Field(ge=0, lt=1)]  # DARE's p
Mix = Annotated[float, Field(ge=0, le=1)]  # WiSE-FT's alpha


class ScaledParams(SoupSettings):
    """A method that adds `scale` times a merged task vector to theta_0."""

    scale: Scale = 1.0


def checked_anchor(store: IngredientStore, anchor: Mapping[str, torch.Tensor] | None, method: str) -> State:
    """The anchor's tensors in the store's key order (not copied), checked against the ingredients' keys and shapes."""
    if anchor is None:
        raise SoupError(f"{method} measures the ingredients from the pre-trained model theta_0, and none was given; "
                        "pass anchor= (the zero-shot classifier's state dict), as the soup stage does from runs/base")
    missing, extra = sorted(set(store.keys) - set(anchor)), sorted(set(anchor) - set(store.keys))
    wrong = [key for key in store.keys if key in anchor and tuple(anchor[key].shape) != store.header[key][0]]
    if missing or extra or wrong:
        raise SoupError(f"the pre-trained model does not match the ingredients: keys missing {missing[:5]}, extra "
                        f"{extra[:5]}, other shapes {wrong[:5]}; give the model the ingredients were fine-tuned from")
    return {key: anchor[key] for key in store.keys}


def floating_keys(anchor: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys task vectors have: theta_0's floating entries, in its order."""
    return [key for key, value in anchor.items() if value.is_floating_point()]


def ingredient_tensor(store: IngredientStore, index: int, key: str) -> torch.Tensor:
    """Tensor `key` of ingredient `index` in float64, read on its own from the file."""
    return store.load(index, [key])[key].to(torch.float64)


def tensor_task_vectors(store: IngredientStore, anchor: Mapping[str, torch.Tensor], key: str
                        ) -> Iterator[tuple[int, torch.Tensor]]:
    """(k, tau_k[key]) for each ingredient in turn, in float64; one tensor of one ingredient is resident."""
    theta0 = anchor[key].to(torch.float64)
    for index in range(len(store)):
        yield index, ingredient_tensor(store, index, key) - theta0


def summed(store: IngredientStore, anchor: Mapping[str, torch.Tensor], key: str, prune: Prune | None = None
           ) -> torch.Tensor:
    """sum_k tau_k[key] (each pruned by `prune` first, when given), one pass over the ingredients."""
    total = None
    for index, tau in tensor_task_vectors(store, anchor, key):
        value = prune(index, tau) if prune else tau
        total = value.clone() if total is None else total.add_(value)
    return total


def anchored_state(anchor: Mapping[str, torch.Tensor], dtype: torch.dtype, delta: Callable[[str], torch.Tensor],
                   scale: float = 1.0) -> State:
    """theta_0 + scale * delta(key) in `dtype`, built key by key in theta_0's order (`delta` in float64, computed as
    its key is reached); entries that are not floating are theta_0's."""
    return {key: ((value.to(torch.float64) + scale * delta(key)).to(dtype) if value.is_floating_point()
                  else value.clone())
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


def group_cosines(store: IngredientStore, anchor: Mapping[str, torch.Tensor], keys: Sequence[str],
                  group_of: Mapping[str, int], groups: int) -> list[float]:
    """Per group g of `keys`, the mean pairwise cosine of the task vectors restricted to g. Two passes, one tensor of
    one ingredient resident: the norms ||tau_k||_g, then sum_k tau_k / ||tau_k||_g tensor by tensor, of which only the
    squared norm is kept. The sums are Python floats (float64, as 0-dim tensors would be): thousands of small tensors
    kept across the passes would pin the C heap between the passes' temporaries, and it grew with K (to ~5 models)."""
    K = len(store)
    squares = [[0.0] * K for _ in range(groups)]
    for key in keys:
        for index, tau in tensor_task_vectors(store, anchor, key):
            squares[group_of[key]][index] += float((tau ** 2).sum())
    norms = [[math.sqrt(square) for square in row] for row in squares]
    aligned = [0.0] * groups
    for key in keys:
        group = group_of[key]
        direction = torch.zeros_like(anchor[key], dtype=torch.float64)
        for index, tau in tensor_task_vectors(store, anchor, key):
            if norms[group][index] > 0:
                direction += tau / norms[group][index]
        aligned[group] += float((direction ** 2).sum())
    return [mean_cosine_from_sums(aligned[group], sum(norm > 0 for norm in norms[group]), K) for group in range(groups)]


def mean_pairwise_cosine(store: IngredientStore, anchor: Mapping[str, torch.Tensor]) -> float:
    """The mean pairwise cosine of the whole-model task vectors (every floating entry), one tensor resident."""
    keys = floating_keys({key: anchor[key] for key in store.keys})
    return group_cosines(store, anchor, keys, dict.fromkeys(keys, 0), 1)[0]


def disjoint_mean(store: IngredientStore, anchor: Mapping[str, torch.Tensor], key: str, prune: Prune) -> torch.Tensor:
    """The TIES merge of tensor `key` of the pruned task vectors: per entry, the mean of the pruned tau_k whose sign
    is the sign of their sum (0 where none agrees). Two passes over the ingredients; the pruning is recomputed in the
    second."""
    elected = torch.sign(summed(store, anchor, key, prune))
    total, count = torch.zeros_like(elected), torch.zeros_like(elected)
    for index, tau in tensor_task_vectors(store, anchor, key):
        value = prune(index, tau)
        agrees = (torch.sign(value) == elected) & (value != 0)
        total += torch.where(agrees, value, 0.0)
        count += agrees
    return total / count.clamp(min=1)


def disjoint_merge(store: IngredientStore, anchor: Mapping[str, torch.Tensor], dtype: torch.dtype, pruning: Pruning,
                   scale: float) -> dict[str, torch.Tensor]:
    """theta_0 + scale * (the disjoint mean of the pruned task vectors), in `dtype`, tensor by tensor."""
    return anchored_state(anchor, dtype, lambda key: disjoint_mean(store, anchor, key, pruning()), scale)
