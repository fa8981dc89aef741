"""A registered soup read back for `soup-pipeline export`: its weights (checked against the SHA-256 in its MLmodel
file) and its spec, from the model folder MLflow downloads; `soup_pipeline.stages.export` writes the export."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from ..core import portable_classifier
from ..runtime.errors import SoupError
from .mlflow_sources import download_model_version

PYFUNC = "python_function"  # the MLmodel flavor holding the artifacts and the model_config


def model_files(model_dir: Path, source: str) -> tuple[Path, Path, str | None]:
    """(weights, spec, recorded weights SHA-256) of a downloaded pyfunc model folder of this package."""
    flavor = yaml.safe_load((model_dir / "MLmodel").read_text()).get("flavors", {}).get(PYFUNC, {})
    artifacts = flavor.get("artifacts", {})
    if not {portable_classifier.WEIGHTS, portable_classifier.SPEC} <= artifacts.keys():
        raise SoupError(f"{source} is not a soup registered by soup-pipeline (its model has the artifacts "
                        f"{sorted(artifacts)}, not {portable_classifier.WEIGHTS!r} and {portable_classifier.SPEC!r})")
    weights, spec = (model_dir / artifacts[key]["path"]
                     for key in (portable_classifier.WEIGHTS, portable_classifier.SPEC))
    return weights, spec, (flavor.get("model_config") or {}).get(portable_classifier.WEIGHTS_SHA256)


def registered_classifier(source: str, tracking_uri: str, download_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The classifier's state dict and spec of the registered version `source` names (models:/NAME/VERSION or
    models:/NAME@ALIAS), downloaded into `download_dir`; weights changed since they were logged are refused."""
    model_dir = download_model_version(source, tracking_uri, download_dir)
    weights, spec, sha256 = model_files(model_dir, source)
    try:
        portable_classifier.check_weights(weights, sha256, recorded_in=f"the MLmodel file of {source}",
                                          fix="register the soup again or restore the model's artifacts")
    except portable_classifier.ChangedWeights as exc:
        raise SoupError(str(exc)) from exc
    return load_file(str(weights)), json.loads(spec.read_text())
