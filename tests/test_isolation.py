"""The autouse fixture in conftest.py gives every test MLflow as the session had it: the first test below leaves
URIs, an active experiment, a variable and an open run behind on purpose; the second, run after it, finds none."""

from __future__ import annotations

import os

import mlflow
from mlflow.tracking import fluent

SESSION = {}


def test_a_test_that_leaves_mlflow_changed(tmp_path):
    SESSION["uris"] = (mlflow.get_tracking_uri(), mlflow.get_registry_uri(), fluent._active_experiment_id)
    SESSION["environment"] = {key: value for key, value in os.environ.items() if key.startswith("MLFLOW_")}
    uri = f"sqlite:///{tmp_path / 'leak.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    os.environ["MLFLOW_EXPERIMENT_NAME"] = "leaked"
    mlflow.set_experiment("leaked")
    mlflow.start_run()
    assert mlflow.active_run() is not None and mlflow.get_tracking_uri() == uri


def test_the_next_test_finds_mlflow_as_the_session_had_it():
    assert SESSION, "runs after test_a_test_that_leaves_mlflow_changed"
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri(), fluent._active_experiment_id) == SESSION["uris"]
    assert {key: value for key, value in os.environ.items() if key.startswith("MLFLOW_")} == SESSION["environment"]
    assert mlflow.active_run() is None
