"""`soup-pipeline import`: external checkpoints become sweep members through the restricted loader."""

from __future__ import annotations

import pytest
import torch

from soup_pipeline.config import Params, SoupParams
from soup_pipeline.core.settings import DataParams
from soup_pipeline.runtime.errors import IngredientError
from soup_pipeline.core.ingredients import IngredientStore
from soup_pipeline.core.models import classifier_from_spec, classifier_spec
from soup_pipeline.stages import importer

PARAMS = Params(data=DataParams(pretrain_size=10, train_size=10, heldout_size=50, test_size=10),
                soup=SoupParams(device="cpu"))


def test_a_wrapped_state_dict_becomes_an_ingredient(tmp_path):
    model = classifier_from_spec(classifier_spec("soup-tiny-vit", 10))
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "ext.pt")
    ingredient = importer.run(PARAMS, tmp_path, tmp_path / "ext.pt", 5, strip_prefix="module.")
    assert ingredient.path == tmp_path / "runs/imported/member-5.safetensors"
    assert 0.0 <= ingredient.fit_acc <= 1.0 and ingredient.meta["imported_from"].endswith("ext.pt")
    loaded = IngredientStore([ingredient.path]).load(0)
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_a_checkpoint_of_another_architecture_is_refused_by_key(tmp_path):
    torch.save({"encoder.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(IngredientError, match="does not fit soup-tiny-vit with 10 classes: missing .*unexpected \\['encoder.weight'\\]"):
        importer.run(PARAMS, tmp_path, tmp_path / "other.pt", 0)
    assert not (tmp_path / "runs/imported/member-0.safetensors").exists()
