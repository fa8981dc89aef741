"""The soup as an MLflow pyfunc model: safetensors weights plus a JSON spec, no pickled tensors.

The spec names its builder as "module:function" (in production
"soup_pipeline.core.models:classifier_from_spec"); the builder takes the spec dict and returns an
`nn.Module` whose state dict matches the weights. `predict` maps an image batch
(float32, N x C x H x W) to class probabilities (float32, N x num_classes).
The weights' SHA-256 is recorded in the model's MLmodel file (pyfunc `model_config`,
key "weights_sha256") when it is logged and checked before the weights are loaded, so a changed
byte is refused naming the file and the expected hash.
The model is logged "from code": MLflow copies this file beside the artifacts and runs it to get
the model (see `set_model` at the end), so nothing is pickled. Only `soup_pipeline.tracking`
imports this module (it imports MLflow); imports are absolute because MLflow runs it as a file.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Callable, Mapping

import mlflow.models
import mlflow.pyfunc
import numpy as np
import torch
from safetensors.torch import load_file, save_file

from soup_pipeline.runtime.errors import SoupError
from soup_pipeline.core.ingredients import file_sha256, verify_sha256

WEIGHTS = "weights"  # artifact key of weights.safetensors
SPEC = "spec"  # artifact key of model_spec.json
WEIGHTS_SHA256 = "weights_sha256"  # model_config key: the SHA-256 of weights.safetensors as logged


def resolve_builder(ref: str) -> Callable[[dict], torch.nn.Module]:
    """Import the builder named "module:function"."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise SoupError(f"model spec builder {ref!r} must look like 'package.module:function'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise SoupError(
            f"model spec builder {ref!r} cannot be imported ({exc}); install the package that defines it"
        ) from exc


def build_module(spec: Mapping, state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """Build the module named by `spec["builder"]`, load `state_dict` strictly, switch to eval mode."""
    if "builder" not in spec:
        raise SoupError("model spec has no 'builder' key; add e.g. 'soup_pipeline.core.models:classifier_from_spec'")
    module = resolve_builder(spec["builder"])(dict(spec))
    try:
        module.load_state_dict(dict(state_dict), strict=True)
    except RuntimeError as exc:
        raise SoupError(f"weights do not fit the module built by {spec['builder']}: {exc}") from exc
    return module.eval()


def predict_proba(module: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """Softmax of the module's logits for a float32 N x C x H x W batch, as float32 numpy."""
    device = next(module.parameters()).device
    with torch.inference_mode():
        logits = module(torch.as_tensor(np.asarray(images, dtype=np.float32), device=device))
    return torch.softmax(logits.float(), dim=-1).cpu().numpy()


def write_model_files(state_dict: Mapping[str, torch.Tensor], spec: Mapping, directory: str | Path) -> dict[str, str]:
    """Write weights.safetensors and model_spec.json into `directory`; return the pyfunc artifacts map."""
    directory = Path(directory)
    try:
        spec_text = json.dumps(dict(spec), indent=2, sort_keys=True)
    except TypeError as exc:
        raise SoupError(f"model spec must be JSON-serialisable ({exc}); store paths and dtypes as strings") from exc
    weights = directory / "weights.safetensors"
    spec_path = directory / "model_spec.json"
    save_file({key: tensor.detach().cpu().contiguous() for key, tensor in state_dict.items()}, str(weights))
    spec_path.write_text(spec_text + "\n")
    return {WEIGHTS: str(weights), SPEC: str(spec_path)}


def model_config(artifacts: Mapping[str, str]) -> dict[str, str]:
    """The pyfunc model_config to log beside `artifacts`: the SHA-256 of the weights as written."""
    return {WEIGHTS_SHA256: file_sha256(artifacts[WEIGHTS])}


def check_weights(path: str | Path, config: Mapping | None) -> None:
    """Refuse weights whose SHA-256 is not the one logged in `config` (a model logged without one is not checked)."""
    expected = (config or {}).get(WEIGHTS_SHA256)
    if expected is not None:
        verify_sha256(path, expected, recorded_in=f"the model's MLmodel file (model_config {WEIGHTS_SHA256})",
                      fix="register the soup again (re-run the soup stage with tracking) or restore the model's artifacts")


class SoupPyfuncModel(mlflow.pyfunc.PythonModel):
    """Loads the soup from its safetensors + JSON artifacts and predicts class probabilities."""

    def load_context(self, context) -> None:
        """Check the weights' hash, build the module from the spec and load them (on the GPU when there is one)."""
        check_weights(context.artifacts[WEIGHTS], context.model_config)
        spec = json.loads(Path(context.artifacts[SPEC]).read_text())
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.module = build_module(spec, load_file(context.artifacts[WEIGHTS])).to(device)

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        """Class probabilities (N x num_classes) for an N x C x H x W float32 batch."""
        return predict_proba(self.module, model_input)


mlflow.models.set_model(SoupPyfuncModel())
