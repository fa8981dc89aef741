"""MLflow tracking and registry, against a real `mlflow server` and the default local SQLite store."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from mlflow_server import free_port, serve_mlflow
from soup_pipeline import tracking
from soup_pipeline.core.ingredients import file_sha256
from soup_pipeline.runtime.errors import SoupError
from test_ingredients import flip_data_byte

SPEC = {"builder": f"{__name__}:tiny_classifier", "channels": 1, "image_size": 8, "hidden": 16, "num_classes": 10}


def tiny_classifier(spec: dict) -> torch.nn.Module:
    """Test builder named in SPEC: flatten -> linear -> ReLU -> linear."""
    pixels = spec["channels"] * spec["image_size"] ** 2
    return torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(pixels, spec["hidden"]),
        torch.nn.ReLU(),
        torch.nn.Linear(spec["hidden"], spec["num_classes"]),
    )


def images(n: int = 5, seed: int = 0) -> np.ndarray:
    """A float32 N x 1 x 8 x 8 batch of noise."""
    return np.random.default_rng(seed).standard_normal((n, 1, 8, 8)).astype(np.float32)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def server_uri(tmp_path_factory):
    with serve_mlflow(tmp_path_factory.mktemp("mlflow-server")) as uri:
        yield uri


@pytest.fixture(scope="module")
def local_uri(tmp_path_factory):
    """The default store when MLFLOW_TRACKING_URI is unset: SQLite in a folder, no server."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        return tracking.tracking_uri(tmp_path_factory.mktemp("mlflow-local"))


@pytest.fixture(params=["local", pytest.param("server", marks=pytest.mark.slow)])
def backend(request) -> str:
    """A connected tracking URI: the local SQLite store or the real server (shared per module; it starts a service,
    so its cases are slow: the quick tier runs the local store only)."""
    uri = request.getfixturevalue(f"{request.param}_uri")
    tracking.connect(uri)
    return uri


@contextlib.contextmanager
def soup_run(uri: str) -> Iterator[str]:
    """A pipeline run with one nested soup run, as the pipeline registers soups."""
    with tracking.pipeline_run(unique("exp"), uri=uri, system_metrics=False):
        with tracking.nested_run("mehl_soup_plus", kind="soup") as run_id:
            yield run_id


TAGS = {"K": 3, "b": 2, "test_acc": 0.5, "params_hash": "p1", "git_commit": "abc", "dvc_lock_hash": "d1"}


def register(name: str, select_acc: float, **extra_tags) -> tuple[str, torch.nn.Module]:
    """Register a fresh tiny classifier as a new version of `name`, tagged with `select_acc`."""
    module = tiny_classifier(SPEC)
    state = module.state_dict()
    tags = {**TAGS, "select_acc": select_acc, **extra_tags}
    version = tracking.register_soup(
        state, SPEC, name=name, method="mehl_soup_plus", tags=tags, input_example=images(2)
    )
    return version, module


def test_tracking_uri_defaults_to_local_sqlite_and_honours_env(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.tracking_uri(tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking.artifact_location(uri) == (tmp_path.resolve() / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.tracking_uri(tmp_path) == "http://127.0.0.1:5999"
    assert tracking.artifact_location("http://127.0.0.1:5999") is None


def test_flatten_params_uses_dotted_keys():
    flat = tracking.flatten_params({"soup": {"lr": 0.05, "grouping": ["a.*", "b"]}, "seed": 0, "x": None})
    assert flat == {"soup.lr": "0.05", "soup.grouping": '["a.*", "b"]', "seed": "0", "x": "None"}


def test_parent_and_nested_runs_carry_params_and_metrics(backend, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    with tracking.pipeline_run(unique("exp"), uri=backend, run_name="pipeline", tags={"seed": 0}) as parent_id:
        tracking.log_params({"soup": {"lr": 0.05, "model_batch": 2}, "seed": 0})
        with tracking.nested_run("finetune-0", kind="finetune") as finetune_id:
            tracking.log_series({"train_loss": [2.0, 1.5, 1.25]})
        with tracking.nested_run("mehl_soup_plus", kind="soup") as soup_id:
            tracking.log_series({"fit_loss": [float(v) for v in range(1500)]})
            scalars = {"select_acc": 0.9, "test_acc": 0.8, "shifted_test_acc": 0.6, "construction_s": 1.5}
            tracking.log_scalars({**scalars, "peak_rss_bytes": 1e9, "peak_cuda_bytes": None})
            rows = [{"method": "mehl_soup_plus", "select_acc": 0.9}, {"method": "uniform", "select_acc": 0.85}]
            tracking.log_table(rows, "evaluation")
        deadline = time.monotonic() + 30  # wait for the system-metrics monitor's first sample, not a fixed time
        while not any(key.startswith("system/") for key in MlflowClient().get_run(parent_id).data.metrics):
            assert time.monotonic() < deadline, "the system-metrics monitor logged nothing in 30 s"
            time.sleep(0.1)

    client = MlflowClient()
    parent = client.get_run(parent_id)
    assert parent.data.params == {"soup.lr": "0.05", "soup.model_batch": "2", "seed": "0"}
    assert any(key.startswith("system/") for key in parent.data.metrics)
    children = tracking.child_runs(parent_id)
    assert [run.info.run_id for run in children] == [finetune_id, soup_id]
    assert [run.data.tags["kind"] for run in children] == ["finetune", "soup"]
    history = client.get_metric_history(finetune_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(0, 2.0), (1, 1.5), (2, 1.25)]
    assert len(client.get_metric_history(soup_id, "fit_loss")) == 1500
    soup_metrics = client.get_run(soup_id).data.metrics
    assert soup_metrics["test_acc"] == 0.8 and soup_metrics["peak_rss_bytes"] == 1e9
    assert "peak_cuda_bytes" not in soup_metrics
    table_files = {f.path for f in client.list_artifacts(soup_id, "tables")}
    assert table_files == {"tables/evaluation.json", "tables/evaluation.csv", "tables/evaluation.md"}


def test_nested_run_under_explicit_parent_from_no_active_run(backend):
    with tracking.pipeline_run(unique("exp"), uri=backend, system_metrics=False) as parent_id:
        pass
    with pytest.raises(SoupError, match="needs an active pipeline_run"):
        with tracking.nested_run("orphan", kind="finetune"):
            pass
    with tracking.nested_run("worker", kind="finetune", parent_run_id=parent_id) as child_id:
        tracking.log_scalars({"select_acc": 0.5})
    assert [run.info.run_id for run in tracking.child_runs(parent_id)] == [child_id]


def test_mixing_weights_round_trip_through_artifacts(backend):
    rng = np.random.default_rng(0)
    beta = rng.standard_normal((3, 4)) / 3 + 1 / 3
    weights = tracking.MixingWeights(beta, ["ft0", "ft1", "ft2"], ["w0", "b0", "w1", "b1"])
    with tracking.pipeline_run(unique("exp"), uri=backend, system_metrics=False) as run_id:
        tracking.log_mixing_weights(weights)
    loaded = tracking.load_mixing_weights(run_id)
    np.testing.assert_array_equal(loaded.beta, weights.beta)
    assert (loaded.ingredients, loaded.layers) == (weights.ingredients, weights.layers)
    files = {f.path for f in MlflowClient().list_artifacts(run_id, "mixing_weights")}
    assert files == {"mixing_weights/beta.json", "mixing_weights/beta.png"}


def test_mixing_weights_shape_must_match_names():
    with pytest.raises(SoupError, match=r"expected \(2, 3\)"):
        tracking.MixingWeights(np.zeros((3, 2)), ["a", "b"], ["x", "y", "z"])


def test_registered_champion_loads_and_predicts_like_the_torch_module(backend):
    name = unique("soup")
    with soup_run(backend):
        version, module = register(name, select_acc=0.9)
    assert tracking.promote_if_better(name, version)
    tags = MlflowClient().get_model_version(name, version).tags
    assert tags == {key: str(value) for key, value in {**TAGS, "select_acc": 0.9, "method": "mehl_soup_plus"}.items()}
    batch = images(7, seed=1)
    answer = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(batch)
    with torch.no_grad():
        expected = torch.softmax(module.eval()(torch.from_numpy(batch)), dim=-1).numpy()
    # registered without class names or preprocessing: classes are their indices, the input float arrays
    assert list(answer.columns) == ["label", "probability", *(f"p_{c}" for c in range(10))] and len(answer) == 7
    np.testing.assert_allclose(answer[[f"p_{c}" for c in range(10)]].to_numpy(), expected, rtol=1e-6, atol=1e-7)
    assert list(answer["label"]) == [str(c) for c in expected.argmax(1)]
    np.testing.assert_allclose(answer["probability"], expected.max(1), rtol=1e-6)


def stored_weights(name: str, version: str) -> Path:
    """The registered version's weights.safetensors where the (local) artifact store keeps it."""
    model_id = MlflowClient().get_model_version(name, version).source.removeprefix("models:/")
    return (Path(urlparse(mlflow.get_logged_model(model_id).artifact_location).path) / "artifacts"
            / "weights.safetensors")


def test_a_changed_byte_in_the_registered_weights_is_refused_when_loaded(local_uri):
    tracking.connect(local_uri)
    name = unique("soup")
    with soup_run(local_uri):
        version, _ = register(name, select_acc=0.9)
    assert tracking.promote_if_better(name, version)
    uri = f"models:/{name}@champion"
    # untouched, it loads and predicts (like the torch module: test_registered_champion_loads_and_predicts_...)
    assert len(mlflow.pyfunc.load_model(uri).predict(images(3))) == 3
    weights = stored_weights(name, version)
    recorded = file_sha256(weights)
    flip_data_byte(weights)
    with pytest.raises(ValueError) as err:  # raised by the model's own copy of portable_classifier.py
        mlflow.pyfunc.load_model(uri)
    assert type(err.value).__name__ == "ChangedWeights"
    message = str(err.value)
    assert "weights.safetensors: sha256 " in message and f"does not match {recorded}" in message
    assert "register the soup again" in message


def test_champion_moves_only_to_a_strictly_better_select_version(backend):
    name = unique("soup")
    with soup_run(backend):
        first, _ = register(name, select_acc=0.80)
        assert tracking.promote_if_better(name, first)
        for select_acc in (0.80, 0.70):  # equal, then worse: the champion stays
            assert not tracking.promote_if_better(name, register(name, select_acc=select_acc)[0])
        better, _ = register(name, select_acc=0.85)
        assert tracking.promote_if_better(name, better)
    rows = tracking.compare_versions(name)
    expected = [(1, "", "0.8"), (2, "", "0.8"), (3, "", "0.7"), (4, "champion", "0.85")]
    assert [(row["version"], row["aliases"], row["select_acc"]) for row in rows] == expected
    text = tracking.registry_compare_main(name, backend)
    assert text.splitlines()[0] == "| version | aliases | method | K | b | select_acc | test_acc | git_commit |"
    assert "| 4 | champion | mehl_soup_plus | 3 | 2 | 0.8500 | 0.5000 | abc |" in text
    for metric in ("test_acc", "fit_acc"):  # test data decide nothing; fit data are what the soup was fitted on
        with pytest.raises(SoupError, match="only select data choose a model"):
            tracking.promote_if_better(name, better, metric=metric)
    with pytest.raises(SoupError, match="no registered model named 'missing'"):
        tracking.registry_compare_main("missing", backend)


def test_a_soup_that_fits_better_but_selects_worse_is_not_promoted(backend):
    name = unique("soup")
    with soup_run(backend):
        honest, _ = register(name, select_acc=0.84, fit_acc=0.85)
        assert tracking.promote_if_better(name, honest)
        overfit, _ = register(name, select_acc=0.80, fit_acc=0.99)
        assert not tracking.promote_if_better(name, overfit)
    assert str(MlflowClient().get_registered_model(name).aliases["champion"]) == honest


def test_register_needs_a_run_and_weights_that_fit_before_logging(local_uri):
    tracking.connect(local_uri)
    name = unique("bad")
    state = tiny_classifier({**SPEC, "hidden": 4}).state_dict()
    with pytest.raises(SoupError, match="no active MLflow run"):
        tracking.register_soup(state, SPEC, name=name, method="uniform", tags={}, input_example=images(2))
    with soup_run(local_uri) as run_id, pytest.raises(SoupError, match="do not fit"):
        tracking.register_soup(state, SPEC, name=name, method="uniform", tags={}, input_example=images(2))
    assert MlflowClient().search_registered_models(f"name = '{name}'") == []
    assert MlflowClient().list_artifacts(run_id) == []


def test_unreachable_server_fails_fast_with_the_fix():
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(SoupError, match=f"{uri} is not reachable.*unset MLFLOW_TRACKING_URI"):
        with tracking.pipeline_run("never", uri=uri):
            pytest.fail("the run body must not start")
    assert time.monotonic() - start < 10


def test_tracking_imports_mlflow_lazily():
    code = "import sys, soup_pipeline.tracking; assert 'mlflow' not in sys.modules, 'mlflow imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)
