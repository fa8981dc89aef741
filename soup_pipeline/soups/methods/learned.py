"""Learned-Soup(+) (Wortsman et al., 2022): softmax mixing weights, all K ingredients resident.

theta_l = sum_k softmax_k(w)_{k,l} theta_{k,l}, w = 0 at the start (uniform), one column for the
whole model or one per layer (+), and a learned logit temperature starting at 1. The gradient
flows through the combination by autograd; the K ingredients are held once (no copies).
"""

from __future__ import annotations

import functools

import torch
from pydantic import Field

from ...core.batches import Inputs, forward
from ...core.ingredients import IngredientStore
from ...core.settings import SoupSettings
from ...runtime.devices import resolve_device
from ..engine.base import (
    HeldOutStream,
    LossLog,
    MethodSpec,
    Objective,
    SoupResult,
    check_ingredient_count,
    mixable_keys,
    step_loss,
    warn_overfitting,
)
from ..engine.layers import LayerwiseParams, group_layers
from ..engine.mixing import MixAll, per_tensor, tensor_columns


class LearnedParams(SoupSettings):
    """Learned-Soup: AdamW on the softmax logits at a constant rate (the reference setting)."""

    lr: float = Field(0.05, gt=0)  # AdamW learning rate on the logits
    epochs: int = Field(5, gt=0)  # passes over the fit data


class LearnedPlusParams(LearnedParams, LayerwiseParams):
    """Learned-Soup+: one softmax column per layer group."""


def learned_soup(store: IngredientStore, objective: Objective, params: LearnedParams, *, layerwise: bool,
                 name: str = "learned_soup") -> SoupResult:
    """Fit softmax weights with AdamW at a constant rate over `params.epochs` passes over the fit data."""
    K = len(store)
    check_ingredient_count(store)
    device = resolve_device(params.device)
    model = objective.model_factory()
    param_keys, _ = mixable_keys(model, store)
    dtype = next(model.parameters()).dtype
    grouping = group_layers(param_keys, params.grouping if layerwise else "model")
    warn_overfitting(name, K, grouping.size, len(objective.fit))

    other_keys = [k for k in store.keys if k not in set(param_keys)]
    model.load_state_dict(store.centre(other_keys, dtype=dtype), strict=False)
    model.to(device).eval()
    stacked = store.load_stacked(range(K), param_keys)
    for key in param_keys:  # in place, so the store keeps counting the K ingredients
        stacked[key] = stacked[key].to(device)
    columns = tensor_columns(grouping, param_keys, device)

    logits_w = torch.zeros(K, grouping.size, dtype=dtype, device=device, requires_grad=True)
    temperature = torch.ones((), dtype=dtype, device=device, requires_grad=True)
    optimizer = torch.optim.AdamW([logits_w, temperature], lr=params.lr, weight_decay=0.0)
    stream = HeldOutStream(len(objective.fit), params.batch_size, params.seed)
    losses = LossLog()

    def mixed(weights: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(param_keys, MixAll.apply(per_tensor(weights, columns), *stacked.values())))

    def logits_of(inputs: Inputs) -> torch.Tensor:
        return forward(model, inputs, mixed(torch.softmax(logits_w, 0))) * temperature

    steps = params.epochs * stream.batches_per_pass
    for step in range(steps):
        optimizer.zero_grad()
        loss = step_loss(logits_of, objective, stream, device)
        losses.add(loss, f"step {step}")
        loss.backward()
        optimizer.step()
        if (step + 1) % stream.batches_per_pass == 0:
            losses.flush()

    with torch.no_grad():
        weights = torch.softmax(logits_w, 0)
        for key, value in mixed(weights).items():
            model.get_parameter(key).copy_(value)
    state_dict = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return SoupResult(method=name, state_dict=state_dict, beta=weights.detach().cpu().double(),
                      layer_names=grouping.names, ingredient_names=[i.name for i in store.ingredients],
                      history=losses.values,
                      info={"K": K, "L": grouping.size, "steps": steps, "temperature": float(temperature.detach())})


SPECS = (
    MethodSpec("learned_soup", functools.partial(learned_soup, layerwise=False), LearnedParams),
    MethodSpec("learned_soup_plus", functools.partial(learned_soup, layerwise=True), LearnedPlusParams),
)
