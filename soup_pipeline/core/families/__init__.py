"""Model families: how each kind of classifier is described, preprocessed and started from its base.

`model.family` in params.yaml picks one: `open_clip` (the default: an open_clip image tower with a zero-shot head
from the text tower), `timm`, `torchvision`, a team's own builder `"package.module:function"`, or `transformers` (a
Hugging Face text classifier, souped through `soup_subflow`: the pipeline's stages read images). A family gives

- `spec(model, num_classes)`: the JSON spec every ingredient, soup and registered model is built from (by
  `portable_classifier.make_module`, the one builder, also where the registered model loads);
- `preprocess(model, image_size)`: how a real image becomes the model's input (open_clip's preprocess keys);
- `base_classifier(model, base, splits)`: the classifier every fine-tune starts from (theta_0 of the merge
  methods): open_clip's zero-shot classifier, else the family's module with the base weights loaded;
- `zero_shot`: whether that classifier's head comes from text prompts (open_clip) or from pre-training here
  (the pipeline then pre-trains the whole classifier on the pre-training split, supervised).

Each family's own package (open_clip, timm, torchvision) is imported in its module only (transformers in
`portable_classifier.sequence_classifier`, the builder the registered model would call).
"""

from __future__ import annotations

from ..settings import ModelParams
from .base import ModelFamily
from .custom_family import CustomFamily
from .open_clip_family import OpenClipFamily
from .timm_family import TimmFamily
from .torchvision_family import TorchvisionFamily
from .transformers_family import TransformersFamily

BUILT_IN: dict[str, ModelFamily] = {"open_clip": OpenClipFamily(), "timm": TimmFamily(),
                                    "torchvision": TorchvisionFamily(), "transformers": TransformersFamily()}


def family_of(model: ModelParams) -> ModelFamily:
    """The family `model.family` names (a "package.module:function" is a team's own builder)."""
    return BUILT_IN.get(model.family) or CustomFamily(model.family)
