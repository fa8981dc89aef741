"""Do the fine-tunes share a basin? A diagnostic of whether souping can help, read after the sweep.

Souping averages weights; it pays when the fine-tunes sit in one basin of the loss, where their
average is at least as good as its members. Two numbers say whether they do:

- the gap between the best member's fit accuracy and the uniform soup's (their plain average): a few
  points at most when they share a basin (0 to 6.5 points over the embedded default's five sweeps, where
  souping pays off), far more when they do not;
- the mean pairwise cosine of their task vectors tau_k = theta_k - theta_0 (how aligned the fine-tunes'
  moves from the pre-trained model are).

Above `evaluate.basin_gap` the run warns once: greedy soup then falls back to the best member, and a
learned soup that starts from the uniform centre can end below it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

import torch

from ...core.ingredients import IngredientStore
from ...evaluation.scoring import loss_and_accuracy
from ..engine.base import Objective, best_individual, model_at
from ..engine.task_vectors import checked_anchor, mean_pairwise_cosine


@dataclass(frozen=True)
class Basin:
    """The diagnostic's numbers and the gap above which the members are said to sit apart."""

    uniform_fit_acc: float
    best_fit_acc: float
    mean_cosine: float | None  # None where theta_0 is not known for these ingredients
    gap_limit: float

    @property
    def gap(self) -> float:
        """The best member's fit accuracy minus the uniform soup's."""
        return self.best_fit_acc - self.uniform_fit_acc

    @property
    def apart(self) -> bool:
        return self.gap > self.gap_limit

    @property
    def summary(self) -> str:
        cosine = ("not measured (no theta_0 for these ingredients)" if self.mean_cosine is None
                  else f"{self.mean_cosine:.3f}")
        return (f"Basin: the uniform soup's fit accuracy is {self.uniform_fit_acc:.4f}, {100 * self.gap:.1f} points "
                f"below the best member's {self.best_fit_acc:.4f}; the mean pairwise cosine of the task vectors is "
                f"{cosine}.")

    @property
    def warning(self) -> str | None:
        """The one warning when the members sit apart, else None."""
        if not self.apart:
            return None
        return (f"uniform soup is {100 * self.gap:.1f} points below the best member on fit data: the fine-tunes do not "
                "share a basin; souping is unlikely to beat the best member (greedy soup falls back to it)")

    def as_dict(self) -> dict:
        return {**asdict(self), "gap": self.gap, "apart": self.apart, "warning": self.warning}


def diagnose(store: IngredientStore, objective: Objective, anchor: Mapping[str, torch.Tensor] | None, *,
             gap_limit: float, device: torch.device) -> Basin:
    """The diagnostic of `store`'s members: the uniform soup's and the best member's (by sidecar fit accuracy, as the
    evaluation's best individual) accuracy on `objective.fit`, and the mean pairwise cosine of their task vectors
    from `anchor` (theta_0; None leaves the cosine out); one ingredient resident at a time."""
    dtype = next(objective.model_factory().parameters()).dtype

    def fit_accuracy(state: Mapping[str, torch.Tensor]) -> float:
        return loss_and_accuracy(model_at(objective, state, device), objective.fit, objective.batch_size, device,
                                 objective.loss_fn)[1]

    uniform_fit_acc = fit_accuracy(store.centre(dtype=dtype))
    best_fit_acc = fit_accuracy(store.load(best_individual(store)))
    cosine = (None if anchor is None
              else mean_pairwise_cosine(store, checked_anchor(store, anchor, "the basin diagnostic")))
    return Basin(uniform_fit_acc=uniform_fit_acc, best_fit_acc=best_fit_acc, mean_cosine=cosine, gap_limit=gap_limit)
