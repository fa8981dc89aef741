"""The basin diagnostic (soup_pipeline.soups.comparators.basin) on both regimes: fine-tunes around one solution,
whose average is as good as they are, and the same solution with its hidden units permuted (each member exactly as
accurate, their average far worse): only the second is warned about."""

from __future__ import annotations

import itertools

import pytest
import torch

from soup_pipeline.core.ingredients import IngredientStore, save_ingredient
from soup_pipeline.soups.comparators.basin import Basin, diagnose
from soup_pipeline.soups.engine.task_vectors import mean_pairwise_cosine
from toys import Toy, toy_data, toy_ingredients, toy_objective

HIDDEN = 12  # Toy's hidden width: Linear(6, 12) -> LayerNorm(12) -> Tanh -> Linear(12, 3)


def trained_toy() -> tuple[dict, dict]:
    """(theta_0, a solution): a Toy at its random start and after training on toy data."""
    torch.manual_seed(0)
    model = Toy()
    start = {key: value.clone() for key, value in model.state_dict().items()}
    data = toy_data(400)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(300):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(data.tensors[0]), data.tensors[1]).backward()
        optimizer.step()
    return start, {key: value.detach().clone() for key, value in model.state_dict().items()}


def permuted(state: dict, order: torch.Tensor) -> dict:
    """The same function with the hidden units reordered (LayerNorm over them is permutation-equivariant)."""
    out = dict(state)
    for key in ("net.0.weight", "net.0.bias", "net.1.weight", "net.1.bias"):
        out[key] = state[key][order]
    out["net.3.weight"] = state["net.3.weight"][:, order]
    return out


def members(folder, states) -> IngredientStore:
    return IngredientStore([save_ingredient(state, folder / f"m{k}.safetensors", meta={"fit_acc": 0.9 - 0.01 * k})
                            for k, state in enumerate(states)])


def diagnosed(store, start) -> Basin:
    return diagnose(store, toy_objective(n=400), start, gap_limit=0.1, device=torch.device("cpu"))


def test_members_around_one_solution_share_a_basin_and_are_not_warned_about(tmp_path):
    start, solution = trained_toy()
    torch.manual_seed(1)
    nearby = [{k: v + 0.02 * torch.randn_like(v) if v.is_floating_point() and k != "shift" else v
               for k, v in solution.items()}
              for _ in range(4)]
    basin = diagnosed(members(tmp_path, nearby), start)
    assert basin.best_fit_acc > 0.85 and abs(basin.gap) < 0.05 and not basin.apart and basin.warning is None
    assert basin.mean_cosine > 0.9  # every member moved the same way from theta_0


def test_permuted_members_sit_apart_and_the_run_is_warned_once_in_words(tmp_path):
    start, solution = trained_toy()
    generator = torch.Generator().manual_seed(2)
    orders = [torch.arange(HIDDEN)] + [torch.randperm(HIDDEN, generator=generator) for _ in range(3)]
    store = members(tmp_path, [permuted(solution, order) for order in orders])
    accuracies = [diagnosed(IngredientStore([ingredient.path]), start).best_fit_acc for ingredient in store.ingredients]
    assert max(accuracies) - min(accuracies) < 1e-12  # each member is the same function
    basin = diagnosed(store, start)
    assert basin.apart and basin.gap > 0.2 and basin.mean_cosine < 0.5
    assert basin.warning.startswith(f"uniform soup is {100 * basin.gap:.1f} points below the best member on fit data: "
                                    "the fine-tunes do not share a basin")
    assert basin.as_dict()["warning"] == basin.warning


@pytest.mark.parametrize("K", [1, 2, 5])
def test_the_mean_pairwise_cosine_is_the_direct_mean_over_pairs(tmp_path, K):
    store = toy_ingredients(tmp_path, K, spread=0.3)
    torch.manual_seed(0)
    anchor = Toy().state_dict()
    floating = [key for key, value in anchor.items() if value.is_floating_point()]
    taus = [torch.cat([(store.load(k)[key] - anchor[key]).flatten() for key in floating]) for k in range(K)]
    pairs = list(itertools.combinations(taus, 2))
    expected = (sum(float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in pairs) / len(pairs)
                if pairs else 1.0)
    assert mean_pairwise_cosine(store, anchor) == pytest.approx(expected, abs=1e-12)


def test_without_theta_0_the_diagnostic_still_compares_the_uniform_soup_with_the_best_member(tmp_path):
    _, solution = trained_toy()
    basin = diagnose(members(tmp_path, [solution, permuted(solution, torch.arange(HIDDEN).flip(0))]),
                     toy_objective(n=400), None, gap_limit=0.1, device=torch.device("cpu"))
    assert basin.mean_cosine is None and basin.apart and "cosine of the task vectors is not measured" in basin.summary
