"""What every model family provides, and the part the library families (timm, torchvision, a team's own builder)
share: a spec that calls the library's own factory with keyword arguments, and a base checkpoint that is a state
dict of the family's module."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Sequence

from torch import nn

from ...runtime.errors import SoupError
from ..data import DataSplits
from ..ingredients import read_state_file
from ..portable_classifier import make_module

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ModelFamily(Protocol):
    """How one kind of classifier is described, preprocessed and started from its base (see the package doc)."""

    name: str
    zero_shot: bool

    def spec(self, model, num_classes: int) -> dict: ...

    def preprocess(self, model, image_size: int) -> dict: ...

    def base_classifier(self, model, base: str | Path, splits: DataSplits) -> nn.Module: ...


def image_preprocess(image_size: int, mean: Sequence[float], std: Sequence[float],
                     interpolation: str = "bicubic") -> dict:
    """Resize the shorter side to `image_size`, centre-crop, normalise: open_clip's preprocess keys."""
    return {"size": int(image_size), "mode": "RGB", "mean": [float(m) for m in mean], "std": [float(s) for s in std],
            "interpolation": interpolation, "resize_mode": "shortest", "fill_color": 0}


class LibraryFamily:
    """A family whose modules a library factory builds from keyword arguments (`builder_kwargs`), whose head is
    trained (no zero-shot head: the pipeline pre-trains the whole classifier) and whose base is a state dict."""

    name = "library"
    zero_shot = False
    builder = ""  # "module:function" of the factory
    requirements: tuple[str, ...] = ()  # distributions the registered model needs beyond torch and open_clip's

    def factory_kwargs(self, model, num_classes: int) -> dict[str, Any]:
        raise NotImplementedError

    def spec(self, model, num_classes: int) -> dict:
        """The JSON spec: the factory, its keyword arguments, and what the registered model must install."""
        return {"family": self.name, "arch": model.arch, "num_classes": int(num_classes), "builder": self.builder,
                "builder_kwargs": self.factory_kwargs(model, num_classes), "requirements": list(self.requirements)}

    def preprocess(self, model, image_size: int) -> dict:
        return image_preprocess(image_size, IMAGENET_MEAN, IMAGENET_STD)

    def base_classifier(self, model, base: str | Path, splits: DataSplits) -> nn.Module:
        """The family's module for the data's classes with the base checkpoint (a state dict of it) loaded strictly."""
        module = make_module(self.spec(model, len(splits.classnames)))
        state = read_state_file(base, strip_prefix="module.")
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise SoupError(f"{base} does not fit {self.name} {model.arch} with {len(splits.classnames)} classes: "
                            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}; "
                            "give model.pretrained as a state dict of that module (with its head for these classes), "
                            "or leave it out to "
                            "pre-train here")
        return module

