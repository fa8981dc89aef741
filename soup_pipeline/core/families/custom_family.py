"""A team's own module: `model.family: "package.module:function"`, called as
function(num_classes=..., **model.kwargs)."""

from __future__ import annotations

from typing import Any

from .base import LibraryFamily


class CustomFamily(LibraryFamily):
    """The team's builder returns an `nn.Module` mapping an image batch to logits; its package must be installed
    wherever the registered model loads (it is added to the model's requirements when it is a distribution)."""

    name = "custom"

    def __init__(self, builder: str):
        self.builder = builder
        self.requirements = (builder.split(".")[0].split(":")[0],)

    def factory_kwargs(self, model, num_classes: int) -> dict[str, Any]:
        return {"num_classes": int(num_classes), **model.kwargs}
