"""The hyperplane methods compute exactly docs/method.md (float64 comparisons)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from soup_pipeline.core.data import fetch_batch
from soup_pipeline.soups import Objective, run_method
from soup_pipeline.soups.engine import fused
from soup_pipeline.soups.engine.fused import stack_projections, stack_rebuild
from soup_pipeline.soups.engine.layers import group_layers
from soup_pipeline.soups.engine.mixing import group_rows, tensor_columns, tensor_rows
from soup_pipeline.soups.methods.hyperplane import hyperplane_soup
from toys import DEVICE, Blocks, Toy, params_for, toy_data, toy_ingredients, toy_objective

PARAMS = dict(device=DEVICE, batch_size=32, passes=1.0, lr=0.05, seed=3, prefetch=False)


def _full_set(store, objective):
    """Reference quantities built the plain way: all K loaded, centre and directions per key."""
    model = objective.model_factory()
    keys = [n for n, _ in model.named_parameters()]
    thetas = [store.load(k) for k in range(len(store))]
    centre = {key: (torch.stack([t[key] for t in thetas]).mean(0) if thetas[0][key].is_floating_point()
                    else thetas[0][key])
              for key in thetas[0]}
    directions = {key: torch.stack([t[key] for t in thetas]) - centre[key] for key in keys}
    return model, keys, centre, directions


def _combined(centre, directions, X, grouping):
    return {key: centre[key] + torch.tensordot(X[:, grouping.group_of[key]], d, dims=1)
            for key, d in directions.items()}


def test_projected_gradient_equals_autograd(tmp_path):
    store = toy_ingredients(tmp_path, K=5)
    objective = toy_objective()
    model, keys, centre, directions = _full_set(store, objective)
    grouping = group_layers(keys, "tensor")
    X = (0.3 * torch.randn(5, grouping.size, dtype=torch.float64)).requires_grad_()
    inputs, targets = fetch_batch(objective.fit, range(40))
    theta = _combined(centre, directions, X, grouping)
    loss = objective.loss_fn(functional_call(model, {**centre, **theta}, (inputs,)), targets)
    (autograd_grad,) = torch.autograd.grad(loss, X)

    model.load_state_dict({**centre, **{k: v.detach() for k, v in theta.items()}})
    objective.loss_fn(model(inputs), targets).backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    projected = group_rows(tensor_rows(grads, directions, torch.float64), tensor_columns(grouping, keys, "cpu"),
                           grouping.size)
    assert (projected - autograd_grad).abs().max() < 1e-10
    assert autograd_grad.abs().max() > 1e-3  # the comparison is not between zeros


def test_a_rank_with_no_ingredients_in_a_block_projects_onto_no_rows_in_any_storage_dtype():
    grads = {"w": torch.ones(2, 3)}  # a float32 gradient; a rank's empty share, held in float64 or float32
    for dtype in (torch.float64, torch.float32):
        rows = tensor_rows(grads, {"w": torch.empty(0, 2, 3, dtype=dtype)}, torch.float32)
        assert rows.shape == (1, 0) and rows.dtype == torch.float32


def _warmup_cosine(step, total, warmup):
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def reference_block_descent(store, objective, params, perms, batches, layerwise):
    """Independent MEHL: the full combination c + sum_k alpha_k d_k built from all K each step, autograd to X."""
    model, keys, centre, directions = _full_set(store, objective)
    grouping = group_layers(keys, params.grouping if layerwise else "model")
    K, b = len(store), min(params.model_batch, len(store))
    X = torch.zeros(K, grouping.size, dtype=torch.float64)
    steps = round(params.passes * math.ceil(len(objective.fit) / params.batch_size))
    warmup = int(params.warmup_frac * steps)
    batch_iter = iter(batches)
    for perm in perms:
        for start in range(0, K, b):
            block = torch.tensor(perm[start : start + b])
            x = X[block].clone().requires_grad_()
            opt = torch.optim.AdamW([x], lr=params.lr, weight_decay=params.weight_decay)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _warmup_cosine(s, steps, warmup))
            for _ in range(steps):
                full = X.index_put((block,), x)
                theta = _combined(centre, directions, full, grouping)
                inputs, targets = fetch_batch(objective.fit, next(batch_iter))
                loss = objective.loss_fn(functional_call(model, {**centre, **theta}, (inputs,)), targets)
                grads = torch.autograd.grad(loss, list(theta.values()), retain_graph=True)
                if params.grad_clip is not None:
                    norm = torch.sqrt(sum((g**2).sum() for g in grads))
                    factor = min(1.0, params.grad_clip / (float(norm) + 1e-6))
                    grads = [g * factor for g in grads]
                (x.grad,) = torch.autograd.grad(list(theta.values()), x, grads)
                opt.step()
                sched.step()
            X[block] = x.detach()
    return X


@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("model_batch,model_epochs,grad_clip", [(5, 1, None), (2, 2, None), (2, 1, 0.05)])
def test_block_descent_matches_reference(tmp_path, layerwise, model_batch, model_epochs, grad_clip):
    store = toy_ingredients(tmp_path, K=5)
    objective = toy_objective()
    params = params_for("mehl_soup_plus", **PARAMS, model_batch=model_batch, model_epochs=model_epochs,
                        grad_clip=grad_clip, weight_decay=0.01)
    perms = [[3, 0, 4, 1, 2], [1, 4, 2, 0, 3]][:model_epochs]
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randperm(120, generator=gen)[:32].tolist() for _ in range(60)]
    result = hyperplane_soup(store, objective, params, layerwise=layerwise, permutations=perms, batches=batches)
    expected = reference_block_descent(store, objective, params, perms, batches, layerwise)
    assert expected.abs().max() > 1e-3
    assert (result.info["coefficients"] - expected).abs().max() < 1e-10


@pytest.mark.parametrize("name", ["hl_soup", "hl_soup_plus"])
def test_hl_soup_is_mehl_with_whole_set_in_one_block(tmp_path, name):
    store = toy_ingredients(tmp_path, K=4)
    hl = run_method(name, store, toy_objective(), params_for(name, **PARAMS))
    mehl_name = name.replace("hl", "mehl")
    mehl = run_method(mehl_name, store, toy_objective(), params_for(mehl_name, **PARAMS, model_batch=4))
    assert torch.equal(hl.beta, mehl.beta)
    assert hl.info["b"] == 4 and hl.info["model_epochs"] == 1


def test_coefficients_outside_the_block_never_change(tmp_path):
    store = toy_ingredients(tmp_path, K=6)
    seen = {}

    def check(event):
        outside = [k for k in range(6) if k not in event.block]
        first = seen.setdefault(event.position, event.coefficients[outside].clone())
        assert torch.equal(event.coefficients[outside], first)

    params = params_for("mehl_soup_plus", **PARAMS, model_batch=2, model_epochs=2)
    result = hyperplane_soup(store, toy_objective(), params, layerwise=True, on_step=check)
    assert sorted(seen) == list(range(6))  # 3 blocks x 2 epochs, all observed
    assert (result.info["coefficients"].abs().amax(1) > 1e-4).all()  # every ingredient's coefficients moved


@pytest.mark.parametrize("normalize", [False, True])
def test_beta_sums_to_one_and_rebuilds_the_soup(tmp_path, normalize):
    store = toy_ingredients(tmp_path, K=4)
    params = params_for("mehl_soup_plus", **PARAMS, model_batch=2, normalize_directions=normalize)
    result = run_method("mehl_soup_plus", store, toy_objective(), params)
    assert torch.allclose(result.beta.sum(0), torch.ones(result.beta.shape[1], dtype=torch.float64), atol=1e-12)
    grouping = group_layers([n for n, _ in Toy().named_parameters()], "tensor")
    thetas = [store.load(k) for k in range(4)]
    for key, group in grouping.group_of.items():
        rebuilt = sum(result.beta[k, group] * thetas[k][key] for k in range(4))
        assert (rebuilt - result.state_dict[key]).abs().max() < 1e-10
    assert (result.beta - 0.25).abs().max() > 1e-3  # it moved away from uniform
    mean_shift = torch.stack([t["shift"] for t in thetas]).mean(0)
    assert torch.allclose(result.state_dict["shift"], mean_shift)  # float buffers: uniform average
    assert int(result.state_dict["steps"]) == 7  # other entries: copied


def test_zero_directions_are_masked_without_division(tmp_path):
    store = toy_ingredients(tmp_path, K=3)
    from soup_pipeline.core.ingredients import IngredientStore, save_ingredient

    paths = []
    for k in range(3):  # make one layer identical across ingredients
        state = store.load(k)
        state["net.1.bias"] = store.load(0)["net.1.bias"]
        paths.append(save_ingredient(dict(state), tmp_path / f"same{k}.safetensors", meta={"fit_acc": 0.5}))
    same = IngredientStore(paths)
    params = params_for("mehl_soup_plus", **PARAMS, normalize_directions=True)
    result = run_method("mehl_soup_plus", same, toy_objective(), params)
    column = result.layer_names.index("net.1.bias")
    assert torch.all(result.info["coefficients"][:, column] == 0)
    assert torch.allclose(result.beta[:, column], torch.full((3,), 1 / 3, dtype=torch.float64))
    assert result.info["masked"] == 3
    assert all(torch.isfinite(v).all() for v in result.state_dict.values() if v.is_floating_point())


def test_bf16_storage_keeps_fp32_accumulation_close(tmp_path):
    store = toy_ingredients(tmp_path, K=4, dtype=torch.float32)
    objective = toy_objective(dtype=torch.float32)
    params = params_for("mehl_soup_plus", **PARAMS, model_batch=2)
    full = run_method("mehl_soup_plus", store, objective, params)
    store.storage_dtype = torch.bfloat16
    half = run_method("mehl_soup_plus", store, objective, params.model_copy(update={"storage_dtype": "bfloat16"}))
    assert (full.beta - half.beta).abs().max() < 0.05
    assert half.state_dict["net.0.weight"].dtype == torch.float32


def test_compute_matched_mehl_takes_hl_soups_number_of_steps(tmp_path):
    store = toy_ingredients(tmp_path, K=4)
    settings = {**PARAMS, "model_batch": 2, "passes": 2.0}
    hl, paper, matched = (run_method(name, store, toy_objective(), params_for(name, **settings))
                          for name in ("hl_soup_plus", "mehl_soup_plus", "mehl_soup_plus_matched"))
    assert len(hl.history) == 8 and len(paper.history) == 16 and len(matched.history) == 8


@pytest.mark.parametrize("grouping", ["tensor", "block", "model", [r"\.weight$", r"^blocks\.1\."]])
@pytest.mark.parametrize("grad_clip", [None, 0.05])
@pytest.mark.parametrize("normalize", [False, True])
def test_the_fused_step_equals_the_per_tensor_step(tmp_path, monkeypatch, grouping, grad_clip, normalize):
    store = toy_ingredients(tmp_path, K=5, model=Blocks)
    objective = Objective(model_factory=lambda: Blocks(), fit=toy_data(), batch_size=32)
    projected, rebuilt = [], []
    monkeypatch.setattr(fused, "stack_projections", lambda *args: projected.append(1) or stack_projections(*args))
    monkeypatch.setattr(fused, "stack_rebuild", lambda *args: rebuilt.append(1) or stack_rebuild(*args))
    settings = {**PARAMS, "model_batch": 2, "grouping": grouping, "grad_clip": grad_clip,
                "normalize_directions": normalize}
    one = hyperplane_soup(store, objective, params_for("mehl_soup_plus", **settings, fused_step=True), layerwise=True)
    blocks = 3  # K = 5 in blocks of b = 2
    assert len(projected) == len(one.history)  # every step's projection fused
    assert len(rebuilt) == len(one.history) + blocks  # every step's rebuild fused, and each block's base
    each = hyperplane_soup(store, objective, params_for("mehl_soup_plus", **settings, fused_step=False), layerwise=True)
    assert len(projected) == len(one.history) and len(rebuilt) == len(one.history) + blocks  # none of the second run
    assert each.info["coefficients"].abs().max() > 1e-3
    assert (one.info["coefficients"] - each.info["coefficients"]).abs().max() < 1e-10
    assert max(float((one.state_dict[key] - each.state_dict[key]).abs().max()) for key in each.state_dict) < 1e-10
