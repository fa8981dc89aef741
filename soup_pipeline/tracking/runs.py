"""Where MLflow runs go and how they open: the tracking URI (MLFLOW_TRACKING_URI, else a local SQLite store), the
experiment, one parent run per pipeline execution (`pipeline_run`) and a nested run per fine-tune and per soup
method (`nested_run`). MLflow is imported on first use (`load_mlflow`), so importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import logging
import os
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Mapping

from ..runtime.errors import SoupError

LOGGER = logging.getLogger(__name__)


def load_mlflow():
    """Import MLflow on first use, so the core never pays for it."""
    import mlflow

    return mlflow


def mlflow_client():
    """An MLflow client for the URI `connect` set."""
    from mlflow import MlflowClient

    return MlflowClient()


def tag_strings(values: Mapping[str, Any]) -> dict[str, str]:
    """Tag values as MLflow stores them: strings."""
    return {key: str(value) for key, value in values.items()}


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
    mlflow = load_mlflow()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)


def use_experiment(name: str, uri: str) -> str:
    """Make `name` the active experiment, creating it (artifacts beside a SQLite store); return its id."""
    mlflow = load_mlflow()
    experiment = mlflow.get_experiment_by_name(name)
    experiment_id = (
        experiment.experiment_id
        if experiment is not None
        else mlflow.create_experiment(name, artifact_location=artifact_location(uri))
    )
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


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
    mlflow = load_mlflow()
    log_system = system_metrics and importlib.util.find_spec("psutil") is not None
    run = mlflow.start_run(run_name=run_name, tags=tag_strings(tags or {}), log_system_metrics=log_system)
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
    mlflow = load_mlflow()
    if parent_run_id is None:
        if mlflow.active_run() is None:
            raise SoupError(f"nested run {run_name!r} needs an active pipeline_run or a parent_run_id")
        experiment_id = None
    else:
        experiment_id = mlflow_client().get_run(parent_run_id).info.experiment_id
    run_tags = tag_strings({"kind": kind, **(tags or {})})
    with mlflow.start_run(
        run_name=run_name, nested=True, parent_run_id=parent_run_id, experiment_id=experiment_id, tags=run_tags
    ) as run:
        yield run.info.run_id


def child_runs(parent_run_id: str) -> list:
    """The runs nested directly under `parent_run_id`, oldest first."""
    client = mlflow_client()
    parent = client.get_run(parent_run_id)
    return client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
    )


def active_run_id() -> str:
    """The id of the active MLflow run; an error when none is active."""
    run = load_mlflow().active_run()
    if run is None:
        raise SoupError("no active MLflow run; log inside pipeline_run(...) or nested_run(...)")
    return run.info.run_id


def active_parent_run_id() -> str | None:
    """The id of the run the active run is nested under (its tag `mlflow.parentRunId`), or None for a top-level run."""
    return mlflow_client().get_run(active_run_id()).data.tags.get("mlflow.parentRunId")
