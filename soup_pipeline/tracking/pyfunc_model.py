"""The soup as an MLflow pyfunc model: safetensors weights plus a JSON spec, no pickled tensors, no soup-pipeline.

MLflow logs this file "from code" (it runs it to get the model: `set_model` at the end) and
`portable_classifier.py` beside it (`code_paths`), so the registered model loads where only its own
requirements are installed: this file imports MLflow, pandas, torch, safetensors and the logged
`portable_classifier`, never `soup_pipeline`. The spec's `builder` is `portable_classifier:classifier_from_spec`
(the open_clip classifier), a library's factory such as "timm:create_model" with `builder_kwargs` (that library is
among the model's requirements), or a team's own "module:function" (then that package must be installed).
The weights' SHA-256 is recorded in the model's MLmodel file (pyfunc `model_config`, key
"weights_sha256") when it is logged and checked before they are loaded. `predict` takes encoded images
(or preprocessed float arrays) and answers per image the class name, its probability and every class's;
an input of any other kind is refused as a bad request (HTTP 400 from `mlflow models serve`) naming the
expected format.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.models
import mlflow.pyfunc
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST
from safetensors.torch import load_file

try:  # the copy logged with the model (its code/ folder is on sys.path when MLflow loads the model)
    import portable_classifier
except ModuleNotFoundError:  # logging the model from inside the package: the same file
    from soup_pipeline.core import portable_classifier

WEIGHTS, SPEC, WEIGHTS_SHA256 = (portable_classifier.WEIGHTS, portable_classifier.SPEC,
                                 portable_classifier.WEIGHTS_SHA256)


def check_weights(path: str, config: dict | None) -> None:
    """Refuse weights whose SHA-256 is not the one logged in `config` (a model logged without one is not checked)."""
    portable_classifier.check_weights(
        path, (config or {}).get(WEIGHTS_SHA256),
        recorded_in=f"the model's MLmodel file (model_config {WEIGHTS_SHA256})",
        fix="register the soup again (re-run the soup stage with tracking) or restore the model's artifacts")


def predict_frame(module: torch.nn.Module, spec: dict, model_input) -> pd.DataFrame:
    """Per image of `model_input`: label, probability and p_<class> for every class; a bad input is a BAD_REQUEST
    (MLflow's scoring server answers it with HTTP 400 and this message, no stack trace)."""
    try:
        batch = portable_classifier.to_batch(model_input, spec)
    except portable_classifier.InputError as exc:
        raise MlflowException(str(exc), error_code=BAD_REQUEST) from None
    probs = portable_classifier.probabilities(module, batch)
    return pd.DataFrame(portable_classifier.prediction_columns(probs, portable_classifier.class_names(spec)))


class SoupPyfuncModel(mlflow.pyfunc.PythonModel):
    """Loads the soup from its safetensors + JSON artifacts and predicts class names and probabilities."""

    def load_context(self, context) -> None:
        """Check the weights' hash, build the module from the spec and load them (on the GPU when there is one)."""
        check_weights(context.artifacts[WEIGHTS], context.model_config)
        self.spec = json.loads(Path(context.artifacts[SPEC]).read_text())
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.module = portable_classifier.build_module(self.spec, load_file(context.artifacts[WEIGHTS])).to(device)

    def predict(self, context, model_input, params: dict | None = None) -> pd.DataFrame:
        """One row per image: `label`, `probability`, and `p_<class>` for every class (see `portable_classifier`)."""
        return predict_frame(self.module, self.spec, model_input)


mlflow.models.set_model(SoupPyfuncModel())
