"""MLflow sources of external checkpoints: runs:/<run>/<path>, models:/<name>/<version> or models:/<name>@<alias>,
and experiment:<name>/<path>[?metric=<key>[&top=N][&order=asc]] (the syntax is in `soup_pipeline.core.sources`).

`mlflow_sources(tracking_uri)` is the `remote` that `soup_pipeline.core.sources.resolve` takes: the CLI and the flow
pass it, so the import stage itself never imports MLflow.
"""

from __future__ import annotations

import posixpath
import tempfile
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qsl

from ..core.sources import CHECKPOINT_SUFFIXES, Checkpoint, Remote
from ..runtime.errors import IngredientError

_EXPERIMENT_QUERY = ("metric", "top", "order")
_REACH = "check MLFLOW_TRACKING_URI and that the tracking server is up"


def mlflow_sources(tracking_uri: str | None = None) -> Remote:
    """Resolve MLflow sources against `tracking_uri` (None: MLflow's own default), downloading into the folder given."""
    def remote(source: str, download_dir: Path) -> list[Checkpoint]:
        for scheme, resolver in (("runs:/", _run_artifact), ("models:/", _model_version), ("experiment:", _experiment)):
            if source.startswith(scheme):
                return resolver(source, _Mlflow(download_dir, tracking_uri))
        raise IngredientError(f"source {source!r} is not an MLflow source (runs:/, models:/ or experiment:)")
    return remote


class _Mlflow:
    """An MLflow client for one tracking URI and the folder its downloads go to; imports MLflow when made."""

    def __init__(self, download_dir: Path, tracking_uri: str | None):
        import mlflow
        from mlflow.exceptions import MlflowException

        self.mlflow, self.errors = mlflow, MlflowException
        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        self.download_dir, self.tracking_uri = download_dir, tracking_uri

    def ask(self, source: str, fix: str, call: Callable, *args, **kwargs):
        """`call(*args, **kwargs)`; an MLflow error becomes an IngredientError naming the source and the fix."""
        try:
            return call(*args, **kwargs)
        except self.errors as exc:
            raise IngredientError(f"source {source!r}: {exc.message}; {fix}") from exc

    def has_artifact(self, source: str, run_id: str, artifact_path: str) -> bool:
        """Whether the run has the file or folder `artifact_path`."""
        parent = posixpath.dirname(artifact_path.rstrip("/"))
        entries = self.ask(source, _REACH, self.client.list_artifacts, run_id, parent or None)
        return any(entry.path == artifact_path.rstrip("/") for entry in entries)

    def download(self, source: str, artifact_uri: str) -> Path:
        """The one checkpoint file `artifact_uri` holds, downloaded to a fresh folder under the download folder."""
        return _single_checkpoint(source, self.download_all(source, artifact_uri))

    def download_all(self, source: str, artifact_uri: str) -> Path:
        """What `artifact_uri` holds (a file or a folder), downloaded to a fresh folder under the download folder."""
        self.download_dir.mkdir(parents=True, exist_ok=True)
        target = tempfile.mkdtemp(prefix="source-", dir=self.download_dir)
        return Path(self.ask(source, _REACH, self.mlflow.artifacts.download_artifacts,
                             artifact_uri=artifact_uri, dst_path=target, tracking_uri=self.tracking_uri))


def _single_checkpoint(source: str, local: Path) -> Path:
    """`local` if it is a file, else the one checkpoint file inside the folder."""
    if local.is_file():
        return local
    found = sorted(p for p in local.rglob("*") if p.is_file() and p.name.endswith(CHECKPOINT_SUFFIXES))
    if len(found) != 1:
        names = [str(p.relative_to(local)) for p in found]
        raise IngredientError(f"source {source!r} is a folder with {len(found)} checkpoint files {names[:5]}, not one; "
                              "name the file itself with runs:/<run_id>/<path to the file>")
    return found[0]


def _run_artifact(source: str, mlflow: _Mlflow) -> list[Checkpoint]:
    run_id, _, artifact_path = source[len("runs:/"):].partition("/")
    if not run_id or not artifact_path:
        raise IngredientError(f"source {source!r} is not runs:/<run_id>/<artifact path>; name the run and the file")
    mlflow.ask(source, "check the run id (the MLflow UI or `mlflow runs list`)", mlflow.client.get_run, run_id)
    if not mlflow.has_artifact(source, run_id, artifact_path):
        raise IngredientError(f"source {source!r}: run {run_id} has no artifact '{artifact_path}'; "
                              f"check the path with `mlflow artifacts list --run-id {run_id}`")
    return [Checkpoint(uri=source, path=mlflow.download(source, source), run_id=run_id)]


def _model_version(source: str, mlflow: _Mlflow) -> list[Checkpoint]:
    name, model_version, location = _registered_version(source, mlflow)
    return [Checkpoint(uri=f"models:/{name}/{model_version.version}", path=mlflow.download(source, location),
                       run_id=model_version.run_id or None)]


def _registered_version(source: str, mlflow: _Mlflow) -> tuple[str, object, str]:
    """(name, model version, download URI of its model folder) of models:/<name>/<version> or models:/<name>@<alias>."""
    name, alias, version = _parse_model(source)
    if alias is not None:
        model_version = mlflow.ask(source, f"set the alias on a version of '{name}' or name the version "
                                           f"(models:/{name}/<version>)",
                                   mlflow.client.get_model_version_by_alias, name, alias)
    else:
        model_version = mlflow.ask(source, f"check the name and version of the registered model '{name}'",
                                   mlflow.client.get_model_version, name, version)
    location = mlflow.ask(source, "check the model version's source in the registry",
                          mlflow.client.get_model_version_download_uri, name, model_version.version)
    return name, model_version, location


def download_model_version(source: str, tracking_uri: str | None, download_dir: Path) -> Path:
    """The model folder (MLmodel, artifacts, code) of the registered version `source` names
    (models:/<name>/<version> or models:/<name>@<alias>), downloaded into a fresh folder under `download_dir`."""
    mlflow = _Mlflow(download_dir, tracking_uri)
    _, _, location = _registered_version(source, mlflow)
    return mlflow.download_all(source, location)


def _parse_model(source: str) -> tuple[str, str | None, str | None]:
    """(name, alias, version) of models:/<name>@<alias> or models:/<name>/<version>."""
    body = source[len("models:/"):]
    if "@" in body:
        name, _, alias = body.rpartition("@")
        if name and alias:
            return name, alias, None
    else:
        name, _, version = body.rpartition("/")
        if name and version.isdigit():
            return name, None, version
    raise IngredientError(f"source {source!r} is not models:/<name>/<version> or models:/<name>@<alias>; "
                          "name the registered model and its version or alias")


def _experiment(source: str, mlflow: _Mlflow) -> list[Checkpoint]:
    name, artifact_path, metric, top, ascending = _parse_experiment(source)
    experiment = mlflow.ask(source, _REACH, mlflow.client.get_experiment_by_name, name)
    if experiment is None:
        raise IngredientError(f"source {source!r}: there is no experiment named '{name}'; "
                              "check the name (`mlflow experiments search`) and MLFLOW_TRACKING_URI")
    runs = _finished_runs(mlflow, source, experiment.experiment_id)
    if metric is not None:
        runs = sorted((r for r in runs if metric in r.data.metrics),
                      key=lambda r: r.data.metrics[metric] if ascending else -r.data.metrics[metric])
    chosen = []
    for run in runs:
        if top is not None and len(chosen) == top:
            break
        if mlflow.has_artifact(source, run.info.run_id, artifact_path):
            chosen.append(run.info.run_id)
    if not chosen:
        with_metric = f" and metric '{metric}'" if metric else ""
        raise IngredientError(f"source {source!r}: experiment '{name}' has no FINISHED run with artifact "
                              f"'{artifact_path}'{with_metric}; check the artifact path and that its runs finished")
    return [Checkpoint(uri=f"runs:/{run_id}/{artifact_path}", run_id=run_id,
                       path=mlflow.download(source, f"runs:/{run_id}/{artifact_path}")) for run_id in chosen]


def _parse_experiment(source: str) -> tuple[str, str, str | None, int | None, bool]:
    """(name, artifact path, metric, top, ascending) of experiment:<name>/<path>[?metric=<key>&top=N&order=asc]."""
    body, _, query = source[len("experiment:"):].partition("?")
    name, _, artifact_path = body.partition("/")
    if not name or not artifact_path:
        raise IngredientError(f"source {source!r} is not experiment:<name>/<artifact path>; "
                              "name the experiment and the checkpoint's artifact path")
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - set(_EXPERIMENT_QUERY))
    if unknown:
        raise IngredientError(f"source {source!r}: unknown options {unknown}; "
                              "use metric=<key>, top=N and order=asc|desc")
    metric, top, order = options.get("metric"), options.get("top"), options.get("order", "desc")
    if metric == "":
        raise IngredientError(f"source {source!r}: metric= is empty; give metric=<key> of a metric the runs logged")
    if top is not None and not (top.isdigit() and int(top) > 0):
        raise IngredientError(f"source {source!r}: top={top} is not a positive whole number; give top=N with N >= 1")
    if order not in ("asc", "desc"):
        raise IngredientError(f"source {source!r}: order={order} is neither asc nor desc; give order=asc or order=desc")
    if metric is None and (top is not None or "order" in options):
        raise IngredientError(f"source {source!r}: top and order rank runs by a metric; add metric=<key>")
    return name, artifact_path, metric, None if top is None else int(top), order == "asc"


def _finished_runs(mlflow: _Mlflow, source: str, experiment_id: str) -> list:
    """Every FINISHED run of the experiment, oldest first (all pages)."""
    runs, token = [], None
    while True:
        page = mlflow.ask(source, _REACH, mlflow.client.search_runs, [experiment_id],
                          filter_string="attributes.status = 'FINISHED'",
                          order_by=["attributes.start_time ASC", "attributes.run_id ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs
