"""Which model of a run to register when `tracking.register_method` is `auto`: the one select data prefer.

The candidates are the models a run built (every soup, and the best individual fine-tune; not the ensemble,
which is K models). Select sets are small, and a candidate whose setting was itself chosen on select data
(`mehl_soup_auto`'s grouping, a merge method's grid point) looks better there than it is, so a higher
select accuracy alone is weak evidence. The rule keeps a reference, greedy soup (the best individual when
greedy soup is not built), unless a candidate beats it on select data by a paired test: the lower end of
the paired-bootstrap 95% interval of its select accuracy minus the reference's, resampled by source image
(the views of one image move together), is above zero. Among those, the highest select accuracy wins
(the first on ties). Test data never decide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from .errors import SoupError
from .statistics import paired_comparison

REFERENCE = "greedy"
FALLBACK_REFERENCE = "best_individual"
NOT_CANDIDATES = ("zero_shot", "ensemble")  # the zero-shot model is not a fine-tune; the ensemble is K models


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
            return (f"{self.reference} kept: no candidate's select accuracy is above it by a paired 95% interval "
                    "that excludes zero")
        row = next(r for r in self.candidates if r["method"] == self.method)
        return (f"{self.method}: select accuracy {row['select_acc']:.4f}, {row['select_vs_reference']:+.4f} against "
                f"{self.reference} [{row['ci_low']:+.4f}, {row['ci_high']:+.4f}], the highest of those whose interval "
                "excludes zero")


def choose_on_select(select_correct: Mapping[str, torch.Tensor], groups: Sequence[int] | torch.Tensor, *, seed: int,
                     resamples: int) -> Registration:
    """The registration `auto` makes from each candidate's per-example correctness on the select data
    (`groups`: the source image of each select example). Names in NOT_CANDIDATES are left out."""
    candidates = {method: correct for method, correct in select_correct.items() if method not in NOT_CANDIDATES}
    reference = REFERENCE if REFERENCE in candidates else FALLBACK_REFERENCE
    if reference not in candidates:
        raise SoupError(f"choosing the model to register needs greedy soup or the best individual among the "
                        f"candidates, got {sorted(candidates)}")
    rows = []
    for method, correct in candidates.items():
        row = {"method": method, "select_acc": float(torch.as_tensor(correct).float().mean())}
        if method == reference:
            row.update(select_vs_reference=0.0, ci_low=0.0, ci_high=0.0, mcnemar_p=1.0)
        else:
            stats = paired_comparison(correct, candidates[reference], seed=seed, groups=groups, n_resamples=resamples)
            row.update(select_vs_reference=stats["diff"], ci_low=stats["ci_low"], ci_high=stats["ci_high"],
                       mcnemar_p=stats["p_value"])
        rows.append(row)
    better = [row for row in rows if row["method"] != reference and row["ci_low"] > 0]
    chosen = max(better, key=lambda row: row["select_acc"])["method"] if better else reference
    for row in rows:
        row["chosen"] = row["method"] == chosen
    return Registration(method=chosen, reference=reference, candidates=rows)
