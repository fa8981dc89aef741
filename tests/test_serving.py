"""The registered soup outside the project: served over HTTP by `mlflow models serve` (the commands of
docs/serving.md), fed PNG files as a client has them, refusing what it does not take with a 4xx, and loading in a
virtual environment built from nothing but its own requirements."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from doc_pages import section
from mlflow_server import free_port, stop
from soup_pipeline.config import load_params
from soup_pipeline.core import portable_classifier
from soup_pipeline.core.ingredients import read_ingredient
from soup_pipeline.core.portable_classifier import classifier_from_spec
from soup_pipeline.evaluation.scoring import model_logits
from soup_pipeline.workspace.loading import load_splits, preprocess_config

pytestmark = pytest.mark.slow

MODEL = "soup-pipeline-soup"
CHAMPION = f"models:/{MODEL}@champion"


def serving_block(containing: str) -> str:
    """The one bash block of the documentation's "Serve and export the soup" that holds `containing`."""
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", section("Serve and export the soup"), re.S)
              if containing in b]
    assert len(blocks) == 1, f'"Serve and export the soup" has {len(blocks)} bash blocks with {containing!r}'
    return blocks[0]


def split_pngs(repo: Path) -> tuple[list[bytes], list[str], object]:
    """The test split's images as PNG bytes, their true class names and the splits."""
    params = load_params(repo / "params.yaml")
    splits, preprocess = load_splits(params), preprocess_config(params)
    pngs = [portable_classifier.png_bytes(image, preprocess["mean"], preprocess["std"]) for image, _ in splits.test]
    return pngs, [splits.classnames[int(label)] for _, label in splits.test], splits


def post(port: int, body: bytes, content_type: str = "application/json") -> tuple[int, str]:
    """POST `body` to the server's /invocations: (status, response text)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def message_of(text: str) -> str:
    """The message of MLflow's JSON error answer (the text itself when it is not one)."""
    try:
        return json.loads(text)["message"]
    except (ValueError, KeyError, TypeError):
        return text


def images_json(encoded: list[str]) -> bytes:
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": [[item] for item in encoded]}}).encode()


def wait_serving(port: int, process: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    """Poll /ping until the scoring server answers 200; fail with its log if it exits or never answers."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow models serve not answering after {timeout_s} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def served(pipeline, tmp_path_factory):
    """The documented `mlflow models serve` command, verbatim but for its port, run where the flow's mlflow.db is."""
    store = Path(pipeline.uri.removeprefix("sqlite:///"))
    port = free_port()
    command = serving_block("mlflow models serve").replace("5001", str(port))
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log, "w") as handle:
        process = subprocess.Popen(["bash", "-c", command], cwd=store.parent, env=env, stdout=handle,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_serving(port, process, log)
        yield port
    finally:
        stop(process, sig=signal.SIGTERM)


def test_the_documented_curl_example_answers_a_png_with_class_names_and_probabilities(served, pipeline, tmp_path):
    pngs, truth, splits = split_pngs(pipeline.repo)
    (tmp_path / "digit.png").write_bytes(pngs[0])
    curl = serving_block("curl").replace("5001", str(served))
    answer = json.loads(subprocess.run(["bash", "-c", curl], cwd=tmp_path, capture_output=True, text=True,
                                       check=True).stdout)
    (row,) = answer["predictions"]
    probabilities = {name: row[f"p_{name}"] for name in splits.classnames}
    assert set(row) == {"label", "probability", *(f"p_{name}" for name in splits.classnames)}
    assert (row["label"] == max(probabilities, key=probabilities.get)
            and row["probability"] == max(probabilities.values()))
    assert sum(probabilities.values()) == pytest.approx(1, abs=1e-5)


def test_served_predictions_of_the_test_images_as_png_files_equal_the_evaluations(served, pipeline):
    pngs, truth, splits = split_pngs(pipeline.repo)
    status, text = post(served, images_json([base64.b64encode(png).decode() for png in pngs]))
    assert status == 200, text
    served_rows = json.loads(text)["predictions"]
    # the evaluation's predictions: its scoring code on its test split, with the registered method's soup
    method = MlflowClient().get_model_version_by_alias(MODEL, "champion").tags["method"]
    soup = read_ingredient(pipeline.repo / "runs" / "soups" / method / "soup.safetensors")
    model = classifier_from_spec(soup.meta["classifier_spec"])
    model.load_state_dict(load_file(soup.path))
    probs = torch.softmax(model_logits(model.eval(), splits.test, 16, torch.device("cpu")), dim=-1)
    assert [row["label"] for row in served_rows] == [splits.classnames[i] for i in probs.argmax(1).tolist()]
    served_probs = np.array([[row[f"p_{name}"] for name in splits.classnames] for row in served_rows])
    np.testing.assert_allclose(served_probs, probs.numpy(), rtol=0, atol=2e-6)
    evaluated = next(row for row in json.loads((pipeline.repo / "runs/eval/methods.json").read_text())
                     if row["method"] == method)
    served_accuracy = np.mean([row["label"] == name for row, name in zip(served_rows, truth)])
    assert served_accuracy == pytest.approx(evaluated["test_acc"], abs=1e-12)


def test_what_the_model_does_not_take_gets_a_4xx_naming_the_expected_format(served):
    noise = np.random.default_rng(0).bytes(10 * 2**20)  # a 10 MB file that is no image
    cases = {
        "empty body": (b"", "application/json"),
        "a text string": (images_json(["hello, model"]), "application/json"),
        "base64 text": (images_json([base64.b64encode(b"hello, model").decode()]), "application/json"),
        "10 MB non-image": (images_json([base64.b64encode(noise).decode()]), "application/json"),
        "10 MB raw bytes": (noise, "application/octet-stream"),
    }
    for case, (body, content_type) in cases.items():
        status, text = post(served, body, content_type)
        assert 400 <= status < 500, f"{case}: HTTP {status}"
        assert "Traceback" not in text and "stack_trace" not in text and len(text) < 4000, f"{case}: {text[:300]}"
        expected = {"empty body": "valid JSON", "10 MB raw bytes": "json"}.get(case, 'column "image" of a DataFrame')
        assert expected in message_of(text), f"{case}: {text[:500]}"


def test_the_registered_model_loads_and_predicts_in_a_venv_built_from_its_own_requirements(pipeline, tmp_path):
    mlflow.set_tracking_uri(pipeline.uri)
    mlflow.set_registry_uri(pipeline.uri)
    model_dir = Path(mlflow.artifacts.download_artifacts(CHAMPION, dst_path=str(tmp_path / "model")))
    requirements = (model_dir / "requirements.txt").read_text()
    assert "soup" not in requirements and "code/portable_classifier.py" in {
        str(p.relative_to(model_dir)) for p in model_dir.rglob("*.py")}
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-compile", "-r", str(model_dir / "requirements.txt")],
                   check=True, timeout=900)
    pngs, _, _ = split_pngs(pipeline.repo)
    frame = pd.DataFrame({"image": [base64.b64encode(png).decode() for png in pngs[:6]]})
    frame.to_json(tmp_path / "input.json", orient="split")
    script = ("import importlib.util, sys, pandas, mlflow\n"
              "assert importlib.util.find_spec('soup_pipeline') is None, 'soup_pipeline is installed here'\n"
              f"model = mlflow.pyfunc.load_model({str(model_dir)!r})\n"
              f"frame = pandas.read_json({str(tmp_path / 'input.json')!r}, orient='split')\n"
              "print(model.predict(frame).to_json(orient='records'))\n")
    run = subprocess.run([python, "-I", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": ""})
    assert run.returncode == 0, run.stderr[-3000:]
    there = pd.DataFrame(json.loads(run.stdout.strip().splitlines()[-1]))
    here = mlflow.pyfunc.load_model(CHAMPION).predict(frame)
    assert list(there["label"]) == list(here["label"])
    np.testing.assert_allclose(there.drop(columns="label").to_numpy(float), here.drop(columns="label").to_numpy(float),
                               rtol=0, atol=1e-6)


def test_the_model_card_says_how_to_call_the_model_and_what_not_to_use_it_for(served, pipeline, tmp_path):
    client = MlflowClient(tracking_uri=pipeline.uri, registry_uri=pipeline.uri)
    version = client.get_model_version_by_alias(MODEL, "champion")
    card = version.description
    row = next(row for row in json.loads((pipeline.repo / "runs/eval/methods.json").read_text())
               if row["method"] == version.tags["method"])
    assert "### How to call it" in card and "### What it must not be used for" in card
    assert f"its accuracy was {row['shifted_test_acc']:.4f}, against {row['test_acc']:.4f} on the test set" in card
    assert "one of zero, one, two, three, four, five, six, seven, eight, nine" in card
    # the card's own commands work: its curl example, on the server its serve line describes
    (block,) = re.findall(r"```bash\n(.*?)```", card, re.S)
    serve, *curl = block.strip().splitlines()
    assert serve.startswith(f'mlflow models serve -m "{CHAMPION}"')
    (tmp_path / "image.png").write_bytes(split_pngs(pipeline.repo)[0][0])
    answer = subprocess.run(["bash", "-c", "\n".join(curl).replace("5001", str(served))], cwd=tmp_path,
                            capture_output=True, text=True, check=True).stdout
    assert json.loads(answer)["predictions"][0]["label"] in row_classes(card)


def row_classes(card: str) -> list[str]:
    """The class names the model card lists as the labels the model answers with."""
    return re.search(r"`label` \(one of (.*?)\)", card).group(1).split(", ")
