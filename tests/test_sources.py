"""`soup-pipeline import` of many checkpoints: folders, globs, MLflow runs, models and experiments, with lineage."""

from __future__ import annotations

import json
import os
import pickle
import re

import pytest
import torch
from safetensors.torch import save_file

from mlflow_server import serve_mlflow
from soup_pipeline.cli import main
from soup_pipeline.config import Params, SoupParams
from soup_pipeline.core.ingredients import IngredientStore, file_sha256
from soup_pipeline.core.models import classifier_spec
from soup_pipeline.core.portable_classifier import classifier_from_spec
from soup_pipeline.core.settings import DataParams
from soup_pipeline.runtime.errors import IngredientError
from soup_pipeline.stages import importer
from soup_pipeline.tracking.mlflow_sources import mlflow_sources

PARAMS = Params(data=DataParams(pretrain_size=10, train_size=10, heldout_size=50, test_size=10),
                soup=SoupParams(device="cpu"))


def weights(seed: int) -> dict[str, torch.Tensor]:
    """A state dict of the tiny classifier, the same for the same seed and different for each seed."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return classifier_from_spec(classifier_spec("soup-tiny-vit", 10)).state_dict()


def write(state: dict[str, torch.Tensor], path) -> str:
    """Save `state` as safetensors or torch file by the suffix of `path`; return the path as a string."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path)) if path.suffix == ".safetensors" else torch.save(state, path)
    return str(path)


def assert_holds(ingredient, state: dict[str, torch.Tensor]) -> None:
    loaded = IngredientStore([ingredient.path]).load(0)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def ingredient_files(root) -> list:
    return sorted((root / "runs/imported").glob("member-*")) if (root / "runs/imported").is_dir() else []


@pytest.mark.parametrize("pattern", ["ckpts", "ckpts/*"])
def test_a_folder_or_a_glob_becomes_members_in_name_order(tmp_path, pattern):
    states = {name: weights(seed) for seed, name in enumerate(["c.pth", "a.safetensors", "b.pt"])}
    files = {name: write(state, tmp_path / "ckpts" / name) for name, state in states.items()}
    (tmp_path / "ckpts/notes.txt").write_text("not a checkpoint")
    ingredients = importer.run_many(PARAMS, tmp_path, [str(tmp_path / pattern)], first_member=4)
    assert [i.path.name for i in ingredients] == ["member-4.safetensors", "member-5.safetensors",
                                                  "member-6.safetensors"]
    for ingredient, name in zip(ingredients, ["a.safetensors", "b.pt", "c.pth"]):
        assert ingredient.meta["source_uri"] == str((tmp_path / "ckpts" / name).resolve())
        assert ingredient.meta["source_sha256"] == file_sha256(files[name])
        assert "run_id" not in ingredient.meta and 0.0 <= ingredient.fit_acc <= 1.0
        assert_holds(ingredient, states[name])
    assert not any((tmp_path / "runs/.downloads").iterdir())  # the temporary download folder is gone


def test_the_cli_takes_several_sources_and_prints_a_line_per_member(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("data: {pretrain_size: 10, train_size: 10, heldout_size: 50, test_size: 10}\n"
                      "soup: {device: cpu}\n")
    single = write(weights(0), tmp_path / "single.pt")
    write(weights(1), tmp_path / "more/a.safetensors")
    write(weights(2), tmp_path / "more/b.safetensors")
    code = main(["--params", str(params), "--root", str(tmp_path), "import", "--source", single])
    assert code == 2 and "pre-train it first" in capsys.readouterr().err  # imported members are fine-tunes of the base
    write(weights(3), tmp_path / "runs/base/clip.safetensors")  # the pipeline's base, as `pretrain` writes it
    code = main(["--params", str(params), "--root", str(tmp_path), "import", "--source", single,
                 "--source", str(tmp_path / "more"), "--member", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and [line.split(":")[0] for line in lines] == [
        f"member 2 <- {(tmp_path / 'single.pt').resolve()}",
        f"member 3 <- {(tmp_path / 'more/a.safetensors').resolve()}",
        f"member 4 <- {(tmp_path / 'more/b.safetensors').resolve()}"]
    assert all("fit accuracy" in line for line in lines)
    sidecar = json.loads((tmp_path / "runs/imported/member-2.json").read_text())
    assert sidecar["base_model"].startswith("soup-tiny-vit@sha256:")


class _Payload:
    """Pickles to a call of os.system: the restricted loader must refuse it without running it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bad_sources_and_checkpoints_are_one_clear_error_and_write_nothing(tmp_path):
    nan = weights(0)
    bad_key = next(k for k, v in nan.items() if v.is_floating_point())
    nan[bad_key].view(-1)[0] = float("nan")
    good = write(weights(1), tmp_path / "good.safetensors")
    (tmp_path / "pickled.pt").write_bytes(pickle.dumps({"w": _Payload(tmp_path / "executed")}, protocol=2))
    torch.save({"w": [1.0, 2.0]}, tmp_path / "list.pt")
    cases = {
        str(tmp_path / "none/*.pt"): "source '.*none/\\*.pt' holds no .safetensors, .pt, .pth file; point it at",
        str(tmp_path / "missing"): "source '.*missing' does not exist; give a checkpoint file, folder or glob",
        "s3://bucket/*.pt": "source 's3://bucket/\\*.pt' has an unknown scheme 's3:'; give a checkpoint file",
        "experiment:sweep/ckpt.pt?top=2": "top and order rank runs by a metric; add metric=<key>",
        "models:/soup": "is not models:/<name>/<version> or models:/<name>@<alias>",
        write(nan, tmp_path / "nan.safetensors"):
            f"nan.safetensors: tensor '{re.escape(bad_key)}' contains NaN or Inf; re-export",
        str(tmp_path / "pickled.pt"): "pickled.pt was refused by the restricted loader",
        str(tmp_path / "list.pt"): "list.pt does not hold a state dict of tensors",
    }
    for source, message in cases.items():
        with pytest.raises(IngredientError, match=message):
            importer.run_many(PARAMS, tmp_path, [good, source], first_member=0, remote=mlflow_sources())
        assert ingredient_files(tmp_path) == [], source  # the good one before it is not written either
    assert not (tmp_path / "executed").exists()
    with pytest.raises(IngredientError, match="is in MLflow, and no MLflow resolver was given"):  # the stage alone
        importer.run_many(PARAMS, tmp_path, [good, "models:/soup/1"], first_member=0)
    assert ingredient_files(tmp_path) == []


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A real MLflow server with experiment `sweep`: three finished runs logging `ckpt/model.safetensors` and
    `fit_acc`, one failed run that also logs two checkpoints in `two/`, and the second finished run registered as
    `soup-member` version 1, alias `best`."""
    import mlflow

    with serve_mlflow(tmp_path_factory.mktemp("mlflow-server")) as uri:
        client = mlflow.MlflowClient(tracking_uri=uri)
        experiment = client.create_experiment("sweep")
        folder = tmp_path_factory.mktemp("logged")
        runs = []
        for seed, fit_acc in enumerate([0.5, 0.9, 0.7, 1.0]):
            run = client.create_run(experiment)
            client.log_metric(run.info.run_id, "fit_acc", fit_acc)
            client.log_artifact(run.info.run_id, write(weights(seed), folder / str(seed) / "model.safetensors"), "ckpt")
            client.set_terminated(run.info.run_id, "FINISHED" if seed < 3 else "FAILED")
            runs.append(run.info.run_id)
        for name in ("a.pt", "b.pt"):
            client.log_artifact(runs[3], write(weights(0), folder / "two" / name), "two")
        client.create_registered_model("soup-member")
        client.create_model_version("soup-member", f"runs:/{runs[1]}/ckpt", run_id=runs[1])
        client.set_registered_model_alias("soup-member", "best", "1")
        yield uri, runs


@pytest.mark.slow
def test_mlflow_runs_models_and_experiments_become_members_with_their_run_ids(tmp_path, sweep):
    uri, runs = sweep
    sources = [f"runs:/{runs[0]}/ckpt/model.safetensors", "models:/soup-member/1", "models:/soup-member@best",
               "experiment:sweep/ckpt/model.safetensors?top=2&metric=fit_acc"]
    ingredients = importer.run_many(PARAMS, tmp_path, sources, first_member=10, remote=mlflow_sources(uri))
    assert [i.meta["member"] for i in ingredients] == [10, 11, 12, 13, 14]
    chosen = [0, 1, 1, 1, 2]  # top 2 FINISHED runs by fit_acc: 0.9 (run 1) then 0.7 (run 2); the FAILED run 3 is out
    assert [i.meta["run_id"] for i in ingredients] == [runs[k] for k in chosen]
    assert [i.meta["source_uri"] for i in ingredients] == [
        sources[0], "models:/soup-member/1", "models:/soup-member/1",
        f"runs:/{runs[1]}/ckpt/model.safetensors", f"runs:/{runs[2]}/ckpt/model.safetensors"]
    for ingredient, seed in zip(ingredients, chosen):
        assert_holds(ingredient, weights(seed))
    assert len({i.meta["source_sha256"] for i in ingredients}) == 3
    assert not any((tmp_path / "runs/.downloads").iterdir())


@pytest.mark.slow
def test_experiment_order_asc_and_every_finished_run(tmp_path, sweep):
    uri, runs = sweep
    every = importer.run_many(PARAMS, tmp_path, ["experiment:sweep/ckpt/model.safetensors"], first_member=0,
                              remote=mlflow_sources(uri))
    lowest = importer.run_many(PARAMS, tmp_path, ["experiment:sweep/ckpt?metric=fit_acc&order=asc&top=1"],
                               first_member=3, remote=mlflow_sources(uri))
    assert [i.meta["run_id"] for i in every + lowest] == [runs[0], runs[1], runs[2], runs[0]]


@pytest.mark.slow
@pytest.mark.parametrize("source, message", [
    ("models:/soup-member@worst", "source 'models:/soup-member@worst': .*set the alias on a version of 'soup-member'"),
    ("models:/soup-member/7", "source 'models:/soup-member/7': .*check the name and version"),
    ("runs:/0123456789abcdef/ckpt/model.safetensors", "source 'runs:/0123456789abcdef/.*check the run id"),
    ("runs:/{run}/ckpt/other.pt", "run {run} has no artifact 'ckpt/other.pt'; check the path"),
    ("runs:/{failed}/two",
     "source 'runs:/{failed}/two' is a folder with 2 checkpoint files \\['a.pt', 'b.pt'\\], not one"),
    ("experiment:nope/ckpt", "there is no experiment named 'nope'"),
    ("experiment:sweep/ckpt?metric=fit_acc&top=two", "top=two is not a positive whole number"),
    ("experiment:sweep/ckpt/model.safetensors?metric=select_acc",
     "experiment 'sweep' has no FINISHED run with artifact 'ckpt/model.safetensors' and metric 'select_acc'"),
])
def test_a_missing_run_model_alias_or_artifact_is_one_clear_error(tmp_path, sweep, source, message):
    uri, runs = sweep
    names = {"run": runs[0], "failed": runs[3]}
    with pytest.raises(IngredientError, match=message.format(**names)):
        importer.run_many(PARAMS, tmp_path, [source.format(**names)], first_member=0, remote=mlflow_sources(uri))
    assert ingredient_files(tmp_path) == []
