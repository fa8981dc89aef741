"""The open_clip family (the default): an open_clip image tower with a zero-shot head built from the text tower."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..data import DataSplits
from ..models import classifier_from_clip, classifier_spec, load_clip, preprocess_config, zero_shot_head


class OpenClipFamily:
    """`model.arch` is an open_clip architecture; the base is a CLIP model (a weights file or a cached tag)."""

    name = "open_clip"
    zero_shot = True

    def spec(self, model, num_classes: int) -> dict:
        return classifier_spec(model.arch, num_classes)

    def preprocess(self, model, image_size: int) -> dict:
        return preprocess_config(model.arch)

    def base_classifier(self, model, base: str | Path, splits: DataSplits) -> nn.Module:
        """The image tower with the zero-shot head of the data's class names and prompt templates."""
        clip = load_clip(model.arch, base, cache_dir=model.cache_dir)
        head = zero_shot_head(clip.model, clip.tokenizer, splits.classnames, splits.templates)
        return classifier_from_clip(clip.model, head)
