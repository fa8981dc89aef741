"""The transformers family: a Hugging Face sequence classifier built from its config (`model.arch` is the model type,
"bert", "distilbert", ...; `model.kwargs` the config: vocab_size, hidden_size, num_hidden_layers, ...), randomly
initialised; its batches are tokenized mappings (input_ids, attention_mask, ...: `core.data.TokenizedDataset`)."""

from __future__ import annotations

from typing import Any

from ...runtime.errors import SoupError
from ..portable_classifier import SEQUENCE_BUILDER
from .base import LibraryFamily


class TransformersFamily(LibraryFamily):
    """Text classifiers souped through `soup_subflow` and the engine; the base is a state dict of the module (its
    keys as `save_pretrained` writes them). The pipeline's stages read images, so they refuse this family."""

    name = "transformers"
    builder = SEQUENCE_BUILDER
    requirements = ("transformers",)

    def factory_kwargs(self, model, num_classes: int) -> dict[str, Any]:
        return {"model_type": model.arch, "num_labels": int(num_classes), **model.kwargs}

    def preprocess(self, model, image_size: int) -> dict:
        raise SoupError("model.family transformers classifies tokenized text, and the pipeline's stages read images "
                        "(digits or an image folder): soup text classifiers with soup_subflow(family='transformers') "
                        "on data sets of tokenized examples (soup_pipeline.core.data.TokenizedDataset)")
