"""Every souping method on real open_clip ingredients (the tiny shipped ViT, fine-tuned briefly)."""

from __future__ import annotations

import pytest
import torch

from soup_pipeline.core.ingredients import IngredientStore
from soup_pipeline.core.models import TINY_ARCH, classifier_from_clip, load_clip, zero_shot_head
from soup_pipeline.core.portable_classifier import classifier_from_spec
from soup_pipeline.core.settings import FinetuneParams
from soup_pipeline.evaluation.scoring import accuracy, dataset_targets, loss_and_accuracy, model_logits
from soup_pipeline.soups import SPECS, Objective, SoupResult, run_method
from soup_pipeline.soups.engine.base import model_at
from soup_pipeline.soups.engine.layers import group_layers
from soup_pipeline.training.finetune import finetune
from toys import params_for


def result_logits(result: SoupResult, objective: Objective, dataset) -> torch.Tensor:
    """Logits of a soup (its state dict in the objective's model) or of the ensemble, on the CPU."""
    if result.state_dict is None:
        return result.info["predict"](dataset)
    device = torch.device("cpu")
    return model_logits(model_at(objective, result.state_dict, device), dataset, objective.batch_size, device)


@pytest.fixture(scope="module")
def clip_store(pretrained_base, tiny_splits, tmp_path_factory):
    base, _ = pretrained_base
    folder = tmp_path_factory.mktemp("clip-ingredients")
    hparams = [FinetuneParams(epochs=1, lr=lr, seed=seed, augmentation=aug).model_dump()
               for lr, seed, aug in [(1e-4, 1, "none"), (3e-4, 2, "light"), (2e-4, 3, "strong")]]
    return IngredientStore([finetune(base, hp, tiny_splits, folder / f"m{k}.safetensors", member=k, device="cpu")
                            for k, hp in enumerate(hparams)])


def resident_limit(method: str, K: int, b: int) -> int:
    """The most ingredients `method` may hold at once, as its docstring promises (on the CPU)."""
    if SPECS[method].resumable:  # block coordinate descent: the block it trains and the next one, prefetched
        return min(K, 2 * b)
    if method.startswith("learned_soup"):  # the memory-hungry baseline: all K, held once
        return K
    return 1  # uniform, greedy soup and the ensemble stream the ingredients: one resident at a time


@pytest.mark.parametrize("method", sorted(name for name, spec in SPECS.items() if not spec.anchored))
def test_every_method_on_open_clip_ingredients(clip_store, tiny_splits, method):
    spec = clip_store.ingredients[0].meta["classifier_spec"]
    objective = Objective(lambda: classifier_from_spec(spec), tiny_splits.fit, tiny_splits.select, batch_size=64)
    settings = dict(device="cpu", passes=0.5, epochs=1, batch_size=64, model_batch=2)
    store = IngredientStore(clip_store.ingredients)  # the method's own, so its residency peaks are this method's
    result = run_method(method, store, objective, params_for(method, **settings))
    assert torch.allclose(result.beta.sum(0), torch.ones(result.beta.shape[1], dtype=result.beta.dtype), atol=1e-9)
    if method.endswith("_plus"):  # one column per parameter tensor of the image tower and head
        assert result.beta.shape == (3, len(list(classifier_from_spec(spec).parameters())))
    if result.state_dict is not None:
        assert set(result.state_dict) == set(clip_store.keys)
        assert all(torch.isfinite(v).all() for v in result.state_dict.values() if v.is_floating_point())
    test_acc = accuracy(result_logits(result, objective, tiny_splits.test), dataset_targets(tiny_splits.test))
    assert test_acc > 0.3  # chance is 0.1
    assert result.seconds > 0 and set(result.peak_bytes) == {"cpu_rss"}  # measured; no CUDA peak on the CPU
    limit = resident_limit(method, len(store), settings["model_batch"])
    assert 1 <= store.peak_resident_count <= limit, (store.peak_resident_count, limit)
    assert 0 < store.peak_resident_bytes <= limit * store.ingredient_bytes(), (store.peak_resident_bytes, limit)
    ingredients = [clip_store.load(k) for k in range(len(clip_store))]
    if method == "ensemble":  # the mean of the K models' logits, computed here by hand
        by_hand = torch.stack([result_logits(SoupResult(method, state, result.beta, [], []), objective,
                                             tiny_splits.test)
                               for state in ingredients]).mean(0)
        assert torch.allclose(result_logits(result, objective, tiny_splits.test), by_hand, atol=1e-5)
        return
    grouping = result.info.get("chosen", {}).get("grouping") or ("tensor" if "_plus" in method else "model")
    keys = [key for key, _ in classifier_from_spec(spec).named_parameters()]
    groups = group_layers(keys, grouping)
    assert groups.names == result.layer_names
    for key in keys:  # the soup is exactly the beta-weighted sum of the ingredients, group by group
        column = result.beta[:, groups.group_of[key]].float()
        mixed = sum(weight * state[key] for weight, state in zip(column, ingredients))
        assert torch.allclose(result.state_dict[key], mixed, atol=2e-5, rtol=1e-4), key
    if method == "uniform":
        assert torch.equal(result.beta, torch.full_like(result.beta, 1 / 3))
    elif method == "greedy":
        members = result.info["members"]
        assert members and result.beta.flatten().tolist() == [
            1 / len(members) if i.name in members else 0.0 for i in clip_store.ingredients]
    elif method != "mehl_soup_plus_matched":  # the learned methods lower the fit loss they were fitted on
        uniform = run_method("uniform", clip_store, objective, params_for("uniform", **settings)).state_dict
        device = torch.device("cpu")
        before = loss_and_accuracy(model_at(objective, uniform, device), objective.fit, objective.batch_size, device)[0]
        after = loss_and_accuracy(model_at(objective, result.state_dict, device), objective.fit, objective.batch_size,
                                  device)[0]
        assert after < before, (before, after)


@pytest.fixture(scope="module")
def zero_shot(pretrained_base, tiny_splits) -> dict[str, torch.Tensor]:
    """theta_0: the base's zero-shot classifier, as the pretrain stage writes it."""
    clip = load_clip(TINY_ARCH, pretrained_base[0])
    head = zero_shot_head(clip.model, clip.tokenizer, tiny_splits.classnames, tiny_splits.templates)
    return classifier_from_clip(clip.model, head).state_dict()


ONE_CANDIDATE = {"task_arithmetic": {"scales": [0.3]}, "ties": {"scales": [1.0], "densities": [0.2]},
                 "dare": {"scales": [0.3], "drops": [0.5]}, "dare_ties": {"scales": [1.0], "drops": [0.5]},
                 "model_stock": {"groupings": ["block"]}, "wise_ft": {"alphas": [0.5]},
                 "wise_ft_soup": {"alphas": [0.5]}}  # the grids: test_merge_methods.py


@pytest.mark.parametrize("method", sorted(name for name, spec in SPECS.items() if spec.anchored))
def test_every_merge_method_on_open_clip_ingredients_and_their_zero_shot_model(clip_store, tiny_splits, zero_shot,
                                                                               method):
    spec = clip_store.ingredients[0].meta["classifier_spec"]
    objective = Objective(lambda: classifier_from_spec(spec), tiny_splits.fit, tiny_splits.select, batch_size=64)
    params = params_for(method, device="cpu", batch_size=64, search=ONE_CANDIDATE[method],
                        **({"soup": "uniform"} if SPECS[method].refines else {}))
    refined = ({"soup": run_method("uniform", clip_store, objective, params_for("uniform"))}
               if SPECS[method].refines else {})
    result = run_method(method, clip_store, objective, params, anchor=zero_shot, **refined)
    assert set(result.state_dict) == set(clip_store.keys)
    assert all(torch.isfinite(v).all() for v in result.state_dict.values() if v.is_floating_point())
    assert accuracy(result_logits(result, objective, tiny_splits.test), dataset_targets(tiny_splits.test)) > 0.3
    # theta_0 + sum_k beta_kl tau_k, by group
    if method in ("task_arithmetic", "model_stock", "wise_ft", "wise_ft_soup"):
        grouping = result.info["chosen"].get("grouping", "model")
        keys = [key for key, _ in classifier_from_spec(spec).named_parameters()]
        groups = group_layers(keys, grouping)
        ingredients = [clip_store.load(k) for k in range(len(clip_store))]
        for key in keys:
            column = result.beta[:, result.layer_names.index(groups.names[groups.group_of[key]])].float()
            moved = zero_shot[key] + sum(weight * (state[key] - zero_shot[key])
                                         for weight, state in zip(column, ingredients))
            assert torch.allclose(result.state_dict[key], moved, atol=2e-5, rtol=1e-4), key
