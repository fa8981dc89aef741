"""The model registry: a soup registered as a pyfunc model (safetensors + JSON, see `pyfunc_model.py`, with
`core/portable_classifier.py` as its code so that it loads without soup-pipeline), the weights' SHA-256 in its
MLmodel file (checked when the model is loaded); versions found by their tags, the `champion` alias, and the
comparison table of `soup-pipeline registry compare`.

`champion` moves only to a version whose select accuracy strictly beats the current champion's (select data judge
soups fitted on the fit data; test accuracy never promotes).
"""

from __future__ import annotations

import base64
import contextlib
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..core import portable_classifier
from ..evaluation.tables import markdown_table
from ..runtime.errors import SoupError
from .runs import active_run_id, connect, load_mlflow, mlflow_client, tag_strings

CHAMPION = "champion"
MODEL_NAME = "model"  # name of the logged pyfunc model inside its run
REQUIREMENTS = ("mlflow", "torch", "torchvision", "open_clip_torch", "safetensors", "numpy", "pandas", "pillow")  # what
# the registered model imports where it loads (torchvision: open_clip's transforms), pinned from this env
PYFUNC_MODEL = Path(__file__).parent / "pyfunc_model.py"  # logged "from code": MLflow runs it to get the model
METRIC_TAGS = ("fit_acc", "select_acc", "test_acc", "shifted_test_acc", "test_vs_greedy", "test_ci_low", "test_ci_high",
               "test_mcnemar_p")  # version tags shown as numbers by `registry compare`
COMPARE_COLUMNS = ("version", "aliases", "method", "K", "b", *METRIC_TAGS, "git_commit")


def register_soup(
    state_dict: Mapping[str, Any],
    spec: Mapping[str, Any],
    *,
    name: str,
    method: str,
    tags: Mapping[str, Any],
    input_example: Any,
    description: str | None = None,
) -> str:
    """Log the soup as a pyfunc model in the active run and register it as a new version of `name`.

    `tags` carries K, b, select_acc, test_acc, params_hash, git_commit, dvc_lock_hash, ...; the version
    is tagged with them and with `method`. `spec` is what `portable_classifier.build_module` builds from
    (with `classnames` and `preprocess` the model takes encoded images and names its classes);
    `input_example` is what a client sends (a DataFrame with a column `image` of base64 PNGs, or for a
    model without `preprocess` a small float batch); `description` (Markdown) is the version's model
    card. The model carries `portable_classifier.py` with it and needs nothing from soup-pipeline where it
    loads. Returns the new version number.
    """
    mlflow = load_mlflow()
    from mlflow.models import ModelSignature, infer_signature

    active_run_id()  # a version always links back to the run (params, metrics) that made it
    try:  # fails here, before logging, on a bad spec, weights that do not fit it or an example it does not take
        module = portable_classifier.build_module(spec, state_dict)
        outputs = portable_classifier.prediction_columns(
            portable_classifier.probabilities(module, portable_classifier.to_batch(input_example, spec)),
            portable_classifier.class_names(spec))
    except ValueError as exc:
        raise SoupError(str(exc)) from exc
    signature = ModelSignature(inputs=None, outputs=infer_signature(_frame(outputs)).inputs)  # inputs: see to_batch
    with tempfile.TemporaryDirectory() as tmp:
        files = portable_classifier.write_model_files(state_dict, spec, tmp)
        weights = files[portable_classifier.WEIGHTS_FILE]
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=str(PYFUNC_MODEL),
            code_paths=[portable_classifier.__file__],  # the classifier travels with the model
            artifacts={portable_classifier.WEIGHTS: str(weights),
                       portable_classifier.SPEC: str(files[portable_classifier.SPEC_FILE])},
            # checked on load
            model_config={portable_classifier.WEIGHTS_SHA256: portable_classifier.file_sha256(weights)},
            signature=signature,
            input_example=input_example,
            pip_requirements=_pip_requirements(spec.get("requirements", ())),
        )
    version_tags = tag_strings({**tags, "method": method})
    version = str(mlflow.register_model(info.model_uri, name, tags=version_tags).version)
    if description:
        mlflow_client().update_model_version(name, version, description=description)
    return version


def image_frame(encoded: Sequence[bytes]):
    """Encoded images (PNG, JPEG, ... bytes) as a client sends them to the registered model: base64 strings in the
    column `image` of a DataFrame (in JSON: {"dataframe_split": {"columns": ["image"], "data": [[...], ...]}})."""
    return _frame({portable_classifier.IMAGE_COLUMN: [base64.b64encode(item).decode("ascii") for item in encoded]})


def find_version(name: str, tags: Mapping[str, Any]) -> str | None:
    """The registered version of `name` carrying all of `tags` (the oldest), or None."""
    where = " and ".join([f"name = '{name}'", *(f"tags.{key} = '{value}'" for key, value in tags.items())])
    versions = sorted(mlflow_client().search_model_versions(where), key=lambda v: int(v.version))
    return str(versions[0].version) if versions else None


def promote_if_better(name: str, version: str, metric: str = "select_acc") -> bool:
    """Point `champion` at `version` if its `metric` tag strictly beats the champion's (or there is none).

    Only select metrics decide: fit metrics are what the soup was fitted on, and test data decide nothing.
    """
    if not metric.startswith("select"):
        raise SoupError(
            f"metric {metric!r}: only select data choose a model (fit data trained it, test data decide nothing); "
            "promote on a select metric such as select_acc"
        )
    client = mlflow_client()
    candidate = _tag_float(client.get_model_version(name, str(version)), metric)
    champion = _registered_model(client, name).aliases.get(CHAMPION)
    if champion is not None and candidate <= _tag_float(client.get_model_version(name, champion), metric):
        return False
    client.set_registered_model_alias(name, CHAMPION, str(version))
    return True


def compare_versions(name: str) -> list[dict[str, Any]]:
    """One row per version of `name` (oldest first): version, aliases and its tags."""
    client = mlflow_client()
    aliases: dict[str, list[str]] = {}
    for alias, version in _registered_model(client, name).aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    versions = client.search_model_versions(f"name = '{name}'")
    rows = [
        {"version": int(v.version), "aliases": ",".join(sorted(aliases.get(str(v.version), []))), **v.tags}
        for v in versions
    ]
    return sorted(rows, key=lambda row: row["version"])


def format_comparison(rows: Sequence[Mapping[str, Any]]) -> str:
    """The comparison table (Markdown) over the known columns that any row has."""
    if not rows:
        return "no registered versions\n"
    shown = [{key: _number(value) if key in METRIC_TAGS else value for key, value in row.items()} for row in rows]
    return markdown_table(shown, [column for column in COMPARE_COLUMNS if any(column in row for row in rows)])


def registry_compare_main(name: str, tracking_uri: str) -> str:
    """Text for `soup-pipeline registry compare`: every version of `name` with its aliases and accuracies."""
    connect(tracking_uri)
    return format_comparison(compare_versions(name))


def _pip_requirements(extra: Sequence[str] = ()) -> list[str]:
    """The serving requirements, pinned to the versions installed here: the model's own (REQUIREMENTS) and the
    distributions of the packages its family's builder imports (`extra`: import names, e.g. timm)."""
    distributions = metadata.packages_distributions()
    names = [*REQUIREMENTS, *(dist for package in extra for dist in distributions.get(package, [package]))]
    pinned = []
    for package in dict.fromkeys(names):
        with contextlib.suppress(metadata.PackageNotFoundError):
            pinned.append(f"{package}=={metadata.version(package)}")
    return pinned


def _registered_model(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    raise SoupError(
        f"no registered model named {name!r} at {load_mlflow().get_registry_uri()}; "
        "check the name and MLFLOW_TRACKING_URI, or register a soup first"
    )


def _tag_float(version, metric: str) -> float:
    try:
        return float(version.tags[metric])
    except (KeyError, ValueError) as exc:
        raise SoupError(
            f"model {version.name} version {version.version} has no numeric tag {metric!r} ({exc}); "
            f"register it with tags={{'{metric}': ...}}"
        ) from exc


def _number(value: Any) -> Any:
    """A tag read back as a float where it is one (so tables round it), else unchanged."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _frame(columns: Mapping[str, Any]):
    import pandas as pd  # MLflow's own dependency: imported where a model is logged, not by every stage

    return pd.DataFrame(columns)
