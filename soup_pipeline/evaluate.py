"""Evaluation: logits and accuracy of soups and of the ensemble on any data set."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from .soups.base import Objective, SoupResult, model_at, resolve_device, sequential_batches


@torch.no_grad()
def model_logits(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device) -> torch.Tensor:
    """Logits of a model over a whole data set, in data set order, on the CPU."""
    model.eval()
    return torch.cat([model(inputs.to(device)).float().cpu() for inputs, _ in sequential_batches(dataset, batch_size)])


def dataset_targets(dataset: Dataset, batch_size: int = 1024) -> torch.Tensor:
    """All targets of a data set, in order."""
    return torch.cat([targets for _, targets in sequential_batches(dataset, batch_size)])


def result_logits(result: SoupResult, objective: Objective, dataset: Dataset, device: str = "auto") -> torch.Tensor:
    """Logits of a soup (its state dict in the objective's model) or of the ensemble."""
    target = resolve_device(device)
    if result.state_dict is None:
        return result.info["predict"](dataset)
    return model_logits(model_at(objective, result.state_dict, target), dataset, objective.batch_size, target)


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy."""
    return float((logits.argmax(-1) == targets).float().mean())
