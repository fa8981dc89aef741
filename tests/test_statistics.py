"""Paired tests and intervals (soup_pipeline.evaluation.statistics) against hand-computed values, and the seeds
summary."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from soup_pipeline.evaluation.statistics import (
    McNemar,
    mcnemar_exact,
    mean_interval,
    paired_bootstrap_interval,
    paired_comparison,
)
from soup_pipeline.runtime.errors import SoupError

T_975_2_DF = 4.302652729911275  # Student-t 0.975 quantile, 2 degrees of freedom
T_975_4_DF = 2.7764451051977987  # 4 degrees of freedom


def _load_seeds_benchmark():
    """benchmarks/seeds.py is a script, not a package module: load it from its path."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "seeds.py"
    spec = importlib.util.spec_from_file_location("seeds_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


seeds_benchmark = _load_seeds_benchmark()


def _table(a_only: int, b_only: int, both: int = 4, neither: int = 3) -> tuple[list[bool], list[bool]]:
    """Per-example correctness of classifiers a and b with the given 2x2 table."""
    correct_a = [True] * a_only + [False] * b_only + [True] * both + [False] * neither
    correct_b = [False] * a_only + [True] * b_only + [True] * both + [False] * neither
    return correct_a, correct_b


def _two_sided_binomial(a_only: int, b_only: int) -> float:
    discordant = a_only + b_only
    tail = sum(math.comb(discordant, k) for k in range(min(a_only, b_only) + 1)) / 2**discordant
    return min(1.0, 2 * tail)


# --- exact McNemar ---------------------------------------------------------------------------


@pytest.mark.parametrize("a_only, b_only, expected", [
    (0, 5, 2 / 32),
    (1, 9, 2 * (1 + 10) / 1024),
    (3, 3, 1.0),  # 2 * (1 + 6 + 15 + 20) / 64 > 1
    (0, 0, 1.0),  # no discordant pairs
])
def test_mcnemar_matches_hand_computed_binomial_tail(a_only, b_only, expected):
    result = mcnemar_exact(*_table(a_only, b_only))
    assert result == McNemar(a_only=a_only, b_only=b_only, p_value=pytest.approx(expected, abs=1e-15))
    assert mcnemar_exact(*reversed(_table(a_only, b_only))).p_value == pytest.approx(expected, abs=1e-15)


def test_mcnemar_larger_table_and_input_types():
    correct_a, correct_b = _table(7, 20, both=50, neither=10)
    expected = _two_sided_binomial(7, 20)
    assert expected == pytest.approx(2 * sum(math.comb(27, k) for k in range(8)) / 2**27)
    assert 0.01 < expected < 0.02
    as_numpy = mcnemar_exact(np.array(correct_a), np.array(correct_b))
    as_tensor = mcnemar_exact(torch.tensor(correct_a), torch.tensor(correct_b))
    as_zero_one = mcnemar_exact([int(c) for c in correct_a], [int(c) for c in correct_b])
    for result in (as_numpy, as_tensor, as_zero_one):
        assert (result.a_only, result.b_only) == (7, 20)
        assert result.p_value == pytest.approx(expected, rel=1e-12)


# --- paired bootstrap --------------------------------------------------------------------------


def _random_pair(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Classifier a right 80% of the time, b 75%, correlated through shared hard examples."""
    rng = np.random.default_rng(seed)
    difficulty = rng.random(n)
    return difficulty < 0.80, (difficulty < 0.70) | (rng.random(n) < 0.17)


def test_bootstrap_is_deterministic_per_seed_and_contains_the_observed_difference():
    correct_a, correct_b = _random_pair(300)
    observed = correct_a.mean() - correct_b.mean()
    interval = paired_bootstrap_interval(correct_a, correct_b, seed=1)
    assert paired_bootstrap_interval(correct_a, correct_b, seed=1) == interval
    assert paired_bootstrap_interval(correct_a, correct_b, seed=2) != interval
    low, high = interval
    assert low < observed < high
    assert 0.01 < high - low < 0.2
    wider_low, wider_high = paired_bootstrap_interval(correct_a, correct_b, seed=1, level=0.99)
    assert wider_low < low and high < wider_high


def test_bootstrap_interval_narrows_with_more_examples():
    correct_a, correct_b = _random_pair(200)
    small_low, small_high = paired_bootstrap_interval(correct_a, correct_b, seed=0)
    large_low, large_high = paired_bootstrap_interval(np.tile(correct_a, 16), np.tile(correct_b, 16), seed=0)
    # same accuracies, 16x the examples: about 4x narrower
    assert (large_high - large_low) < (small_high - small_low) / 3


def test_cluster_bootstrap_of_duplicated_views_matches_the_source_examples():
    correct_a, correct_b = _random_pair(200)
    views_a, views_b = np.repeat(correct_a, 3), np.repeat(correct_b, 3)
    source_of_view = np.repeat(np.arange(200), 3)
    source_low, source_high = paired_bootstrap_interval(correct_a, correct_b, seed=5)
    cluster_low, cluster_high = paired_bootstrap_interval(views_a, views_b, seed=5, groups=source_of_view)
    plain_low, plain_high = paired_bootstrap_interval(views_a, views_b, seed=5)
    cluster_error = abs(cluster_low - source_low) + abs(cluster_high - source_high)
    plain_error = abs(plain_low - source_low) + abs(plain_high - source_high)
    assert cluster_error < plain_error
    # drawing the 200 sources with the same seed draws the same sources: the same interval
    assert (cluster_low, cluster_high) == pytest.approx((source_low, source_high), abs=1e-12)
    # the plain bootstrap treats the 3 views as independent: about sqrt(3) too narrow
    assert (plain_high - plain_low) < 0.75 * (source_high - source_low)


def test_paired_comparison_reports_table_test_and_interval():
    correct, reference = _table(12, 4, both=70, neither=14)
    result = paired_comparison(torch.tensor(correct), torch.tensor(reference), seed=3, n_resamples=500)
    assert set(result) == {"diff", "p_value", "ci_low", "ci_high", "n", "wins", "losses"}
    assert result["n"] == 100 and result["wins"] == 12 and result["losses"] == 4
    assert result["diff"] == pytest.approx((12 - 4) / 100)
    assert result["p_value"] == pytest.approx(_two_sided_binomial(12, 4), rel=1e-12)
    assert (result["ci_low"], result["ci_high"]) == paired_bootstrap_interval(correct, reference, seed=3,
                                                                              n_resamples=500)
    assert result["ci_low"] < result["diff"] < result["ci_high"]


# --- mean interval -----------------------------------------------------------------------------


def test_mean_interval_matches_hand_computed_t_interval():
    values = [0.80, 0.82, 0.85, 0.81, 0.84]
    mean = 4.12 / 5
    standard_deviation = math.sqrt(sum((v - mean) ** 2 for v in values) / 4)
    half_width = T_975_4_DF * standard_deviation / math.sqrt(5)
    assert mean_interval(values) == pytest.approx((mean, mean - half_width, mean + half_width), abs=1e-12)
    assert half_width == pytest.approx(0.0258, abs=1e-4)


def test_mean_interval_of_one_value_has_no_bounds():
    mean, low, high = mean_interval([0.9])
    assert mean == 0.9 and math.isnan(low) and math.isnan(high)


# --- bad inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize("call, message", [
    (lambda: mcnemar_exact([True, False], [True]), "correct_a has 2 examples but correct_b has 1"),
    (lambda: mcnemar_exact([], []), "empty"),
    (lambda: mcnemar_exact([0, 2], [1, 1]), "values other than True/False"),
    (lambda: mcnemar_exact([[True]], [[True]]), r"shape \(1, 1\)"),
    (lambda: paired_bootstrap_interval([True], [True, False], seed=0), "same test examples"),
    (lambda: paired_bootstrap_interval([True], [False], seed=0, level=95), "level=95"),
    (lambda: paired_bootstrap_interval([True], [False], seed=0, n_resamples=0), "n_resamples=0"),
    (lambda: paired_bootstrap_interval([True, True], [False, True], seed=0, groups=[0]), "one group id per example"),
    (lambda: paired_comparison([True], [], seed=0), "correct_a has 1 examples"),
    (lambda: mean_interval([]), "no values"),
    (lambda: mean_interval([0.5, float("nan")]), "non-finite"),
])
def test_bad_inputs_raise_soup_error(call, message):
    with pytest.raises(SoupError, match=message):
        call()


# --- benchmarks/seeds.py summary ---------------------------------------------------------------


def _row(method: str, test_acc: float | None, shifted_test_acc: float | None = None, **columns) -> dict:
    return {"method": method, "test_acc": test_acc, "shifted_test_acc": shifted_test_acc, **columns}


def test_seeds_summary_spread_paired_interval_and_wins():
    per_seed = [
        [_row("greedy", 0.80, 0.60, fit_acc=0.90, seconds=10.0),
         _row("uniform", 0.81, 0.58, fit_acc=0.88, seconds=1.0)],
        [_row("greedy", 0.82, 0.62, fit_acc=0.92, seconds=12.0),
         _row("uniform", 0.85, 0.63, fit_acc=0.90, seconds=1.0)],
        [_row("greedy", 0.84, 0.64, fit_acc=0.94, seconds=14.0),
         _row("uniform", 0.83, 0.65, fit_acc=0.92, seconds=1.0)],
    ]
    greedy, uniform = seeds_benchmark.summarise(per_seed)
    assert greedy["method"] == "greedy" and uniform["method"] == "uniform"
    assert greedy["test_acc"] == "0.8200 ± 0.0200"
    assert greedy["seconds"] == "12.0000 ± 2.0000"
    assert uniform["fit_acc"] == "0.9000 ± 0.0200"
    assert uniform["select_acc"] is None  # no seed has it
    # test differences +0.01, +0.03, -0.01: mean 0.01, sd 0.02, half width 4.3027 * 0.02 / sqrt(3) = 0.04968
    assert uniform["test_acc - greedy"] == "+0.0100 [-0.0397, +0.0597]"
    assert uniform["wins/seeds"] == "2/3"
    # shifted differences -0.02, +0.01, +0.01: mean 0, sd sqrt(0.0006 / 2) = 0.01732, half width 0.04303
    half_width = T_975_2_DF * math.sqrt(0.0006 / 2) / math.sqrt(3)
    assert half_width == pytest.approx(0.04303, abs=1e-5)
    assert uniform["shifted_test_acc - greedy"] == "+0.0000 [-0.0430, +0.0430]"
    assert uniform["shifted wins/seeds"] == "2/3"
    assert greedy["test_acc - greedy"] == "+0.0000 [+0.0000, +0.0000]" and greedy["wins/seeds"] == "0/3"
    table = seeds_benchmark.markdown_table([greedy, uniform], seeds_benchmark.SUMMARY_COLUMNS)
    assert "| uniform | 0.9000 ± 0.0200 |  | 0.8300 ± 0.0200 |" in table


def test_seeds_summary_skips_missing_values_and_methods():
    per_seed = [
        [_row("greedy", 0.70, 0.50), _row("learned", 0.75, None), _row("ensemble", 0.90, 0.80)],
        [_row("greedy", 0.72, None), _row("learned", 0.71, 0.55)],
        [_row("learned", 0.80, 0.60)],  # greedy failed in this seed: no paired difference
    ]
    summary = {row["method"]: row for row in seeds_benchmark.summarise(per_seed)}
    assert list(summary) == ["greedy", "learned", "ensemble"]
    # test accuracies 0.75, 0.71, 0.80: deviations from the mean 2.26 / 3 are -0.01 / 3, -0.13 / 3, +0.14 / 3
    assert summary["learned"]["test_acc"] == f"{2.26 / 3:.4f} ± {math.sqrt(0.0366 / 9 / 2):.4f}" == "0.7533 ± 0.0451"
    # test differences +0.05 and -0.01 (seeds 0, 1): mean 0.02, sd 0.0424264, t(1 df) = 12.7062
    half_width = 12.706204736174698 * math.sqrt(0.0018) / math.sqrt(2)
    assert summary["learned"]["test_acc - greedy"] == f"+0.0200 [{0.02 - half_width:+.4f}, {0.02 + half_width:+.4f}]"
    assert summary["learned"]["test_acc - greedy"] == "+0.0200 [-0.3612, +0.4012]"
    assert summary["learned"]["wins/seeds"] == "1/2"
    # no seed has both shifted accuracies for learned and greedy
    assert summary["learned"]["shifted_test_acc - greedy"] is None and summary["learned"]["shifted wins/seeds"] is None
    # one seed only: the mean without spread or interval
    assert summary["ensemble"]["test_acc"] == "0.9000"
    assert summary["ensemble"]["test_acc - greedy"] == "+0.2000" and summary["ensemble"]["wins/seeds"] == "1/1"
    assert summary["ensemble"]["shifted_test_acc - greedy"] == "+0.3000"


def test_seeds_best_merge_is_chosen_by_select_accuracy_and_becomes_the_reference():
    per_seed = [[{**_row("greedy", 0.80, 0.60), "select_acc": 0.90}, {**_row("ties", 0.70, 0.50), "select_acc": 0.72},
                 {**_row("task_arithmetic", 0.95, 0.70), "select_acc": 0.80}],
                [{**_row("greedy", 0.82, 0.62), "select_acc": 0.91}, {**_row("ties", 0.74, 0.52), "select_acc": 0.70},
                 {**_row("task_arithmetic", 0.96, 0.71), "select_acc": 0.60}]]
    assert seeds_benchmark.best_merge(per_seed) == "ties"  # mean select 0.71 > 0.70, whatever the test accuracies
    summary = {row["method"]: row for row in seeds_benchmark.summarise(per_seed, "ties")}
    assert summary["greedy"]["test_acc - ties"].startswith("+0.0900") and summary["greedy"]["wins/seeds"] == "2/2"
    assert "test_acc - ties" in seeds_benchmark.summary_columns("ties")
    assert seeds_benchmark.best_merge([[_row("greedy", 0.8, 0.6)]]) is None  # no merge method was run
    refined = [rows + [{**_row("wise_ft_soup", 0.9, 0.7), "select_acc": 0.95}] for rows in per_seed]
    assert seeds_benchmark.best_merge(refined) == "ties"  # a refinement of a built soup is not a merge method


def test_seeds_auto_row_is_the_row_of_the_model_auto_registered_in_that_seed(tmp_path):
    rows = [_row("greedy", 0.80, 0.60), _row("mehl_soup_auto", 0.84, 0.62)]
    assert seeds_benchmark.with_registered(rows, tmp_path) == rows  # no registration.json: an older evaluation
    (tmp_path / "runs" / "eval").mkdir(parents=True)
    (tmp_path / "runs" / "eval" / "registration.json").write_text('{"method": "greedy"}')
    auto = seeds_benchmark.with_registered(rows, tmp_path)[-1]
    assert auto == {**rows[0], "method": "auto", "registered": "greedy"}


def test_seeds_settings_are_yaml_values_under_a_section_and_a_bad_one_says_how():
    assert seeds_benchmark.parse_settings(["sweep.lr_range=[0.001, 0.003]", "sweep.members=[0, 1]",
                                           "pretrain.epochs=5"]) \
        == {"sweep": {"lr_range": [0.001, 0.003], "members": [0, 1]}, "pretrain": {"epochs": 5}}
    with pytest.raises(SystemExit, match="SECTION.KEY=VALUE"):
        seeds_benchmark.parse_settings(["epochs=5"])


def test_the_mean_interval_of_real_differences_is_exact_on_constants_and_refuses_bad_input():
    from soup_pipeline.evaluation.statistics import bootstrap_mean_interval

    assert bootstrap_mean_interval(np.full(50, -0.25), seed=0) == pytest.approx((-0.25, -0.25))
    values = np.random.default_rng(0).normal(0.1, 1.0, 400)
    low, high = bootstrap_mean_interval(values, seed=0, n_resamples=4000)
    half = 1.96 * values.std(ddof=1) / math.sqrt(len(values))
    assert (low == pytest.approx(values.mean() - half, abs=0.02)
            and high == pytest.approx(values.mean() + half, abs=0.02))
    with pytest.raises(SoupError, match="finite numbers"):
        bootstrap_mean_interval([0.1, float("nan")], seed=0)


def test_the_bootstrap_is_paired_it_is_zero_on_identical_inputs_and_the_naive_paired_loop_on_the_same_draws():
    rng = np.random.default_rng(5)
    a = rng.random(300) < 0.7
    b = a.copy()
    b[rng.choice(300, 30, replace=False)] ^= True  # 30 of 300 examples differ: the two models agree on the rest
    assert paired_bootstrap_interval(a, a, seed=0) == (0.0, 0.0)
    low, high = paired_bootstrap_interval(a, b, seed=7, n_resamples=500)
    draws = np.random.default_rng(7).integers(0, 300, size=(500, 300))  # the same draws, one resample per row
    naive = [a[row].mean() - b[row].mean() for row in draws]  # the same examples for both: paired
    assert (low, high) == pytest.approx(tuple(np.quantile(naive, [0.025, 0.975])), abs=1e-12)
    other = np.random.default_rng(8).integers(0, 300, size=(500, 300))  # each model on its own draws: unpaired
    unpaired = [a[row].mean() - b[other_row].mean() for row, other_row in zip(draws, other)]
    spread = np.subtract(*np.quantile(unpaired, [0.975, 0.025]))
    assert high - low < 0.5 * spread  # pairing removes the examples both get right or wrong
