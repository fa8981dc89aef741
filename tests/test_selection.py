"""`register_method: auto` (soup_pipeline.selection): greedy soup is kept unless a candidate beats it on select
data by a paired interval that excludes zero; test data are not an input."""

from __future__ import annotations

import pytest
import torch

from soup_pipeline.errors import SoupError
from soup_pipeline.selection import choose_on_select

N = 600  # select examples: 200 source images x 3 views
GROUPS = torch.arange(N) // 3


def correct_on(indices) -> torch.Tensor:
    out = torch.zeros(N, dtype=torch.bool)
    out[list(indices)] = True
    return out


def choose(**select):
    return choose_on_select(select, GROUPS, seed=0, resamples=2000)


GREEDY = correct_on(range(420))  # 70% of the select examples


def test_a_candidate_clearly_better_on_select_is_registered():
    learned = correct_on(range(480))  # every example greedy gets right, and 60 more (20 source images' views)
    chosen = choose(best_individual=correct_on(range(400)), greedy=GREEDY, mehl_soup_auto=learned)
    assert chosen.method == "mehl_soup_auto" and chosen.reference == "greedy"
    row = next(r for r in chosen.candidates if r["method"] == "mehl_soup_auto")
    assert row["select_vs_reference"] == pytest.approx(0.1) and row["ci_low"] > 0 and row["chosen"]
    assert "mehl_soup_auto: select accuracy 0.8000, +0.1000 against greedy" in chosen.reason


def test_greedy_is_kept_where_a_learned_soup_is_worse_or_not_clearly_better_on_select():
    worse = correct_on(range(390))
    assert choose(greedy=GREEDY, best_individual=GREEDY, mehl_soup_auto=worse).method == "greedy"
    swapped = correct_on([*range(3, 420), 420, 421, 422, 423, 424, 425])  # 3 lost, 6 gained: +0.5 points
    chosen = choose(greedy=GREEDY, mehl_soup_auto=swapped)
    row = next(r for r in chosen.candidates if r["method"] == "mehl_soup_auto")
    assert row["select_acc"] > 0.7 and row["ci_low"] <= 0 < row["ci_high"]
    assert chosen.method == "greedy" and "greedy kept" in chosen.reason


def test_among_clearly_better_candidates_the_highest_select_accuracy_wins_the_first_on_ties():
    good, better = correct_on(range(480)), correct_on(range(510))
    assert choose(greedy=GREEDY, ties=good, mehl_soup_auto=better).method == "mehl_soup_auto"
    assert choose(greedy=GREEDY, ties=better, mehl_soup_auto=correct_on(range(510))).method == "ties"


def test_the_ensemble_and_the_zero_shot_model_are_never_registered_and_without_greedy_the_best_individual_is_the_bar():
    perfect = correct_on(range(N))
    chosen = choose(zero_shot=perfect, ensemble=perfect, best_individual=GREEDY, uniform=correct_on(range(300)))
    assert chosen.method == "best_individual" and chosen.reference == "best_individual"
    assert {row["method"] for row in chosen.candidates} == {"best_individual", "uniform"}
    with pytest.raises(SoupError, match="needs greedy soup or the best individual"):
        choose(uniform=GREEDY)


def test_the_interval_resamples_whole_source_images():
    # 20 source images whose 3 views all flip together: resampled by image the interval is wider than by view
    learned = correct_on([*range(60, 420), *range(420, 480)])  # 60 views lost, 60 gained: a difference of 0
    by_image = choose_on_select({"greedy": GREEDY, "learned": learned}, GROUPS, seed=0, resamples=2000)
    by_view = choose_on_select({"greedy": GREEDY, "learned": learned}, torch.arange(N), seed=0, resamples=2000)
    width = {name: row["ci_high"] - row["ci_low"] for name, chosen in (("image", by_image), ("view", by_view))
             for row in chosen.candidates if row["method"] == "learned"}
    assert width["image"] > 1.3 * width["view"]
