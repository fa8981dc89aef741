"""MLflow tracking and model registry for the pipeline. MLflow is imported in `tracking/` only: here (lazily), in
`pyfunc_model.py` (the registered model's code), `mlflow_sources.py` (checkpoints named by MLflow URIs) and
`orphans.py` (runs a killed pipeline left open).

One parent run per pipeline execution (`pipeline_run`), one nested run per fine-tune and per
soup method (`nested_run`). Params are logged flattened (`soup.batch_size`), step series in batches,
the mixing weights beta (K x L) as JSON plus a heatmap, tables as JSON, CSV and Markdown.
Soups are registered as pyfunc models (safetensors + JSON, see `tracking/pyfunc_model.py`, with
`core/portable_classifier.py` as their code so that they load without soup-pipeline), with the weights'
SHA-256 in their MLmodel file, checked when the model is loaded; the `champion`
alias moves only to a version whose select accuracy strictly beats the current champion's (select data
judge soups fitted on the fit data; test accuracy never promotes).
"""

from __future__ import annotations

import base64
import contextlib
import csv
import http.client
import importlib.util
import json
import logging
import os
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from ..core import portable_classifier
from ..runtime.errors import SoupError
from ..evaluation.plots import plot_mixing_weights
from ..evaluation.tables import columns_of, markdown_table

LOGGER = logging.getLogger(__name__)
CHAMPION = "champion"
MODEL_NAME = "model"  # name of the logged pyfunc model inside its run
MIXING_DIR = "mixing_weights"  # artifact folder of beta.json and beta.png
TABLES_DIR = "tables"  # artifact folder of logged tables
REQUIREMENTS = ("mlflow", "torch", "torchvision", "open_clip_torch", "safetensors", "numpy", "pandas", "pillow")  # what
# the registered model imports where it loads (torchvision: open_clip's transforms), pinned from this env
PYFUNC_MODEL = Path(__file__).parent / "pyfunc_model.py"  # logged "from code": MLflow runs it to get the model
METRIC_TAGS = ("fit_acc", "select_acc", "test_acc", "shifted_test_acc", "test_vs_greedy", "test_ci_low", "test_ci_high",
               "test_mcnemar_p")  # version tags shown as numbers by `registry compare`
COMPARE_COLUMNS = ("version", "aliases", "method", "K", "b", *METRIC_TAGS, "git_commit")


def _mlflow():
    """Import MLflow on first use, so the core never pays for it."""
    import mlflow

    return mlflow


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


# --- where to track ---------------------------------------------------------------------------


def tracking_uri(default_dir: str | Path) -> str:
    """MLFLOW_TRACKING_URI if set, else a local SQLite store `<default_dir>/mlflow.db`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(default_dir).resolve() / 'mlflow.db'}"


def artifact_location(uri: str) -> str | None:
    """For a SQLite store, artifacts go beside the database (`mlartifacts/`); a server decides its own."""
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None
    return (Path(uri[len("sqlite:///") :]).resolve().parent / "mlartifacts").as_uri()


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """For an http(s) URI, GET /health once; raise SoupError naming the URI and the fix if it fails."""
    if not uri.startswith(("http://", "https://")):
        return
    health = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout_s) as response:
            status = response.status
    except (OSError, http.client.HTTPException) as exc:  # URLError and timeouts are OSErrors
        reason = getattr(exc, "reason", exc)
    else:
        if status == 200:
            return
        reason = f"HTTP {status}"
    raise SoupError(
        f"MLflow tracking server {uri} is not reachable ({reason}); start it "
        f"(mlflow server --backend-store-uri sqlite:///mlflow.db --host HOST --port PORT) "
        f"or unset MLFLOW_TRACKING_URI to track in a local SQLite file"
    )


def connect(uri: str) -> None:
    """Point MLflow's tracking and registry at `uri`, after checking that a server answers."""
    check_reachable(uri)
    mlflow = _mlflow()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)


def use_experiment(name: str, uri: str) -> str:
    """Make `name` the active experiment, creating it (artifacts beside a SQLite store); return its id."""
    mlflow = _mlflow()
    experiment = mlflow.get_experiment_by_name(name)
    experiment_id = (
        experiment.experiment_id
        if experiment is not None
        else mlflow.create_experiment(name, artifact_location=artifact_location(uri))
    )
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


# --- runs -------------------------------------------------------------------------------------


@contextlib.contextmanager
def pipeline_run(
    experiment: str,
    *,
    uri: str,
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    system_metrics: bool = True,
) -> Iterator[str]:
    """The parent run of one pipeline execution; yields its run id. Fails fast if `uri` is down."""
    connect(uri)
    use_experiment(experiment, uri)
    mlflow = _mlflow()
    log_system = system_metrics and importlib.util.find_spec("psutil") is not None
    run = mlflow.start_run(run_name=run_name, tags=_strings(tags or {}), log_system_metrics=log_system)
    status = "FAILED"
    try:
        yield run.info.run_id
        status = "FINISHED"
    finally:
        try:
            mlflow.end_run(status)
        except Exception as exc:  # noqa: BLE001 - whatever a lost server raises, the run's work is done
            LOGGER.warning("could not close MLflow run %s (%s); the next pipeline run on this root closes it",
                           run.info.run_id, exc)


@contextlib.contextmanager
def nested_run(
    run_name: str, *, kind: str, tags: Mapping[str, Any] | None = None, parent_run_id: str | None = None
) -> Iterator[str]:
    """A child run (kind "finetune" or "soup") of the active run, or of `parent_run_id` from another process."""
    mlflow = _mlflow()
    if parent_run_id is None:
        if mlflow.active_run() is None:
            raise SoupError(f"nested run {run_name!r} needs an active pipeline_run or a parent_run_id")
        experiment_id = None
    else:
        experiment_id = _client().get_run(parent_run_id).info.experiment_id
    run_tags = _strings({"kind": kind, **(tags or {})})
    with mlflow.start_run(
        run_name=run_name, nested=True, parent_run_id=parent_run_id, experiment_id=experiment_id, tags=run_tags
    ) as run:
        yield run.info.run_id


def child_runs(parent_run_id: str) -> list:
    """The runs nested directly under `parent_run_id`, oldest first."""
    parent = _client().get_run(parent_run_id)
    return _client().search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
    )


def active_parent_run_id() -> str | None:
    """The id of the run the active run is nested under (its tag `mlflow.parentRunId`), or None for a top-level run."""
    return _client().get_run(active_run_id()).data.tags.get("mlflow.parentRunId")


# --- params and metrics -----------------------------------------------------------------------


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dict -> {"soup.batch_size": "128", ...}; lists become JSON strings."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return flat


def log_params(params: Mapping[str, Any]) -> None:
    """Log resolved params to the active run, flattened with dotted keys."""
    _mlflow().log_params(flatten_params(params))


def log_series(series: Mapping[str, Sequence[float]], *, start_step: int = 0) -> None:
    """Log per-step series ({"loss": [...]}) to the active run in batched calls, step = index + start_step."""
    from mlflow.entities import Metric

    timestamp = int(time.time() * 1000)
    metrics = [
        Metric(key, float(value), timestamp, start_step + step)
        for key, values in series.items()
        for step, value in enumerate(values)
    ]
    _client().log_batch(active_run_id(), metrics=metrics)


def log_scalars(metrics: Mapping[str, float | None]) -> None:
    """Log scalar metrics (accuracies, seconds, peak bytes) to the active run; None values are skipped."""
    _mlflow().log_metrics({key: float(value) for key, value in metrics.items() if value is not None})


# --- artifacts --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MixingWeights:
    """beta (K ingredients x L layers) with its row and column names."""

    beta: np.ndarray
    ingredients: list[str]
    layers: list[str]

    def __post_init__(self) -> None:
        expected = (len(self.ingredients), len(self.layers))
        if np.shape(self.beta) != expected:
            raise SoupError(f"beta has shape {np.shape(self.beta)}, expected {expected} (ingredients x layers)")


def log_mixing_weights(weights: MixingWeights) -> None:
    """Log beta as `mixing_weights/beta.json` and an ingredients x layers heatmap `beta.png`."""
    with tempfile.TemporaryDirectory() as tmp:
        beta = np.asarray(weights.beta).tolist()
        payload = {"ingredients": list(weights.ingredients), "layers": list(weights.layers), "beta": beta}
        (Path(tmp) / "beta.json").write_text(json.dumps(payload) + "\n")
        plot_mixing_weights(weights.beta, weights.ingredients, weights.layers, Path(tmp) / "beta.png")
        _mlflow().log_artifacts(tmp, artifact_path=MIXING_DIR)


def load_mixing_weights(run_id: str) -> MixingWeights:
    """Download a run's `mixing_weights/beta.json` and rebuild the matrix."""
    with tempfile.TemporaryDirectory() as tmp:
        path = _mlflow().artifacts.download_artifacts(
            run_id=run_id, artifact_path=f"{MIXING_DIR}/beta.json", dst_path=tmp
        )
        payload = json.loads(Path(path).read_text())
    return MixingWeights(np.asarray(payload["beta"], dtype=np.float64), payload["ingredients"], payload["layers"])


def log_table(rows: Sequence[Mapping[str, Any]], name: str) -> None:
    """Log rows as `tables/<name>.json`, `.csv` and `.md` (ingredient hyperparameters, evaluation)."""
    columns = columns_of(rows)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / f"{name}.json").write_text(json.dumps(list(map(dict, rows)), indent=2, default=str) + "\n")
        with open(base / f"{name}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        (base / f"{name}.md").write_text(markdown_table(rows, columns))
        _mlflow().log_artifacts(tmp, artifact_path=TABLES_DIR)


# --- registry ---------------------------------------------------------------------------------


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
    mlflow = _mlflow()
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
            model_config={portable_classifier.WEIGHTS_SHA256: portable_classifier.file_sha256(weights)},  # checked on load
            signature=signature,
            input_example=input_example,
            pip_requirements=_pip_requirements(spec.get("requirements", ())),
        )
    version_tags = _strings({**tags, "method": method})
    version = str(mlflow.register_model(info.model_uri, name, tags=version_tags).version)
    if description:
        _client().update_model_version(name, version, description=description)
    return version


def image_frame(encoded: Sequence[bytes]):
    """Encoded images (PNG, JPEG, ... bytes) as a client sends them to the registered model: base64 strings in the
    column `image` of a DataFrame (in JSON: {"dataframe_split": {"columns": ["image"], "data": [[...], ...]}})."""
    return _frame({portable_classifier.IMAGE_COLUMN: [base64.b64encode(item).decode("ascii") for item in encoded]})


def find_version(name: str, tags: Mapping[str, Any]) -> str | None:
    """The registered version of `name` carrying all of `tags` (the oldest), or None."""
    where = " and ".join([f"name = '{name}'", *(f"tags.{key} = '{value}'" for key, value in tags.items())])
    versions = sorted(_client().search_model_versions(where), key=lambda v: int(v.version))
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
    client = _client()
    candidate = _tag_float(client.get_model_version(name, str(version)), metric)
    champion = _registered_model(client, name).aliases.get(CHAMPION)
    if champion is not None and candidate <= _tag_float(client.get_model_version(name, champion), metric):
        return False
    client.set_registered_model_alias(name, CHAMPION, str(version))
    return True


def compare_versions(name: str) -> list[dict[str, Any]]:
    """One row per version of `name` (oldest first): version, aliases and its tags."""
    client = _client()
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


# --- helpers ----------------------------------------------------------------------------------


def active_run_id() -> str:
    """The id of the active MLflow run; an error when none is active."""
    run = _mlflow().active_run()
    if run is None:
        raise SoupError("no active MLflow run; log inside pipeline_run(...) or nested_run(...)")
    return run.info.run_id


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
        f"no registered model named {name!r} at {_mlflow().get_registry_uri()}; "
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


def _strings(values: Mapping[str, Any]) -> dict[str, str]:
    return {key: str(value) for key, value in values.items()}
