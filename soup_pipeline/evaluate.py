"""Evaluation: logits, per-example correctness and accuracy of soups and of the ensemble on every split,
and the paired comparison of each method against a reference method on the same examples."""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn
from torch.utils.data import Dataset

from .data import DataSplits
from .soups.base import Objective, SoupResult, model_at, resolve_device, sequential_batches
from .statistics import paired_comparison

SPLIT_COLUMNS = {"fit": "fit_acc", "select": "select_acc", "test": "test_acc", "test_shift": "shifted_test_acc"}
Predict = Callable[[Dataset], torch.Tensor]  # data set -> logits [N, classes]


@torch.no_grad()
def model_logits(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device) -> torch.Tensor:
    """Logits of a model over a whole data set, in data set order, on the CPU."""
    model.eval()
    return torch.cat([model(inputs.to(device)).float().cpu() for inputs, _ in sequential_batches(dataset, batch_size)])


def dataset_targets(dataset: Dataset, batch_size: int = 1024) -> torch.Tensor:
    """All targets of a data set, in order."""
    return torch.cat([targets for _, targets in sequential_batches(dataset, batch_size)])


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy."""
    return float((logits.argmax(-1) == targets).float().mean())


def predictor(model: nn.Module, batch_size: int, device: torch.device) -> Predict:
    """`predict(dataset) -> logits` of a model."""
    return lambda dataset: model_logits(model, dataset, batch_size, device)


def split_correctness(predict: Predict, splits: DataSplits) -> dict[str, torch.Tensor]:
    """Per split present: whether each example is classified right (bool, in data set order)."""
    out = {}
    for split in SPLIT_COLUMNS:
        dataset = getattr(splits, split)
        if dataset is not None:
            out[split] = predict(dataset).argmax(-1) == dataset_targets(dataset)
    return out


def accuracies(correct: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """{"fit_acc": ..., "select_acc": ..., "test_acc": ..., "shifted_test_acc": ...} from per-split correctness."""
    return {SPLIT_COLUMNS[split]: float(values.float().mean()) for split, values in correct.items()}


def split_accuracies(predict: Predict, splits: DataSplits) -> dict[str, float]:
    """Accuracy of `predict` on every split present."""
    return accuracies(split_correctness(predict, splits))


def compare_to_reference(correct: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], *, name: str,
                         seed: int, resamples: int) -> dict[str, float]:
    """Test and shifted-test accuracy minus the reference's (called `name`), on the same examples: the paired
    difference `test_vs_NAME`, its seeded paired-bootstrap 95% interval `test_ci_low` / `test_ci_high` and
    the exact McNemar p-value `test_mcnemar_p` (and the same with the prefix `shifted_test`)."""
    out = {}
    for split, prefix in (("test", "test"), ("test_shift", "shifted_test")):
        if split in correct and split in reference:
            stats = paired_comparison(correct[split], reference[split], seed=seed, n_resamples=resamples)
            out.update({f"{prefix}_vs_{name}": stats["diff"], f"{prefix}_ci_low": stats["ci_low"],
                        f"{prefix}_ci_high": stats["ci_high"], f"{prefix}_mcnemar_p": stats["p_value"]})
    return out


def result_logits(result: SoupResult, objective: Objective, dataset: Dataset, device: str = "auto") -> torch.Tensor:
    """Logits of a soup (its state dict in the objective's model) or of the ensemble."""
    target = resolve_device(device)
    if result.state_dict is None:
        return result.info["predict"](dataset)
    return model_logits(model_at(objective, result.state_dict, target), dataset, objective.batch_size, target)
