"""Shared test settings: keep every tool off the network and out of the user's home."""

import os
import sys
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "60")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="soup-prefect-home-"))
for _name in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
    os.environ.setdefault(_name, "soup-pipeline tests")
for _name in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
    os.environ.setdefault(_name, "tests@soup-pipeline.invalid")

# Session fixtures shared by several modules: registered here once, so they are built once.
from flow_run import harness, pipeline  # noqa: E402,F401
from helpers_clip import pretrained_base, tiny_splits  # noqa: E402,F401



def _mlflow_globals():
    """MLflow's modules that hold its process-wide state, or None while MLflow is not imported (nothing set yet)."""
    if "mlflow" not in sys.modules:
        return None
    from mlflow.tracking import fluent
    from mlflow.tracking._model_registry import utils as registry
    from mlflow.tracking._tracking_service import utils as tracking

    return tracking, registry, fluent


@pytest.fixture(autouse=True)
def mlflow_left_as_found():
    """Every test starts with the MLflow URIs, active experiment and MLFLOW_* variables the session had and no active
    run: what one test sets (set_tracking_uri, set_registry_uri, set_experiment, a variable, a run left open) never
    reaches the next."""
    environment = {key: value for key, value in os.environ.items() if key.startswith("MLFLOW_")}
    found = _mlflow_globals()
    state = (found[0]._tracking_uri, found[1]._registry_uri, found[2]._active_experiment_id) if found else (None,) * 3
    yield
    modules = _mlflow_globals()
    if modules is not None:
        tracking, registry, fluent = modules
        while fluent.active_run() is not None:
            fluent.end_run()
        tracking._tracking_uri, registry._registry_uri, fluent._active_experiment_id = state
    for key in [key for key in os.environ if key.startswith("MLFLOW_")]:
        del os.environ[key]
    os.environ.update(environment)
