"""Evaluation, the one place accuracy and loss are computed: logits, per-example correctness and accuracy
of a model (an ingredient, a soup, the ensemble) on every split, and the paired comparison of each
method against a reference method on the same examples."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..core.batches import forward, to_device
from ..core.data import DataSplits
from ..core.reading import sequential_batches
from ..core.settings import Precision
from ..runtime.precision import autocast
from .statistics import paired_comparison

SPLIT_COLUMNS = {"fit": "fit_acc", "select": "select_acc", "test": "test_acc", "test_shift": "shifted_test_acc"}
Predict = Callable[[Dataset], torch.Tensor]  # data set -> logits [N, classes]


@torch.no_grad()
def model_outputs(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device, *,
                  workers: int | None = 0, precision: Precision = "float32") -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) of a model over a whole data set, read once, in data set order (by `workers` DataLoader
    processes, `core.reading`), on the CPU (bfloat16 and half-precision logits promoted to float32)."""
    model.eval()
    logits, targets = [], []
    for inputs, batch_targets in sequential_batches(dataset, batch_size, workers=workers, device=device):
        with autocast(precision, device):
            logits.append(forward(model, to_device(inputs, device)).cpu())
        targets.append(batch_targets)
    out = torch.cat(logits)
    return out.to(torch.promote_types(out.dtype, torch.float32)), torch.cat(targets)


def model_logits(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device, *,
                 workers: int | None = 0, precision: Precision = "float32") -> torch.Tensor:
    """Logits of a model over a whole data set, in data set order, on the CPU."""
    return model_outputs(model, dataset, batch_size, device, workers=workers, precision=precision)[0]


def dataset_targets(dataset: Dataset, batch_size: int = 1024) -> torch.Tensor:
    """All targets of a data set, in order."""
    return torch.cat([targets for _, targets in sequential_batches(dataset, batch_size)])


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy."""
    return float((logits.argmax(-1) == targets).float().mean())


def loss_and_accuracy(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device,
                      loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
                      ) -> tuple[float, float]:
    """(mean loss, top-1 accuracy) of a model over a whole data set."""
    logits, targets = model_outputs(model, dataset, batch_size, device)
    return float(loss_fn(logits, targets)), accuracy(logits, targets)


def predictor(model: nn.Module, batch_size: int, device: torch.device, *, workers: int | None = 0,
              precision: Precision = "float32") -> Predict:
    """`predict(dataset) -> logits` of a model (read by `workers` processes, in `precision`)."""
    return lambda dataset: model_logits(model, dataset, batch_size, device, workers=workers, precision=precision)


def split_outcomes(predict: Predict, splits: DataSplits,
                   roles: Sequence[str] = tuple(SPLIT_COLUMNS)
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per split of `roles` present: whether each example is classified right (bool) and its cross-entropy, in
    data set order."""
    correct, losses = {}, {}
    for split in roles:
        dataset = getattr(splits, split)
        if dataset is not None:
            logits, targets = predict(dataset), dataset_targets(dataset)
            correct[split] = logits.argmax(-1) == targets
            losses[split] = F.cross_entropy(logits.double(), targets, reduction="none")
    return correct, losses


def split_correctness(predict: Predict, splits: DataSplits,
                      roles: Sequence[str] = tuple(SPLIT_COLUMNS)) -> dict[str, torch.Tensor]:
    """Per split of `roles` present: whether each example is classified right (bool, in data set order)."""
    return split_outcomes(predict, splits, roles)[0]


def accuracies(correct: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """{"fit_acc": ..., "select_acc": ..., "test_acc": ..., "shifted_test_acc": ...} from per-split correctness."""
    return {SPLIT_COLUMNS[split]: float(values.float().mean()) for split, values in correct.items()}


def split_accuracies(predict: Predict, splits: DataSplits,
                     roles: Sequence[str] = tuple(SPLIT_COLUMNS)) -> dict[str, float]:
    """Accuracy of `predict` on every split of `roles` present."""
    return accuracies(split_correctness(predict, splits, roles))


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
