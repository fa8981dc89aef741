"""Every souping method on real open_clip ingredients (the tiny shipped ViT, fine-tuned briefly)."""

from __future__ import annotations

import pytest
import torch

from soup_pipeline.config import FinetuneParams, SoupParams
from soup_pipeline.evaluate import accuracy, dataset_targets, result_logits
from soup_pipeline.finetune import finetune
from soup_pipeline.ingredients import IngredientStore
from soup_pipeline.models import classifier_from_spec
from soup_pipeline.soups import METHODS, Objective, run_method


@pytest.fixture(scope="module")
def clip_store(pretrained_base, tiny_splits, tmp_path_factory):
    base, _ = pretrained_base
    folder = tmp_path_factory.mktemp("clip-ingredients")
    hparams = [FinetuneParams(epochs=1, lr=lr, seed=seed, augmentation=aug).model_dump()
               for lr, seed, aug in [(1e-4, 1, "none"), (3e-4, 2, "light"), (2e-4, 3, "strong")]]
    return IngredientStore([finetune(base, hp, tiny_splits, folder / f"m{k}.safetensors", member=k, device="cpu")
                            for k, hp in enumerate(hparams)])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_on_open_clip_ingredients(clip_store, tiny_splits, method):
    spec = clip_store.ingredients[0].meta["classifier_spec"]
    objective = Objective(lambda: classifier_from_spec(spec), tiny_splits.fit, tiny_splits.select, batch_size=64)
    params = SoupParams(device="cpu", passes=0.5, learned_epochs=1, batch_size=64, model_batch=2)
    result = run_method(method, clip_store, objective, params)
    assert torch.allclose(result.beta.sum(0), torch.ones(result.beta.shape[1], dtype=result.beta.dtype), atol=1e-9)
    if method.endswith("_plus"):  # one column per parameter tensor of the image tower and head
        assert result.beta.shape == (3, len(list(classifier_from_spec(spec).parameters())))
    if result.state_dict is not None:
        assert set(result.state_dict) == set(clip_store.keys)
        assert all(torch.isfinite(v).all() for v in result.state_dict.values() if v.is_floating_point())
    test_acc = accuracy(result_logits(result, objective, tiny_splits.test, "cpu"), dataset_targets(tiny_splits.test))
    assert test_acc > 0.3  # chance is 0.1
    assert result.seconds > 0 and result.peak_bytes["cpu_rss"] >= 0
