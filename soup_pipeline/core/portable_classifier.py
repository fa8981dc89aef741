"""The classifier as it travels with the registered model: self-contained, so it loads without soup-pipeline.

This file imports torch, numpy, Pillow, safetensors and open_clip only (open_clip where a model or a transform is
built, transformers where a Hugging Face sequence classifier is; never a `soup_pipeline` module): MLflow logs it
beside the registered model (`code_paths`), where it is the top-level module `portable_classifier`,
so the model loads and predicts in an environment built from nothing but its own requirements. The
pipeline imports the same file, so what the registry serves is what the pipeline evaluated.

It holds the open_clip image classifier and how any family's module is rebuilt from its JSON spec (a builder
"module:function", called with the spec or with its `builder_kwargs`), the weights' SHA-256 check,
and the serving contract: what a client sends (encoded images as bytes or base64 strings, alone or as
one DataFrame column, or preprocessed float arrays) becomes a batch through the preprocessing the
evaluation used (resize, centre crop, RGB, the model's own mean and std), and each image gets its
class name, that class's probability and the probability of every class.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import importlib
import io
import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file, save_file
from torch import nn

IMAGE_COLUMN = "image"  # the DataFrame column (or JSON key) of encoded images
LABEL, PROBABILITY = "label", "probability"  # output columns: the predicted class and its probability
CLASS_PREFIX = "p_"  # output column p_<class name>: the probability of that class
WEIGHTS_FILE, SPEC_FILE = "weights.safetensors", "model_spec.json"
WEIGHTS, SPEC = "weights", "spec"  # the MLflow artifact keys of the two files
WEIGHTS_SHA256 = "weights_sha256"  # the MLflow model_config key: the SHA-256 of weights.safetensors as logged
OWN_MODULE = "portable_classifier"  # how a spec names this file's builders, whatever its import name
BUILTIN_BUILDER = f"{OWN_MODULE}:classifier_from_spec"
SEQUENCE_BUILDER = f"{OWN_MODULE}:sequence_classifier"
EXPECTED_INPUT = (
    'encoded images (PNG, JPEG, ...) as base64 strings or bytes in one column "image" of a DataFrame '
    '(JSON: {"dataframe_split": {"columns": ["image"], "data": [["<base64 PNG>"], ...]}}), '
    "or preprocessed float32 images N x C x H x W"
)
PREDICT_BATCH = 256  # images per forward pass while predicting


class InputError(ValueError):
    """What a client sent is not an input this model takes; the message names the expected format."""


class ChangedWeights(ValueError):
    """The weights file is not the one whose SHA-256 was recorded when the model was logged."""


class ImageClassifier(nn.Module):
    """An image tower and a linear head: logits = s * normalize(visual(x)) @ head.weight.T (+ head.bias).

    s is a fixed buffer (the pre-trained logit scale), not folded into the trainable head. The
    state dict holds only `visual.*`, `head.weight` and `logit_scale`: what an ingredient holds; with
    `head_bias` (checkpoints whose head has one, e.g. the model-soups fine-tunes, imported with s = 1) also
    `head.bias`.
    """

    def __init__(self, visual: nn.Module, head: torch.Tensor, logit_scale: float, *, head_bias: bool = False):
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(head.shape[1], head.shape[0], bias=head_bias)
        with torch.no_grad():
            self.head.weight.copy_(head)
            if head_bias:
                self.head.bias.zero_()
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.logit_scale * F.normalize(self.visual(images), dim=-1) @ self.head.weight.T
        return logits if self.head.bias is None else logits + self.head.bias


def classifier_from_spec(spec: Mapping) -> ImageClassifier:
    """An untrained classifier whose state dict matches a fine-tuned ingredient's keys, shapes and dtypes.

    The spec holds arch, num_classes, the open_clip model_config and, for a head with a bias, head_bias (what
    `core.models.classifier_spec` writes); only the image tower is built (no text tower). Other keys are ignored.
    """
    missing = [key for key in ("num_classes", "model_config") if key not in spec]
    if missing:
        raise ValueError(f"classifier spec lacks {missing}; build it with soup_pipeline.core.models.classifier_spec")
    # open_clip only where a model is built (ingredients import this file)
    from open_clip.model import _build_vision_tower

    config = spec["model_config"]
    visual = _build_vision_tower(config["embed_dim"], config["vision_cfg"], config.get("quick_gelu", False))
    return ImageClassifier(visual, torch.zeros(int(spec["num_classes"]), config["embed_dim"]), logit_scale=1.0,
                           head_bias=bool(spec.get("head_bias", False)))


# --- the model's files ---------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_weights(path: str | Path, expected: str | None, *, recorded_in: str, fix: str) -> None:
    """Refuse a weights file whose SHA-256 is not `expected` (None: nothing was recorded, nothing is checked)."""
    if expected is None:
        return
    actual = file_sha256(path)
    if actual != expected:
        raise ChangedWeights(f"{path}: sha256 {actual} does not match {expected} recorded in {recorded_in} when it "
                             f"was written; the file was changed after it was written: {fix}")


def write_model_files(state_dict: Mapping[str, torch.Tensor], spec: Mapping, directory: str | Path) -> dict[str, Path]:
    """Write weights.safetensors and model_spec.json into `directory`; return both paths by file name."""
    directory = Path(directory)
    try:
        spec_text = json.dumps(dict(spec), indent=2, sort_keys=True)
    except TypeError as exc:
        raise ValueError(f"model spec must be JSON-serialisable ({exc}); store paths and dtypes as strings") from exc
    files = {WEIGHTS_FILE: directory / WEIGHTS_FILE, SPEC_FILE: directory / SPEC_FILE}
    save_file({key: tensor.detach().cpu().contiguous() for key, tensor in state_dict.items()}, str(files[WEIGHTS_FILE]))
    files[SPEC_FILE].write_text(spec_text + "\n")
    return files


def sequence_classifier(model_type: str, **config: Any) -> nn.Module:
    """A Hugging Face sequence classifier (randomly initialised) of `model_type` ("bert", "distilbert", ...) from
    its config's keyword arguments (num_labels, vocab_size, hidden_size, ...): transformers is imported here only."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_config(AutoConfig.for_model(model_type, **config))


def resolve_builder(ref: str | None) -> Callable[..., nn.Module]:
    """The module builder a spec names: one of this file's (None is its open_clip classifier), or a team's
    "package.module:function" (that package must then be installed where the model loads)."""
    if ref is None:
        return classifier_from_spec
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"model spec builder {ref!r} must look like 'package.module:function'")
    if module_name == OWN_MODULE:
        if ref not in (BUILTIN_BUILDER, SEQUENCE_BUILDER):
            raise ValueError(f"model spec builder {ref!r}: {OWN_MODULE} builds {BUILTIN_BUILDER} or {SEQUENCE_BUILDER}")
        return classifier_from_spec if ref == BUILTIN_BUILDER else sequence_classifier
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"model spec builder {ref!r} cannot be imported ({exc}); install the package that defines it "
                         "where the model loads") from exc


def make_module(spec: Mapping) -> nn.Module:
    """The untrained module the spec's builder makes: called with `builder_kwargs` where the spec has them (a
    library's own factory, e.g. "timm:create_model" or "torchvision.models:get_model"), else with the spec."""
    builder = resolve_builder(spec.get("builder"))
    return builder(**spec["builder_kwargs"]) if "builder_kwargs" in spec else builder(dict(spec))


def build_module(spec: Mapping, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """The module the spec's builder makes, with `state_dict` loaded strictly, in eval mode."""
    module = make_module(spec)
    try:
        module.load_state_dict(dict(state_dict), strict=True)
    except RuntimeError as exc:
        raise ValueError(f"weights do not fit the module built by {spec.get('builder', BUILTIN_BUILDER)}: "
                         f"{exc}") from exc
    return module.eval()


def load_classifier(directory: str | Path) -> tuple[nn.Module, dict]:
    """The classifier and its spec from a folder holding weights.safetensors and model_spec.json (an export)."""
    directory = Path(directory)
    spec = json.loads((directory / SPEC_FILE).read_text())
    return build_module(spec, load_file(directory / WEIGHTS_FILE)), spec


# --- what a client sends -------------------------------------------------------------------------


def image_transform(preprocess: Mapping[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """open_clip's evaluation transform for the spec's `preprocess` (open_clip's preprocess config keys)."""
    import open_clip

    return open_clip.image_transform(
        preprocess["size"], is_train=False, mean=tuple(preprocess["mean"]), std=tuple(preprocess["std"]),
        resize_mode=preprocess.get("resize_mode"), interpolation=preprocess.get("interpolation"),
        fill_color=preprocess.get("fill_color", 0))


def decode_image(item: Any, index: int) -> Image.Image:
    """One encoded image (bytes, or a base64 string) as a PIL image; an InputError naming the item otherwise."""
    if isinstance(item, str):
        try:
            item = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InputError(f"image {index} is a string but not base64 ({exc}); expected {EXPECTED_INPUT}") from None
    if not isinstance(item, (bytes, bytearray, memoryview)):
        raise InputError(f"image {index} is a {type(item).__name__}, not an encoded image; expected {EXPECTED_INPUT}")
    try:
        image = Image.open(io.BytesIO(bytes(item)))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"image {index} ({len(item)} bytes) is not an image Pillow can decode "
                         f"({type(exc).__name__}); expected {EXPECTED_INPUT}") from None
    return image


def encoded_items(model_input: Any) -> Sequence | None:
    """The encoded images of an input (a DataFrame's column, a dict's key, a list or array of strings or bytes),
    or None for a numeric array."""
    if hasattr(model_input, "columns"):  # a pandas DataFrame (this file does not import pandas)
        columns = list(model_input.columns)
        if IMAGE_COLUMN not in columns and len(columns) != 1:
            raise InputError(f"a DataFrame with columns {columns[:5]}; expected {EXPECTED_INPUT}")
        return list(model_input[IMAGE_COLUMN if IMAGE_COLUMN in columns else columns[0]])
    if isinstance(model_input, Mapping):
        if IMAGE_COLUMN not in model_input:
            raise InputError(f"a mapping with keys {list(model_input)[:5]}; expected {EXPECTED_INPUT}")
        return encoded_items(model_input[IMAGE_COLUMN])
    if isinstance(model_input, (str, bytes)):
        return [model_input]
    if isinstance(model_input, (list, tuple)) or (isinstance(model_input, np.ndarray)
                                                  and model_input.dtype.kind in "OSUV"):
        return (list(np.asarray(model_input, dtype=object).ravel()) if isinstance(model_input, np.ndarray)
                else list(model_input))
    return None


def float_batch(model_input: Any, preprocess: Mapping[str, Any] | None) -> torch.Tensor:
    """A numeric N x C x H x W array as a float32 batch, checked (shape against `preprocess`, finite values)."""
    try:
        array = np.asarray(model_input, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InputError(f"input of type {type(model_input).__name__} ({exc}); expected {EXPECTED_INPUT}") from None
    expected = (3, *size_of(preprocess)) if preprocess else None
    if array.ndim != 4 or (expected is not None and array.shape[1:] != expected):
        raise InputError(f"a float array of shape {array.shape}; expected {EXPECTED_INPUT}"
                         + (f" with C x H x W = {expected}" if expected else ""))
    if not np.isfinite(array).all():
        raise InputError("the float images hold NaN or infinite values; send finite preprocessed pixels")
    return torch.from_numpy(array)


def size_of(preprocess: Mapping[str, Any]) -> tuple[int, int]:
    """(H, W) the preprocessing produces."""
    size = preprocess["size"]
    return (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))


def to_batch(model_input: Any, spec: Mapping[str, Any]) -> torch.Tensor:
    """What a client sent as the model's input batch: encoded images through the spec's preprocessing,
    or preprocessed float arrays as they are."""
    preprocess = spec.get("preprocess")
    items = encoded_items(model_input)
    if items is None:
        return float_batch(model_input, preprocess)
    if not items:
        raise InputError(f"no images in the input; expected {EXPECTED_INPUT}")
    if preprocess is None:
        raise InputError("this model was registered without its preprocessing, so it takes preprocessed float32 "
                         "images N x C x H x W only")
    transform = image_transform(preprocess)
    return torch.stack([transform(decode_image(item, index)) for index, item in enumerate(items)])


def class_names(spec: Mapping[str, Any]) -> list[str]:
    """The spec's class names, or the class indices as strings where it has none."""
    return [str(name) for name in spec.get("classnames") or range(int(spec["num_classes"]))]


def probabilities(module: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Softmax of the module's logits, float32 on the CPU, computed in batches of PREDICT_BATCH."""
    device = next(module.parameters()).device
    with torch.inference_mode():
        parts = [torch.softmax(module(chunk.to(device)).float(), dim=-1).cpu() for chunk in batch.split(PREDICT_BATCH)]
    return torch.cat(parts)


def prediction_columns(probs: torch.Tensor, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Per image: `label` (the most probable class's name), `probability` (its probability) and `p_<name>` for
    every class, as columns (a DataFrame's or a JSON record's)."""
    if probs.shape[1] != len(names):
        raise ValueError(f"{len(names)} class names for {probs.shape[1]} outputs; "
                         "register the model with its class names")
    top = probs.argmax(dim=1)
    columns = {LABEL: np.asarray([names[i] for i in top.tolist()], dtype=object),
               PROBABILITY: probs.gather(1, top[:, None])[:, 0].numpy()}
    columns.update({f"{CLASS_PREFIX}{name}": probs[:, i].numpy() for i, name in enumerate(names)})
    return columns


def png_bytes(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> bytes:
    """A normalised C x H x W image (what the preprocessing produced from an 8-bit image) back as PNG bytes."""
    pixels = image.float() * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    array = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(buffer, format="PNG")
    return buffer.getvalue()
