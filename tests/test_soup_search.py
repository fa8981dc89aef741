"""`grouping: auto` (mehl_soup_auto): candidates fitted on fit data, chosen on select data; and the
roles kept apart: no soup method reads a select example while fitting."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from soup_pipeline.core.ingredients import IngredientStore, save_ingredient
from soup_pipeline.runtime.errors import SoupError
from soup_pipeline.soups import SPECS, Objective, method_params, run_method
from toys import params_for, toy_data, toy_ingredients, toy_objective

BLOCKS, WIDTH, K = 6, 4, 3


class Blocks(nn.Module):
    """Six blocks of two linear layers; block i reads its own 4 input features, the logits add up."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(WIDTH, 2), nn.Linear(2, 2)) for _ in range(BLOCKS))
        self.double()

    def forward(self, x):
        return sum(block(x[:, i * WIDTH:(i + 1) * WIDTH]) for i, block in enumerate(self.blocks))


def noisy_task(n: int, seed: int) -> TensorDataset:
    """Label 1 iff the features sum above 0, with 20% of the labels flipped."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, BLOCKS * WIDTH, generator=g, dtype=torch.float64)
    y = (x.sum(1) > 0).long()
    return TensorDataset(x, torch.where(torch.rand(n, generator=g) < 0.2, 1 - y, y))


def expert_ingredients(folder) -> IngredientStore:
    """Ingredient k is right on blocks k, k + 3 and wrong on the others: only per-layer mixing can use that."""
    g = torch.Generator().manual_seed(0)
    paths = []
    for k in range(K):
        state = {}
        for i in range(BLOCKS):
            first = 0.3 * torch.randn(2, WIDTH, generator=g, dtype=torch.float64)
            first[1] += 1.0 if i % K == k else -0.3
            state[f"blocks.{i}.0.weight"] = first
            state[f"blocks.{i}.0.bias"] = 0.1 * torch.randn(2, generator=g, dtype=torch.float64)
            state[f"blocks.{i}.1.weight"] = torch.eye(2, dtype=torch.float64) + 0.3 * torch.randn(2, 2, generator=g,
                                                                                                  dtype=torch.float64)
            state[f"blocks.{i}.1.bias"] = 0.1 * torch.randn(2, generator=g, dtype=torch.float64)
        paths.append(save_ingredient(state, folder / f"expert{k}.safetensors", meta={}))
    return IngredientStore(paths)


SEARCH = method_params("mehl_soup_auto", device="cpu", passes=30, model_batch=K, grad_clip=None, batch_size=64,
                       search={"groupings": ["tensor", "block", "model"], "lrs": [0.05]})


@pytest.mark.parametrize("examples, chosen", [(12, "model"), (800, "tensor")])
def test_auto_grouping_is_coarse_with_few_examples_and_per_tensor_with_many(tmp_path, examples, chosen):
    store = expert_ingredients(tmp_path)
    objective = Objective(Blocks, noisy_task(examples, seed=1), noisy_task(examples, seed=2), batch_size=64)
    result = run_method("mehl_soup_auto", store, objective, SEARCH)
    table = {row["grouping"]: row for row in result.info["search"]}
    assert [row["grouping"] for row in result.info["search"]] == ["tensor", "block", "model"]
    assert {g: table[g]["L"] for g in table} == {"tensor": 24, "block": 6, "model": 1}
    assert result.info["chosen"]["grouping"] == chosen and table[chosen]["chosen"]
    assert table[chosen]["select_loss"] == min(row["select_loss"] for row in table.values())
    assert result.beta.shape == (K, table[chosen]["L"])
    if examples == 12:  # per tensor fits the 12 examples best and generalises worst: overfitting, seen on select
        assert table["tensor"]["fit_loss"] < table["model"]["fit_loss"]
        assert table["tensor"]["select_loss"] > table["model"]["select_loss"]


def test_grouping_auto_on_mehl_soup_plus_searches_the_declared_grid(tmp_path):
    store = toy_ingredients(tmp_path, K=4)
    objective = toy_objective()
    objective.select = toy_data(60, seed=5)
    params = method_params("mehl_soup_plus", device="cpu", passes=1.0, grouping="auto",
                           search={"groupings": ["tensor", "model"], "lrs": [0.01, 0.05], "weight_decays": [0.0]})
    result = run_method("mehl_soup_plus", store, objective, params)
    assert [(r["grouping"], r["lr"]) for r in result.info["search"]] == [
        ("tensor", 0.01), ("tensor", 0.05), ("model", 0.01), ("model", 0.05)]
    assert sum(r["chosen"] for r in result.info["search"]) == 1


def test_auto_grouping_needs_select_data_and_is_refused_where_it_cannot_run(tmp_path):
    store = toy_ingredients(tmp_path, K=3)
    with pytest.raises(SoupError, match="select data"):
        run_method("mehl_soup_auto", store, toy_objective(), method_params("mehl_soup_auto", device="cpu", passes=0.5))
    with pytest.raises(SoupError,
                       match=r"learned_soup_plus.*\n  grouping: Input should be 'tensor', 'block' or 'model'"):
        method_params("learned_soup_plus", device="cpu", grouping="auto")
    with pytest.raises(SoupError, match="mehl_soup_auto.*\n  grouping: Input should be 'auto'"):
        method_params("mehl_soup_auto", grouping="tensor")


class Forbidden(Dataset):
    """A select set that fails the test on any read."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        raise AssertionError(f"select example {index} was read while fitting")


class Counted(Dataset):
    """A select set that counts its reads."""

    def __init__(self, data: TensorDataset):
        self.data, self.reads = data, 0

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        self.reads += 1
        return self.data[index]


@pytest.mark.parametrize("method", sorted(name for name, spec in SPECS.items() if not spec.searched))
def test_no_method_reads_a_select_example(tmp_path, method):
    store = toy_ingredients(tmp_path, K=3)
    objective = toy_objective()
    objective.select = Forbidden(50)
    result = run_method(method, store, objective, params_for(method, device="cpu", passes=0.5, epochs=1))
    if result.state_dict is None:  # the ensemble predicts later: its predictions must not read select data either
        result.info["predict"](objective.fit)


def test_auto_reads_select_data_only_to_score_each_candidate_once(tmp_path):
    store = toy_ingredients(tmp_path, K=3)
    objective = toy_objective()
    objective.select = Counted(toy_data(50, seed=5))
    params = method_params("mehl_soup_auto", device="cpu", passes=0.5,
                           search={"groupings": ["tensor", "block", "model"], "lrs": [0.05]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # K x L against the fit size is in the table, not a warning
        run_method("mehl_soup_auto", store, objective, params)
    assert objective.select.reads == 3 * 50


def test_each_candidate_keeps_the_memory_bound_of_mehl_soup(tmp_path):
    store = toy_ingredients(tmp_path, K=6)
    objective = toy_objective()
    objective.select = toy_data(60, seed=5)
    params = method_params("mehl_soup_auto", device="cpu", passes=0.5, model_batch=2, prefetch=False)  # default grid: 6
    run_method("mehl_soup_auto", store, objective, params)
    # one block of b at a time, over every candidate
    assert store.peak_resident_count == 2 and store.resident_count == 0
