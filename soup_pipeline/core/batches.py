"""What a batch's inputs are and how a model is called on them: one tensor (images: `model(x)`) or a mapping of
named tensors (tokenized text, e.g. input_ids and attention_mask: `model(**inputs)`), and logits either returned
as a tensor or as the `.logits` of a Hugging Face output. Training, the soups and evaluation call models only
through `forward`, so every family's batches take the same path."""

from __future__ import annotations

from typing import Mapping, Union

import torch
from torch import nn
from torch.func import functional_call

Inputs = Union[torch.Tensor, Mapping[str, torch.Tensor]]


def to_device(inputs: Inputs, device: torch.device | str) -> Inputs:
    """The inputs (a tensor or each tensor of a mapping) on `device`."""
    if isinstance(inputs, Mapping):
        return {name: tensor.to(device) for name, tensor in inputs.items()}
    return inputs.to(device)


def forward(model: nn.Module, inputs: Inputs, state: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The model's logits on `inputs` (keyword arguments when they are a mapping); with `state`, the model called
    with those tensors in place of its own (`torch.func.functional_call`, keys it lacks left as they are)."""
    args, kwargs = ((), dict(inputs)) if isinstance(inputs, Mapping) else ((inputs,), {})
    out = model(*args, **kwargs) if state is None else functional_call(model, dict(state), args, kwargs, strict=False)
    return out if isinstance(out, torch.Tensor) else out.logits
