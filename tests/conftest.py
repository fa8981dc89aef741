"""Shared test settings: keep every tool off the network and out of the user's home."""

import collections
import os
import re
import subprocess
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
if os.environ.get("PYTEST_XDIST_WORKER"):  # one of pytest-xdist's workers (pyproject: -n 2)
    # a Prefect home (profiles, results) of its own, and one torch thread in it and in the commands it starts: two
    # workers of two threads each on two cores spend their time waiting on each other's threads
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix=f"soup-prefect-home-{os.environ['PYTEST_XDIST_WORKER']}-")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
for _name in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
    os.environ.setdefault(_name, "soup-pipeline tests")
for _name in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
    os.environ.setdefault(_name, "tests@soup-pipeline.invalid")

# Session fixtures shared by several modules: registered here once, so they are built once.
from flow_run import harness, pipeline  # noqa: E402,F401
from helpers_clip import pretrained_base, tiny_splits  # noqa: E402,F401

# The commands that start a service: none of them runs in the quick tier (-m "not slow").
SERVICE = re.compile(r"\b(mlflow\s+(server|ui|models\s+serve)|prefect\s+(server|worker)|dask[\s-](scheduler|worker))\b")


def _quick_popen(test: str) -> type[subprocess.Popen]:
    """subprocess.Popen that refuses, failing `test`, a command that starts a service."""

    class QuickPopen(subprocess.Popen):
        def __init__(self, args, *rest, **options):
            command = os.fsdecode(args) if isinstance(args, (str, bytes, os.PathLike)) else " ".join(
                os.fsdecode(arg) if isinstance(arg, (str, bytes, os.PathLike)) else str(arg) for arg in args)
            found = SERVICE.search(command)
            if found:
                pytest.fail(f"{test} starts a service ({found.group(0)!r}: {command[:300]}) but is not marked slow; "
                            "the quick tier (-m 'not slow') starts none: mark the test, or its fixture's param, "
                            "@pytest.mark.slow (pytest.param(..., marks=pytest.mark.slow))", pytrace=False)
            super().__init__(args, *rest, **options)

    return QuickPopen


# The files that take longest (`pytest --durations`), longest first.
LONGEST_FIRST = ("test_faults.py", "test_plugin.py", "test_stage_deps.py", "test_dvc_pipeline.py", "test_flows.py",
                 "test_families.py", "test_serving.py", "test_clip_soups.py")


def pytest_collection_modifyitems(config, items):
    """The longest files first, then the rest by their number of slow tests (each file's tests in their own order):
    pytest-xdist hands whole files to its workers in this order, so the long ones start at once and the short ones
    fill in at the end."""
    slow = collections.Counter(item.path for item in items if item.get_closest_marker("slow") is not None)
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), -slow[item.path]))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A test not marked slow starts no service (see SERVICE), in its own code or in any fixture set up for it: the
    guard covers the item's whole setup, so a module- or session-scoped fixture it is the first to need is caught
    too (an autouse function fixture would be set up after those, and miss them)."""
    if item.get_closest_marker("slow") is not None:
        return (yield)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess, "Popen", _quick_popen(item.nodeid))
        return (yield)


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
