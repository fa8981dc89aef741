"""The torchvision family: `torchvision.models.get_model(model.arch, num_classes=..., weights=None, **model.kwargs)`."""

from __future__ import annotations

from typing import Any

from .base import LibraryFamily


class TorchvisionFamily(LibraryFamily):
    """Any torchvision classification model; ImageNet normalisation; the base is a state dict of it or pre-trained
    here."""

    name = "torchvision"
    builder = "torchvision.models:get_model"

    def factory_kwargs(self, model, num_classes: int) -> dict[str, Any]:
        return {"name": model.arch, "num_classes": int(num_classes), "weights": None, **model.kwargs}
