"""DARE (Yu et al., 2024): drop each entry of each task vector with probability p, rescale the rest by 1/(1-p).

`dare` then adds the rescaled vectors as task arithmetic does; `dare_ties` merges them as TIES does
(sign election and the mean of the agreeing entries), the drop taking the place of TIES's trim.
The drop masks are seeded by `seed` and the ingredient's index, tensor by tensor in key order (the
soup is built key by key, so each ingredient keeps its own generator across keys, and TIES's second
pass over a key's tensors rewinds it to draw the same masks again). Exactly: for ingredient k (0-based,
in the store's order) one CPU `torch.Generator().manual_seed(seed * 1_000_003 + k)` draws, for each
floating tensor of tau_k in turn in the store's key order (the sorted names a safetensors header
lists; integer tensors draw nothing), `torch.rand(shape, generator=..., dtype=torch.float64)`; an
entry is kept, and divided by 1 - p, where its draw is >= p, and dropped (set to 0) where it is below.
"""

from __future__ import annotations

from typing import ClassVar, Mapping

import torch

from ...core.ingredients import IngredientStore
from ..engine.base import MethodSpec, Objective, SoupResult
from ..engine.layers import Grid
from ..engine.task_vectors import (
    DropRate,
    Prune,
    Pruning,
    Scale,
    ScaledParams,
    anchored_result,
    anchored_state,
    checked_anchor,
    disjoint_merge,
    model_dtype,
    summed,
)


class DareGrid(Grid):
    SETS: ClassVar[dict[str, str]] = {"scales": "scale", "drops": "drop"}
    scales: list[Scale] = [0.05, 0.075, 0.1, 0.15, 0.2, 0.5, 1.0]
    drops: list[DropRate] = [0.5, 0.9]


class DareTiesGrid(DareGrid):
    scales: list[Scale] = [0.25, 0.5, 1.0, 1.5]


class DareParams(ScaledParams):
    drop: DropRate = 0.5  # p
    search: DareGrid = DareGrid()


class DareTiesParams(DareParams):
    search: DareTiesGrid = DareTiesGrid()


def dropper(drop: float, seed: int, K: int) -> Pruning:
    """Pruning: tau_k with each entry dropped with probability `drop` and the rest scaled by 1 / (1 - drop); ingredient
    k's generator draws its masks key after key, and is rewound to the key's start when a key's tensor is pruned
    again."""
    generators = [torch.Generator().manual_seed(seed * 1_000_003 + index) for index in range(K)]

    def next_key() -> Prune:
        starts = [generator.get_state() for generator in generators]

        def prune(index: int, tau: torch.Tensor) -> torch.Tensor:
            generators[index].set_state(starts[index])
            draws = torch.rand(tau.shape, generator=generators[index], dtype=torch.float64)
            return torch.where(draws >= drop, tau / (1 - drop), 0.0)
        return prune
    return next_key


def dare(store: IngredientStore, objective: Objective, params: DareParams, *,
         anchor: Mapping[str, torch.Tensor] | None = None, name: str = "dare") -> SoupResult:
    """theta_0 + scale * sum_k (tau_k dropped and rescaled)."""
    theta0 = checked_anchor(store, anchor, name)
    pruning = dropper(params.drop, params.seed, len(store))
    state = anchored_state(theta0, model_dtype(objective), lambda key: summed(store, theta0, key, pruning()),
                           params.scale)
    return anchored_result(store, name, state, torch.full((len(store), 1), params.scale, dtype=torch.float64),
                           ["model"], {})


def dare_ties(store: IngredientStore, objective: Objective, params: DareTiesParams, *,
              anchor: Mapping[str, torch.Tensor] | None = None, name: str = "dare_ties") -> SoupResult:
    """theta_0 + scale * (the TIES merge of the dropped and rescaled task vectors)."""
    theta0 = checked_anchor(store, anchor, name)
    state = disjoint_merge(store, theta0, model_dtype(objective), dropper(params.drop, params.seed, len(store)),
                           params.scale)
    beta = torch.full((len(store), 1), params.scale / len(store), dtype=torch.float64)  # nominal: where all agree
    return anchored_result(store, name, state, beta, ["model"], {})


SPECS = (MethodSpec("dare", dare, DareParams, anchored=True, searched=True),
         MethodSpec("dare_ties", dare_ties, DareTiesParams, anchored=True, searched=True))
