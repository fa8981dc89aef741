"""Which model of a run to register when `tracking.register_method` is `auto`: the one select data prefer.

The candidates are the models a run built (every soup, and the best individual fine-tune; not the ensemble,
which is K models). Select sets are small, and a candidate whose setting was itself chosen on select data
(`mehl_soup_auto`'s grouping, a merge method's grid point) looks better there than it is, so the rule keeps a
reference, greedy soup (the best individual when greedy soup is not built), unless a candidate beats it on
select data by a paired test: its per-example cross-entropy on the same select images is lower, with the
paired-bootstrap 95% interval of the mean difference, resampled by source image (the views of one image move
together), entirely below zero. Among those, the lowest mean select loss wins (the first on ties). The loss,
not the accuracy: on a few hundred images accuracy moves in steps of a few tenths of a point and rarely
separates two good models, while the loss sees how confident each is on every image. Test data never decide.

This module owns the decision: the reference's name, the best individual's, the rule, the evaluation rows that
compare every model with greedy soup on the test sets (reported, never deciding), and the file the evaluate
stage writes the decision to (`registration_file`), read by the tracking layer to register the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..runtime.errors import SoupError
from .scoring import accuracies, compare_to_reference
from .statistics import bootstrap_mean_interval

REFERENCE = "greedy"  # greedy soup, the practical default: every model is compared with it, and `auto` keeps it
# unless beaten
BEST_INDIVIDUAL = "best_individual"  # the fine-tune with the highest fit accuracy: a row of every evaluation, and
# the reference where greedy soup is not built
NOT_CANDIDATES = ("zero_shot", "ensemble")  # the zero-shot model is not a fine-tune; the ensemble is K models
REGISTRATION_FILE = "registration.json"  # the decision, in the evaluation's folder (runs/eval/)


def registration_file(eval_dir: str | Path) -> Path:
    """Where the evaluate stage writes the decision (`Registration.as_dict`): `eval_dir`/registration.json."""
    return Path(eval_dir) / REGISTRATION_FILE


def compared_rows(correct: Mapping[str, Mapping[str, torch.Tensor]], *, seed: int, resamples: int,
                  extra: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict]:
    """One row per model of `correct` (method -> split -> per-example correctness): its `extra` columns, its
    accuracy on every split, and where greedy soup is among them the paired comparison with it on the test sets
    (`scoring.compare_to_reference`, seeded; reported, never deciding)."""
    extra = extra or {}
    rows = []
    for method, values in correct.items():
        row = {**extra.get(method, {}), "method": method, **accuracies(values)}
        if REFERENCE in correct:
            row.update(compare_to_reference(values, correct[REFERENCE], name=REFERENCE, seed=seed, resamples=resamples))
        rows.append(row)
    return rows


@dataclass(frozen=True)
class Registration:
    """The model to register, the reference it had to beat, and one evidence row per candidate."""

    method: str
    reference: str
    candidates: list[dict]

    @property
    def reason(self) -> str:
        """One sentence: why this model."""
        if self.method == self.reference:
            return (f"{self.reference} kept: no candidate's select loss is below it by a paired 95% interval "
                    "that excludes zero")
        row = next(r for r in self.candidates if r["method"] == self.method)
        return (f"{self.method}: select loss {row['select_loss']:.4f}, {row['loss_vs_reference']:+.4f} against "
                f"{self.reference} [{row['ci_low']:+.4f}, {row['ci_high']:+.4f}] (select accuracy "
                f"{row['select_acc']:.4f}), the lowest of those whose interval excludes zero")

    def as_dict(self) -> dict:
        """The content of registration.json: method, reference, reason and the candidates' evidence."""
        return {"method": self.method, "reference": self.reference, "reason": self.reason,
                "candidates": self.candidates}


def choose_on_select(select_losses: Mapping[str, torch.Tensor], select_correct: Mapping[str, torch.Tensor],
                     groups: Sequence[int] | torch.Tensor | None, *, seed: int, resamples: int) -> Registration:
    """The registration `auto` makes from each candidate's per-example cross-entropy and correctness on the select
    data (`groups`: the source image of each select example, or None). Names in NOT_CANDIDATES are left out."""
    candidates = [method for method in select_losses if method not in NOT_CANDIDATES]
    reference = REFERENCE if REFERENCE in candidates else BEST_INDIVIDUAL
    if reference not in candidates:
        raise SoupError(f"choosing the model to register needs greedy soup or the best individual among the "
                        f"candidates, got {sorted(candidates)}")
    bar = torch.as_tensor(select_losses[reference], dtype=torch.float64)
    rows = []
    for method in candidates:
        losses = torch.as_tensor(select_losses[method], dtype=torch.float64)
        if losses.shape != bar.shape:
            raise SoupError(f"{method} has {losses.numel()} select losses, {reference} {bar.numel()}: pass one per "
                            "select example, in the same order")
        difference = losses - bar
        low, high = (0.0, 0.0) if method == reference else bootstrap_mean_interval(
            difference.numpy(), seed=seed, n_resamples=resamples, groups=groups)
        rows.append({"method": method, "select_loss": float(losses.mean()),
                     "select_acc": float(torch.as_tensor(select_correct[method]).double().mean()),
                     "loss_vs_reference": float(difference.mean()), "ci_low": low, "ci_high": high})
    better = [row for row in rows if row["method"] != reference and row["ci_high"] < 0]
    chosen = min(better, key=lambda row: row["select_loss"])["method"] if better else reference
    for row in rows:
        row["chosen"] = row["method"] == chosen
    return Registration(method=chosen, reference=reference, candidates=rows)
