"""The autouse fixture in conftest.py gives every test MLflow as the session had it: the first test below leaves
URIs, an active experiment, a variable and an open run behind on purpose; the second runs, in a pytest of its own
(pytester, in a subprocess, with that fixture), the first and then a test that finds none of it. Each stands alone:
neither needs the other to have run before it in this session."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
from mlflow.tracking import fluent

pytest_plugins = ("pytester",)

TESTS = Path(__file__).resolve().parent


def mlflow_state() -> tuple:
    """What a test can leave behind: the URIs, the active experiment, the MLFLOW_* variables and the active run."""
    return (mlflow.get_tracking_uri(), mlflow.get_registry_uri(), fluent._active_experiment_id,
            {key: value for key, value in os.environ.items() if key.startswith("MLFLOW_")}, mlflow.active_run())


def test_a_test_that_leaves_mlflow_changed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'leak.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    os.environ["MLFLOW_EXPERIMENT_NAME"] = "leaked"
    mlflow.set_experiment("leaked")
    mlflow.start_run()
    assert mlflow.active_run() is not None and mlflow.get_tracking_uri() == mlflow.get_registry_uri() == uri


# tests/conftest.py loaded under a name of its own; only its autouse fixture, the one under test, is taken.
CONFTEST = f"""
import importlib.util
import sys

sys.path.insert(0, {str(TESTS)!r})
_spec = importlib.util.spec_from_file_location("soup_pipeline_tests_conftest", {str(TESTS / "conftest.py")!r})
_suite = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_suite)
mlflow_left_as_found = _suite.mlflow_left_as_found
"""

# The test above, then one that checks: collected in this order and run in it.
IN_ORDER = """
from test_isolation import mlflow_state, test_a_test_that_leaves_mlflow_changed as test_1_leaves_mlflow_changed

SESSION = mlflow_state()  # at import, before any test: MLflow as the session has it


def test_2_finds_mlflow_as_the_session_had_it():
    assert SESSION[-1] is None
    assert mlflow_state() == SESSION
"""


def test_the_next_test_finds_mlflow_as_the_session_had_it(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_in_order=IN_ORDER)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-v")
    result.stdout.fnmatch_lines(["*::test_1_leaves_mlflow_changed PASSED*",
                                 "*::test_2_finds_mlflow_as_the_session_had_it PASSED*"])
    result.assert_outcomes(passed=2)
