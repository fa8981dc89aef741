"""The timm family: `timm.create_model(model.arch, num_classes=..., pretrained=False, **model.kwargs)`."""

from __future__ import annotations

from typing import Any

from .base import LibraryFamily, image_preprocess


class TimmFamily(LibraryFamily):
    """Any timm architecture; the base is a state dict of it (model.pretrained) or pre-trained here."""

    name = "timm"
    builder = "timm:create_model"
    requirements = ("timm",)

    def factory_kwargs(self, model, num_classes: int) -> dict[str, Any]:
        return {"model_name": model.arch, "num_classes": int(num_classes), "pretrained": False, **model.kwargs}

    def preprocess(self, model, image_size: int) -> dict:
        """The architecture's own normalisation and interpolation (timm's data config), at `image_size`."""
        import timm
        from timm.data import resolve_model_data_config

        config = resolve_model_data_config(timm.create_model(model.arch, pretrained=False, **model.kwargs))
        return image_preprocess(image_size, config["mean"], config["std"], config.get("interpolation", "bicubic"))
