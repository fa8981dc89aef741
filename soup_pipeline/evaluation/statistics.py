"""Paired comparisons of two classifiers on one test set, and intervals of a mean across seeds.

Pure functions of per-example correctness (boolean sequences, arrays or tensors); no tracking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..runtime.errors import SoupError

# Resampled indices held in memory at once by the bootstrap (int64: 32 MiB).
_MAX_DRAWS_PER_CHUNK = 1 << 22


@dataclass(frozen=True)
class McNemar:
    """Discordant pairs of classifiers a and b, and the two-sided exact McNemar p-value."""

    a_only: int  # examples a gets right and b gets wrong
    b_only: int  # examples b gets right and a gets wrong
    p_value: float


def _as_array(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _correctness(values: Any, name: str) -> np.ndarray:
    """A 1-d boolean array from booleans or 0/1 values."""
    array = _as_array(values)
    if array.ndim != 1:
        raise SoupError(f"{name} has shape {array.shape}: pass one correctness value per example (a 1-d sequence)")
    if array.dtype != bool:
        if not np.isin(array, (0, 1)).all():
            raise SoupError(f"{name} holds values other than True/False or 1/0 ({np.unique(array)[:5]}): "
                            "pass per-example correctness, e.g. predictions == targets")
        array = array.astype(bool)
    return array


def _paired(correct_a: Any, correct_b: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = _correctness(correct_a, "correct_a"), _correctness(correct_b, "correct_b")
    if len(a) != len(b):
        raise SoupError(f"correct_a has {len(a)} examples but correct_b has {len(b)}: "
                        "pass the correctness of both classifiers on the same test examples, in the same order")
    if len(a) == 0:
        raise SoupError("correct_a and correct_b are empty: pass the correctness on at least one test example")
    return a, b


def mcnemar_exact(correct_a: Any, correct_b: Any) -> McNemar:
    """Two-sided exact McNemar test: a binomial(discordant pairs, 1/2) test on the examples only one gets right."""
    a, b = _paired(correct_a, correct_b)
    a_only, b_only = int(np.sum(a & ~b)), int(np.sum(b & ~a))
    discordant = a_only + b_only
    from scipy import stats  # imported here: every stage imports this module, only the evaluation tests

    p_value = 1.0 if discordant == 0 else min(1.0, 2.0 * float(stats.binom.cdf(min(a_only, b_only), discordant, 0.5)))
    return McNemar(a_only=a_only, b_only=b_only, p_value=p_value)


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise SoupError(f"level={level} is not a coverage probability: pass a value strictly between 0 and 1, "
                        "e.g. 0.95")


def paired_bootstrap_interval(correct_a: Any, correct_b: Any, *, seed: int, n_resamples: int = 2000,
                              level: float = 0.95, groups: Any = None) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(a) - mean(b), resampling examples (or whole `groups`) with replacement.

    `groups` holds one id per example (e.g. the source image of augmented views); with it, whole groups are drawn
    and the difference is taken over all examples of the drawn groups (cluster bootstrap).
    """
    a, b = _paired(correct_a, correct_b)
    return bootstrap_mean_interval(a.astype(np.float64) - b.astype(np.float64), seed=seed, n_resamples=n_resamples,
                                   level=level, groups=groups)


def bootstrap_mean_interval(differences: Any, *, seed: int, n_resamples: int = 2000, level: float = 0.95,
                            groups: Any = None) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-example paired `differences` (e.g. of two models' losses on
    the same examples), resampling examples (or whole `groups`, as in paired_bootstrap_interval)."""
    differences = _as_array(differences).astype(np.float64)
    _check_level(level)
    if n_resamples < 1:
        raise SoupError(f"n_resamples={n_resamples}: pass a positive number of bootstrap resamples, e.g. 2000")
    if differences.ndim != 1 or len(differences) == 0 or not np.isfinite(differences).all():
        raise SoupError(f"bootstrap_mean_interval got differences of shape {differences.shape}: pass a non-empty 1-d "
                        "sequence of finite numbers, one per example")
    if groups is None:
        group_of_example = np.arange(len(differences))
    else:
        group_ids = _as_array(groups)
        if group_ids.shape != differences.shape:
            raise SoupError(f"groups has shape {group_ids.shape} but there are {len(differences)} examples: "
                            "pass one group id per example")
        group_of_example = np.unique(group_ids, return_inverse=True)[1]
    group_sums = np.bincount(group_of_example, weights=differences)
    group_sizes = np.bincount(group_of_example)
    n_groups = len(group_sizes)
    rng = np.random.default_rng(seed)
    resampled = np.empty(n_resamples)
    chunk = max(1, _MAX_DRAWS_PER_CHUNK // n_groups)
    for start in range(0, n_resamples, chunk):
        drawn = rng.integers(0, n_groups, size=(min(chunk, n_resamples - start), n_groups))
        resampled[start:start + len(drawn)] = group_sums[drawn].sum(axis=1) / group_sizes[drawn].sum(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(resampled, [tail, 1.0 - tail])
    return float(low), float(high)


def paired_comparison(correct: Any, reference: Any, *, seed: int, groups: Any = None,
                      n_resamples: int = 2000) -> dict:
    """Accuracy difference of `correct` over `reference`, its exact McNemar p-value and 95% bootstrap interval.

    `groups` applies to the interval only: the McNemar test treats every example as independent.
    """
    a, b = _paired(correct, reference)
    test = mcnemar_exact(a, b)
    ci_low, ci_high = paired_bootstrap_interval(a, b, seed=seed, n_resamples=n_resamples, groups=groups)
    return {"diff": float(a.mean() - b.mean()), "p_value": test.p_value, "ci_low": ci_low, "ci_high": ci_high,
            "n": len(a), "wins": test.a_only, "losses": test.b_only}


def mean_interval(values: Any, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean of `values` (e.g. one per seed); nan bounds for one value."""
    _check_level(level)
    array = _as_array(values).astype(np.float64)
    if array.ndim != 1:
        raise SoupError(f"mean_interval got values of shape {array.shape}: "
                        "pass a 1-d sequence (e.g. one result per seed)")
    if len(array) == 0:
        raise SoupError("mean_interval got no values: pass at least one (e.g. one result per seed)")
    if not np.isfinite(array).all():
        raise SoupError(f"mean_interval got non-finite values {array[~np.isfinite(array)]}: drop missing results first")
    mean = float(array.mean())
    if len(array) == 1:
        return mean, float("nan"), float("nan")
    from scipy import stats  # imported here, as in mcnemar_exact

    half_width = float(stats.t.ppf((1.0 + level) / 2.0, len(array) - 1) * array.std(ddof=1) / np.sqrt(len(array)))
    return mean, mean - half_width, mean + half_width
