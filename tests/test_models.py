"""models.py: the tiny config, restricted weight loading, the classifier and its spec."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from soup_pipeline.core.ingredients import read_state_file
from soup_pipeline.core.models import (
    TINY_ARCH,
    ImageClassifier,
    classifier_from_clip,
    classifier_spec,
    load_clip,
    model_config,
    zero_shot_head,
)
from soup_pipeline.core.portable_classifier import classifier_from_spec
from soup_pipeline.runtime.errors import SoupError

CLASSNAMES = ["zero", "one", "two"]
TEMPLATES = ["a photo of the digit {}.", "the number {}."]


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_clip(TINY_ARCH)


def _signature(state: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {key: (tuple(t.shape), t.dtype) for key, t in state.items()}


def test_tiny_config_is_small_and_registered():
    config = model_config(TINY_ARCH)
    assert config["vision_cfg"] == {"image_size": 32, "layers": 4, "width": 128, "head_width": 64, "patch_size": 8,
                                    "pool_type": "avg"}
    assert config["text_cfg"]["context_length"] == 16


def test_unknown_arch_names_it():
    with pytest.raises(SoupError, match="'no-such-vit'"):
        load_clip("no-such-vit")


def test_zero_shot_head_rows_are_unit_norm(clip):
    head = zero_shot_head(clip.model, clip.tokenizer, CLASSNAMES, TEMPLATES)
    assert head.shape == (3, model_config(TINY_ARCH)["embed_dim"])
    torch.testing.assert_close(head.norm(dim=1), torch.ones(3))
    assert clip.model.training  # mode restored


def test_template_without_placeholder_is_refused(clip):
    with pytest.raises(SoupError, match="a photo"):
        zero_shot_head(clip.model, clip.tokenizer, CLASSNAMES, ["a photo"])


def test_classifier_is_scaled_cosine_without_text_tower(clip):
    head = zero_shot_head(clip.model, clip.tokenizer, CLASSNAMES, TEMPLATES)
    classifier = classifier_from_clip(clip.model, head)
    assert float(classifier.logit_scale) == pytest.approx(float(clip.model.logit_scale.detach().exp()))
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        expected = classifier.logit_scale * F.normalize(clip.model.encode_image(images), dim=-1) @ head.T
        torch.testing.assert_close(classifier(images), expected)
    keys = set(classifier.state_dict())
    assert {"head.weight", "logit_scale"} <= keys
    assert all(key.startswith("visual.") for key in keys - {"head.weight", "logit_scale"})
    assert [name for name, _ in classifier.named_buffers()] == ["logit_scale"]


def test_classifier_from_spec_matches_and_survives_json(clip):
    classifier = classifier_from_clip(clip.model, torch.randn(3, 128))
    spec = json.loads(json.dumps({**classifier_spec(TINY_ARCH, 3),
                                  "builder": "portable_classifier:classifier_from_spec"}))
    empty = classifier_from_spec(spec)
    assert isinstance(empty, ImageClassifier)
    assert _signature(empty.state_dict()) == _signature(classifier.state_dict())
    empty.load_state_dict(classifier.state_dict(), strict=True)


def test_spec_without_num_classes_is_refused():
    with pytest.raises(ValueError, match="num_classes"):  # the portable classifier has no soup_pipeline errors
        classifier_from_spec({"arch": TINY_ARCH})


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_pretrained_file_loads(clip, tmp_path, suffix):
    path = tmp_path / f"clip{suffix}"
    state = {key: value.contiguous() for key, value in clip.model.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    loaded = load_clip(TINY_ARCH, path)
    for key, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, state[key], msg=key)


def test_weights_of_another_architecture_name_the_keys(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"not.a.clip.key": torch.zeros(2)}, str(path))
    with pytest.raises(SoupError, match="not.a.clip.key"):
        load_clip(TINY_ARCH, path)


class _Payload:
    """Unpickling this would create the marker file: it must never happen."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_with_payload_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _Payload(marker)}, path)
    with pytest.raises(SoupError, match="restricted loader"):
        read_state_file(path)
    with pytest.raises(SoupError, match="restricted loader"):
        load_clip(TINY_ARCH, path)
    assert not marker.exists()


def test_tag_missing_from_cache_fails_fast(tmp_path):
    start = time.monotonic()
    with pytest.raises(SoupError, match="not in the local cache"):
        load_clip("ViT-B-32", "openai", cache_dir=str(tmp_path))
    assert time.monotonic() - start < 10


def test_unknown_tag_lists_the_known_ones():
    with pytest.raises(SoupError, match="neither an existing file nor an open_clip tag"):
        load_clip(TINY_ARCH, "no-such-tag")
