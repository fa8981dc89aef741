"""Baselines by their rules, extrapolation, the memory contract and resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from soup_pipeline.core.ingredients import IngredientStore, save_ingredient
from soup_pipeline.evaluation.scoring import loss_and_accuracy
from soup_pipeline.soups import Objective, run_method
from soup_pipeline.soups.engine.base import model_at
from soup_pipeline.soups.methods.hyperplane import hyperplane_soup
from toys import DEVICE, params_for, toy_ingredients, toy_objective

PARAMS = dict(device=DEVICE, batch_size=32, passes=2.0, seed=0)


def test_uniform_is_the_mean(tmp_path):
    store = toy_ingredients(tmp_path, K=3)
    result = run_method("uniform", store, toy_objective(), params_for("uniform", **PARAMS))
    states = [store.load(k) for k in range(3)]
    for key, value in result.state_dict.items():
        if value.is_floating_point():
            assert torch.allclose(value, sum(s[key] for s in states) / 3, atol=1e-14)
    assert result.beta.flatten().tolist() == [1 / 3] * 3


class Threshold(nn.Module):
    """Predicts class 1 when x > t: logits (0, x - t); averaging ingredients averages t."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(1, 2).double()

    def forward(self, x):
        return self.head(x)


def _threshold_ingredient(folder, name, t):
    state = {"head.weight": torch.tensor([[0.0], [1.0]], dtype=torch.float64),
             "head.bias": torch.tensor([0.0, -t], dtype=torch.float64)}
    return save_ingredient(state, folder / f"{name}.safetensors", meta={"fit_acc": 0.0})  # a stale sidecar: unused


def test_greedy_orders_on_fit_data_and_keeps_only_strict_improvements(tmp_path):
    # fit data: x = 0.5 .. 5.5, label 1 iff x > 3. Accuracy of threshold t: 1.0 for t in (2.5, 3.5).
    x = torch.arange(0.5, 6.0, 1.0, dtype=torch.float64).unsqueeze(1)
    objective = Objective(Threshold, TensorDataset(x, (x[:, 0] > 3).long()), batch_size=8)
    # measured fit accuracies: A 4/6, B 4/6, C 5/6, D 3/6, E 5/6, T 5/6, so the order is C, E, T, A, B, D
    # (ties keep file order)
    ingredients = [_threshold_ingredient(tmp_path, name, t)
                   for name, t in [("A", 1.0), ("B", 5.0), ("C", 2.0), ("D", 30.0), ("E", 4.0), ("T", 4.2)]]
    result = run_method("greedy", IngredientStore(ingredients), objective, params_for("greedy", **PARAMS))
    assert [step["ingredient"] for step in result.info["trail"]] == ["C", "E", "T", "A", "B", "D"]
    # C alone 5/6; C+E: t=3 -> 6/6 kept; +T: t=3.4 -> 6/6, a tie: rejected; +A: t=2.33 -> 5/6; +B: t=3.67 -> 5/6;
    # +D: 3/6
    assert [step["kept"] for step in result.info["trail"]] == [True, True, False, False, False, False]
    assert [round(step["fit_acc"], 4) for step in result.info["trail"]] == [0.8333, 1.0, 1.0, 0.8333, 0.8333, 0.5]
    assert result.info["members"] == ["C", "E"]
    assert result.state_dict["head.bias"].tolist() == [0.0, -3.0]
    assert result.beta.flatten().tolist() == [0.0, 0.0, 0.5, 0.0, 0.5, 0.0]


@pytest.mark.parametrize("name", ["learned_soup", "learned_soup_plus"])
def test_learned_soup_weights_sum_to_one_and_lower_heldout_loss(tmp_path, name):
    store = toy_ingredients(tmp_path, K=4, spread=0.5)
    objective = toy_objective()
    uniform = run_method("uniform", store, objective, params_for("uniform", **PARAMS))
    learned = run_method(name, store, objective, params_for(name, **{**PARAMS, "epochs": 10}))
    assert torch.allclose(learned.beta.sum(0), torch.ones(learned.beta.shape[1], dtype=torch.float64))
    assert (learned.beta >= 0).all() and (learned.beta - 0.25).abs().max() > 0.01
    device = torch.device("cpu")
    before = loss_and_accuracy(model_at(objective, uniform.state_dict, device), objective.fit, objective.batch_size,
                               device)[0]
    after = loss_and_accuracy(model_at(objective, learned.state_dict, device), objective.fit, objective.batch_size,
                              device)[0]
    assert after < before - 0.01


class Plane(nn.Module):
    """A 2-D linear classifier."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(2, 2, bias=False).double()

    def forward(self, x):
        return self.head(x)


def test_hyperplane_extrapolates_where_the_optimum_lies_outside_the_hull(tmp_path):
    # The true boundary is w*; every ingredient sits 20-45% of the way from a wrong w0 towards it,
    # so convex combinations (uniform, greedy) stay rotated away and only extrapolation reaches w*.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 2, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    w_star = torch.tensor([[-3.0, 0.0], [3.0, 0.0]], dtype=torch.float64)
    w_zero = torch.tensor([[0.0, -3.0], [0.0, 3.0]], dtype=torch.float64)
    ingredients = []
    for k, f in enumerate([0.2, 0.3, 0.35, 0.45]):
        w = (1 - f) * w_zero + f * w_star + 0.05 * torch.randn(2, 2, generator=g, dtype=torch.float64)
        ingredients.append(save_ingredient({"head.weight": w}, tmp_path / f"p{k}.safetensors", meta={"val_acc": f}))
    store = IngredientStore(ingredients)
    objective = Objective(Plane, TensorDataset(x[:200], y[:200]), batch_size=50)
    test = Objective(Plane, TensorDataset(x[200:], y[200:]), batch_size=200)
    settings = {**PARAMS, "passes": 20.0, "lr": 0.2, "model_batch": 2, "model_epochs": 2, "grad_clip": None}
    device = torch.device("cpu")
    accs = {}
    for name in ["uniform", "greedy", "hl_soup", "mehl_soup"]:
        result = run_method(name, store, objective, params_for(name, **settings))
        accs[name] = loss_and_accuracy(model_at(test, result.state_dict, device), test.fit, test.batch_size, device)[1]
        if name.endswith("hl_soup"):
            assert result.beta.min() < 0 or result.beta.max() > 1, result.beta
    assert accs["hl_soup"] > max(accs["uniform"], accs["greedy"]) + 0.05, accs
    assert accs["mehl_soup"] > max(accs["uniform"], accs["greedy"]) + 0.05, accs


@pytest.mark.parametrize("prefetch", [False, True])
def test_at_most_b_ingredients_resident(tmp_path, prefetch):
    store = toy_ingredients(tmp_path, K=7)
    per_ingredient = store.ingredient_bytes()
    counts = []
    params = params_for("mehl_soup_plus", **PARAMS, model_batch=2, prefetch=prefetch)
    hyperplane_soup(store, toy_objective(), params, layerwise=True,
                    on_step=lambda e: counts.append(store.resident_count))
    limit = 2 * (2 if prefetch else 1)
    assert max(counts) <= limit and store.peak_resident_count <= limit
    assert store.peak_resident_bytes <= limit * per_ingredient
    if not prefetch:
        assert store.peak_resident_count == 2  # exactly one block of b, never more
    assert store.resident_count == 0  # nothing left behind


def test_learned_soup_holds_all_k(tmp_path):
    store = toy_ingredients(tmp_path, K=5)
    run_method("learned_soup_plus", store, toy_objective(), params_for("learned_soup_plus", **PARAMS))
    assert store.peak_resident_count == 5


def test_resume_after_a_crash_in_block_two_is_bitwise_identical(tmp_path):
    store = toy_ingredients(tmp_path / "ing", K=6)
    params = params_for("mehl_soup_plus", **PARAMS, model_batch=2, model_epochs=2)
    plain = hyperplane_soup(store, toy_objective(), params, layerwise=True)

    class Crash(RuntimeError):
        pass

    def crash(event):
        if event.position == 2 and event.step == 1:
            raise Crash("simulated crash")

    with pytest.raises(Crash):
        hyperplane_soup(store, toy_objective(), params, layerwise=True, resume_dir=tmp_path / "resume", on_step=crash)
    positions = []
    resumed = hyperplane_soup(store, toy_objective(), params, layerwise=True, resume_dir=tmp_path / "resume",
                              on_step=lambda e: positions.append(e.position))
    assert min(positions) == 2  # blocks 0 and 1 were not recomputed
    assert torch.equal(resumed.info["coefficients"], plain.info["coefficients"])
    assert all(torch.equal(resumed.state_dict[k], plain.state_dict[k]) for k in plain.state_dict)
    assert resumed.history == plain.history


def test_a_saved_state_of_other_inputs_is_never_picked_up(tmp_path):
    store = toy_ingredients(tmp_path / "ing", K=4)
    resume = tmp_path / "resume"
    first = params_for("mehl_soup_plus", **PARAMS, model_batch=2)
    hyperplane_soup(store, toy_objective(), first, layerwise=True, resume_dir=resume)  # its final state is saved
    other = params_for("mehl_soup_plus", **PARAMS, model_batch=2, lr=0.2)
    steps = []
    resumed = hyperplane_soup(store, toy_objective(), other, layerwise=True, resume_dir=resume,
                              on_step=lambda e: steps.append(e.position))
    fresh = hyperplane_soup(store, toy_objective(), other, layerwise=True)
    assert steps[0] == 0 and torch.equal(resumed.info["coefficients"], fresh.info["coefficients"])
    assert len(list(resume.rglob("*.safetensors"))) == 2  # one state per set of inputs, side by side
