"""`register_method: auto` (soup_pipeline.evaluation.selection): greedy soup is kept unless a candidate's select
loss is lower by a paired interval (resampled by source image) that excludes zero; test data are not an input."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from soup_pipeline.evaluation import selection
from soup_pipeline.evaluation.selection import choose_on_select, compared_rows
from soup_pipeline.runtime.errors import SoupError

N = 600  # select examples: 200 source images x 3 views
GROUPS = torch.arange(N) // 3
GREEDY = torch.full((N,), 0.8, dtype=torch.float64)  # greedy soup's per-example select loss


def choose(groups=GROUPS, **losses):
    correct = {method: values < 0.7 for method, values in losses.items()}
    return choose_on_select(losses, correct, groups, seed=0, resamples=2000)


def noisy(mean: float, spread: float, seed: int) -> torch.Tensor:
    return mean + spread * torch.randn(N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_a_candidate_whose_select_loss_is_clearly_lower_is_registered_with_its_evidence():
    learned = noisy(0.6, 0.1, seed=0)
    chosen = choose(best_individual=GREEDY + 0.1, greedy=GREEDY, mehl_soup_auto=learned)
    assert chosen.method == "mehl_soup_auto" and chosen.reference == "greedy"
    row = next(r for r in chosen.candidates if r["method"] == "mehl_soup_auto")
    assert (row["loss_vs_reference"] == pytest.approx(float(learned.mean()) - 0.8) and row["ci_high"] < 0
            and row["chosen"])
    assert row["select_acc"] == pytest.approx(float((learned < 0.7).double().mean()))
    assert chosen.reason.startswith(f"mehl_soup_auto: select loss {row['select_loss']:.4f}, ")


def test_greedy_is_kept_where_a_learned_soup_is_worse_or_not_clearly_better_on_select():
    assert choose(greedy=GREEDY, best_individual=GREEDY, mehl_soup_auto=noisy(0.9, 0.1, seed=1)).method == "greedy"
    barely = GREEDY - 0.002 + torch.where(torch.arange(N) % 2 == 0, 0.3, -0.3)  # 0.002 lower on average, very noisy
    chosen = choose(greedy=GREEDY, mehl_soup_auto=barely)
    row = next(r for r in chosen.candidates if r["method"] == "mehl_soup_auto")
    assert row["select_loss"] < 0.8 and row["ci_low"] < 0 < row["ci_high"]
    assert chosen.method == "greedy" and chosen.reason.startswith("greedy kept")


def test_among_clearly_better_candidates_the_lowest_select_loss_wins_the_first_on_ties():
    good, better = GREEDY - 0.1, GREEDY - 0.2
    assert choose(greedy=GREEDY, ties=good, mehl_soup_auto=better).method == "mehl_soup_auto"
    assert choose(greedy=GREEDY, ties=better, mehl_soup_auto=better.clone()).method == "ties"


def test_the_ensemble_and_the_zero_shot_model_are_never_registered_and_without_greedy_the_best_individual_is_the_bar():
    perfect = torch.zeros(N, dtype=torch.float64)
    chosen = choose(zero_shot=perfect, ensemble=perfect, best_individual=GREEDY, uniform=GREEDY + 0.5)
    assert chosen.method == "best_individual" and chosen.reference == "best_individual"
    assert {row["method"] for row in chosen.candidates} == {"best_individual", "uniform"}
    with pytest.raises(SoupError, match="needs greedy soup or the best individual"):
        choose(uniform=GREEDY)
    with pytest.raises(SoupError, match="one per select example"):
        choose(greedy=GREEDY, uniform=GREEDY[:10])


def test_the_interval_resamples_whole_source_images():
    # the three views of each source image move together: resampled by image the interval is wider than by view
    per_image = torch.randn(N // 3, generator=torch.Generator().manual_seed(3),
                            dtype=torch.float64).repeat_interleave(3)
    learned = GREEDY - 0.05 + 0.3 * per_image
    rows = {name: next(r for r in choose(groups, greedy=GREEDY, learned=learned).candidates if r["method"] == "learned")
            for name, groups in (("image", GROUPS), ("view", torch.arange(N)))}
    width = {name: row["ci_high"] - row["ci_low"] for name, row in rows.items()}
    assert width["image"] > 1.4 * width["view"]


def test_the_interval_pairs_each_candidate_loss_with_the_reference_loss_on_the_same_example():
    # the reference's loss varies a lot from image to image; the candidate tracks it closely, 0.01 lower everywhere:
    # paired by example it is clearly better, while two independent resamplings of the two losses could not tell
    image = torch.Generator().manual_seed(4)
    hard = torch.rand(N // 3, generator=image, dtype=torch.float64).repeat_interleave(3)
    greedy = 0.3 + 1.5 * hard + 0.1 * torch.rand(N, generator=image, dtype=torch.float64)
    tracking = greedy - 0.01 + 0.005 * torch.randn(N, generator=image, dtype=torch.float64)
    chosen = choose(greedy=greedy, mehl_soup_auto=tracking)
    row = next(r for r in chosen.candidates if r["method"] == "mehl_soup_auto")
    assert row["loss_vs_reference"] == pytest.approx(-0.01, abs=1e-3)
    assert row["ci_high"] < 0, row
    assert chosen.method == "mehl_soup_auto"
    # the same test unpaired (each loss resampled by image with indices of its own) keeps zero inside its interval
    rng = np.random.default_rng(0)
    draws = [rng.integers(0, N // 3, size=(2000, N // 3)) for _ in range(2)]
    per_image = [values.numpy().reshape(-1, 3).mean(1) for values in (tracking, greedy)]
    unpaired = per_image[0][draws[0]].mean(1) - per_image[1][draws[1]].mean(1)
    low, high = np.quantile(unpaired, [0.025, 0.975])
    assert low < 0 < high


def test_greedy_is_the_reference_of_every_row_and_rows_without_greedy_have_no_comparison():
    test = torch.tensor([True, False] * 50)
    correct = {"best_individual": {"fit": test, "test": test}, "greedy": {"fit": test, "test": ~test}}
    rows = compared_rows(correct, seed=0, resamples=200, extra={"best_individual": {"member": "ft-0"}})
    assert [row["method"] for row in rows] == ["best_individual", "greedy"] and rows[0]["member"] == "ft-0"
    assert rows[0]["test_vs_greedy"] == pytest.approx(0.0) and rows[1]["test_vs_greedy"] == 0.0
    assert list(rows[0])[:2] == ["member", "method"]
    assert "test_vs_greedy" not in compared_rows({"uniform": correct["greedy"]}, seed=0, resamples=200)[0]


def test_the_registration_decision_has_one_owner():
    """The reference's and the best individual's names, the decision's file and the comparison with greedy soup are
    written in evaluation/selection.py only; every other module of the package imports them from there."""
    owner = Path(selection.__file__)
    spelled = re.compile(r"""["']best_individual["']|registration\.json["']|^REFERENCE\s*=|compare_to_reference\(""",
                         re.MULTILINE)
    elsewhere = {str(path.relative_to(owner.parents[1])): spelled.findall(path.read_text())
                 for path in owner.parents[1].rglob("*.py") if path != owner}
    assert ({path: found for path, found in elsewhere.items() if found}
            == {"evaluation/scoring.py": ["compare_to_reference("]})
