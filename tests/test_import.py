"""`soup-pipeline import`: external checkpoints become sweep members through the restricted loader."""

from __future__ import annotations

import pytest
import torch

from soup_pipeline.config import Params, SoupParams
from soup_pipeline.core.ingredients import IngredientStore
from soup_pipeline.core.models import classifier_spec
from soup_pipeline.core.portable_classifier import classifier_from_spec
from soup_pipeline.core.settings import DataParams
from soup_pipeline.runtime.errors import IngredientError
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
    with pytest.raises(IngredientError,
                       match="key 'encoder.weight' .* is not a key of the classifier .*check model.arch"):
        importer.run(PARAMS, tmp_path, tmp_path / "other.pt", 0)
    model = classifier_from_spec(classifier_spec("soup-tiny-vit", 10))
    torch.save({k: v for k, v in model.state_dict().items() if k != "head.weight"}, tmp_path / "part.pt")
    with pytest.raises(IngredientError,
                       match="does not fit soup-tiny-vit with 10 classes: missing \\['head.weight'\\]"):
        importer.run(PARAMS, tmp_path, tmp_path / "part.pt", 0)
    assert not (tmp_path / "runs/imported/member-0.safetensors").exists()


def model_soups_checkpoint(clip, head: torch.Tensor, bias: torch.Tensor) -> dict[str, torch.Tensor]:
    """A state dict in the layout of the public model-soups fine-tunes (their ModelWrapper): the CLIP as `model.*`
    without its text transformer (which they delete), and a `classification_head` with weight and bias."""
    wrapped = {f"model.{key}": value for key, value in clip.state_dict().items() if not key.startswith("transformer.")}
    return {**wrapped, "classification_head.weight": head, "classification_head.bias": bias}


def test_model_soups_checkpoints_import_without_configuration_and_give_their_own_logits(tmp_path):
    """The imported classifier's logits equal the model-soups forward pass: the image features, normalised, times
    the head, plus the bias (Wortsman et al.'s ModelWrapper with normalize=True)."""
    from soup_pipeline.core.models import TINY_ARCH, load_clip

    clip = load_clip(TINY_ARCH).model.eval()
    generator = torch.Generator().manual_seed(0)
    head, bias = torch.randn(10, 128, generator=generator) * 20, torch.randn(10, generator=generator)
    torch.save(model_soups_checkpoint(clip, head, bias), tmp_path / "model_soups_ft.pt")
    ingredient = importer.run(PARAMS, tmp_path, tmp_path / "model_soups_ft.pt", 7)
    assert ingredient.meta["classifier_spec"]["head_bias"] is True
    model = classifier_from_spec(ingredient.meta["classifier_spec"])
    model.load_state_dict(IngredientStore([ingredient.path]).load(0))
    images = torch.randn(6, 3, 32, 32, generator=generator)
    with torch.no_grad():
        features = clip.encode_image(images)
        reference = (features / features.norm(dim=-1, keepdim=True)) @ head.T + bias
        torch.testing.assert_close(model.eval()(images), reference, rtol=1e-5, atol=1e-5)
    assert set(IngredientStore([ingredient.path]).load(0)) == {*model.state_dict()}  # no text tower kept


def test_key_map_and_drop_place_a_teams_keys_and_an_unmatched_key_is_refused_naming_a_rule(tmp_path):
    from soup_pipeline.core.settings import ImportParams, KeyRuleParams

    model = classifier_from_spec(classifier_spec("soup-tiny-vit", 10))
    team = {f"backbone.{k.removeprefix('visual.')}": v for k, v in model.state_dict().items()
            if k.startswith("visual.")}
    team |= {"fc.weight": model.state_dict()["head.weight"], "logit_scale": model.logit_scale,
             "text.embed": torch.zeros(2)}
    torch.save(team, tmp_path / "team.pt")
    rules = [KeyRuleParams(prefix="backbone.", to="visual."), KeyRuleParams(regex=r"fc\.(weight)", to=r"head.\1")]
    params = PARAMS.model_copy(update={"imports": ImportParams(key_map=rules)})
    with pytest.raises(IngredientError, match="key 'text.embed' .*drop it with imports.drop"):
        importer.run(params, tmp_path, tmp_path / "team.pt", 3)
    params = PARAMS.model_copy(update={"imports": ImportParams(key_map=rules, drop=[r"text\."])})
    loaded = IngredientStore([importer.run(params, tmp_path, tmp_path / "team.pt", 3).path]).load(0)
    assert (all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
            and set(loaded) == set(model.state_dict()))
    # without the prefix rule, the first tower key is refused with the rule that would place it
    params = PARAMS.model_copy(update={"imports": ImportParams(key_map=rules[1:], drop=[r"text\."])})
    with pytest.raises(IngredientError,
                       match=r"key 'backbone\..*a rule such as \{prefix: 'backbone.', to: 'visual.'\}"):
        importer.run(params, tmp_path, tmp_path / "team.pt", 3)
