"""Model families beyond open_clip: timm, torchvision and a team's own builder go through the same pipeline
(specs, bases, preprocessing, import, registration); each of timm and torchvision end to end through `dvc repro`
(the digits) and through the flow `soup-pipeline run` runs (an image folder, registered and served)."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from dvc_repo import make_repo, sh, write_params
from flow_run import run_flow
from soup_pipeline.core.data import DataSplits
from soup_pipeline.core.families import family_of
from soup_pipeline.core.ingredients import read_ingredient
from soup_pipeline.core.portable_classifier import make_module
from soup_pipeline.core.settings import ModelParams
from soup_pipeline.runtime.errors import SoupError

TIMM = ModelParams(family="timm", arch="resnet10t")
TORCHVISION = ModelParams(family="torchvision", arch="resnet18")
OWN = ModelParams(family=f"{__name__}:small_net", arch="small_net", kwargs={"width": 8})
SMALL_RUN = {  # the least work that sweeps, soups with MEHL-Soup+ and TIES, evaluates and registers
    "data": {"pretrain_size": 60, "train_size": 40, "heldout_size": 40, "test_size": 40},
    "pretrain": {"epochs": 1, "device": "cpu"},
    "sweep": {"members": [0, 1], "epochs_range": [1, 1], "device": "cpu"},
    "soup": {"device": "cpu", "batch_size": 32, "refine": {},
             "methods": {"mehl_soup_plus": {"passes": 0.5},
                         "ties": {"search": {"scales": [1.0], "densities": [0.5]}}}},
    "evaluate": {"ingredient_counts": [], "remove_top": [], "bootstrap_resamples": 100},
    "tracking": {"system_metrics": False, "register_method": "mehl_soup_plus"},
}


def small_net(num_classes: int, width: int) -> nn.Module:
    """A team's own module, built by "tests.test_families:small_net" with num_classes and its kwargs."""
    return nn.Sequential(nn.Conv2d(3, width, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, num_classes))


def splits_of(classes: int) -> DataSplits:
    images = torch.zeros(2, 3, 32, 32)
    data = torch.utils.data.TensorDataset(images, torch.zeros(2, dtype=torch.long))
    return DataSplits(train=data, fit=data, select=data, test=data, classnames=tuple(map(str, range(classes))),
                      templates=("{}",))


@pytest.mark.parametrize("model", [TIMM, TORCHVISION, OWN], ids=["timm", "torchvision", "own"])
def test_each_family_builds_from_its_json_spec_and_starts_from_a_base_state_dict(model, tmp_path):
    family = family_of(model)
    spec = json.loads(json.dumps(family.spec(model, 5)))  # what the ingredients and the registry store
    module = make_module(spec)
    assert module(torch.zeros(2, 3, 32, 32)).shape == (2, 5) and not family.zero_shot
    state = {key: value.contiguous() for key, value in module.state_dict().items()}
    save_file(state, str(tmp_path / "base.safetensors"))
    started = family.base_classifier(model, tmp_path / "base.safetensors", splits_of(5))
    assert all(torch.equal(started.state_dict()[key], value) for key, value in module.state_dict().items())
    preprocess = family.preprocess(model, 48)
    assert preprocess["size"] == 48 and len(preprocess["mean"]) == len(preprocess["std"]) == 3


def test_a_base_of_another_module_is_refused_naming_the_keys(tmp_path):
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(SoupError, match="does not fit torchvision resnet18 with 3 classes: missing .*unexpected "
                                        r"\['encoder.weight'\]"):
        family_of(TORCHVISION).base_classifier(TORCHVISION, tmp_path / "other.safetensors", splits_of(3))


def test_the_family_is_checked_in_params_and_the_registered_model_requires_the_familys_package():
    from pydantic import ValidationError

    from soup_pipeline.tracking.registry import _pip_requirements

    with pytest.raises(ValidationError, match="unknown model family 'keras'"):
        ModelParams(family="keras")
    spec = family_of(TIMM).spec(TIMM, 3)
    assert any(line.startswith("timm==") for line in _pip_requirements(spec["requirements"]))
    assert not any(line.startswith("timm==") for line in _pip_requirements())


def image_folder(root: Path, classes=("cat", "dog", "fox"), per_class: int = 6) -> None:
    """train / heldout / test folders of a few 32-pixel PNGs per class, each class its own colour."""
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "heldout", "test"):
        for index, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = (torch.rand(32, 32, 3, generator=generator) * 60 + 90 * index).byte().numpy()
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")


BUILDERS = {"timm": "timm:create_model", "torchvision": "torchvision.models:get_model"}
ARCHS = {"timm": "test_resnet", "torchvision": "squeezenet1_1"}  # small: the runs test the path, not the model


@pytest.mark.slow
@pytest.mark.parametrize("family", ["timm", "torchvision"])
def test_a_library_model_through_dvc_repro_on_the_digits(family, tmp_path):
    repo = make_repo(tmp_path)
    write_params(repo, {**SMALL_RUN, "model": {"family": family, "arch": ARCHS[family], "kwargs": {}}})
    sh("dvc", "repro", "-q", cwd=repo)
    rows = {row["method"]: row for row in json.loads((repo / "runs/eval/methods.json").read_text())}
    assert {"zero_shot", "best_individual", "mehl_soup_plus", "ties", "ensemble"} <= set(rows)
    assert all(0 <= rows[m]["test_acc"] <= 1 for m in rows)
    spec = read_ingredient(repo / "runs/soups/mehl_soup_plus/soup.safetensors").meta["classifier_spec"]
    assert spec["family"] == family and spec["builder"] == BUILDERS[family]
    assert json.loads(sh("dvc", "status", "--json", cwd=repo) or "{}") == {}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["torchvision", "timm"])
def test_a_library_model_through_the_flow_on_an_image_folder_registers_a_model_that_serves_pngs(
        family, harness, tmp_path, monkeypatch):
    image_folder(tmp_path / "images")
    repo = make_repo(tmp_path)
    write_params(repo, {**SMALL_RUN, "model": {"family": family, "arch": ARCHS[family], "kwargs": {}},
                        "data": {"source": "image_folder", "root": str(tmp_path / "images"), "image_size": 32,
                                 "select_fraction": 0.5}})
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    summary = run_flow(repo)
    assert {"mehl_soup_plus", "ties", "best_individual"} <= {row["method"] for row in summary["rows"]}
    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    uri = "models:/soup-pipeline-soup@champion"
    model_dir = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "model")))
    spec = json.loads(next(model_dir.rglob("model_spec.json")).read_text())
    assert spec["builder"] == BUILDERS[family] and spec["classnames"] == ["cat", "dog", "fox"]
    pngs = sorted((tmp_path / "images/test").rglob("*.png"))
    frame = pd.DataFrame({"image": [base64.b64encode(path.read_bytes()).decode() for path in pngs]})
    answer = mlflow.pyfunc.load_model(uri).predict(frame)
    assert len(answer) == len(pngs) and set(answer["label"]) <= {"cat", "dog", "fox"}
    # the registered model is the flow's soup: the same probabilities as the soup's module on the same images
    soup = read_ingredient(repo / "runs/soups/mehl_soup_plus/soup.safetensors")
    module = make_module(soup.meta["classifier_spec"])
    module.load_state_dict(soup_state(soup.path))
    from soup_pipeline.core.portable_classifier import image_transform

    transform = image_transform(spec["preprocess"])
    batch = torch.stack([transform(Image.open(io.BytesIO(path.read_bytes()))) for path in pngs])
    with torch.no_grad():
        expected = torch.softmax(module.eval()(batch), dim=-1)
    torch.testing.assert_close(torch.tensor(answer[["p_cat", "p_dog", "p_fox"]].to_numpy(), dtype=torch.float32),
                               expected, rtol=1e-5, atol=1e-6)


def soup_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def test_a_teams_own_builder_must_be_importable_where_the_model_loads():
    script = ("import portable_classifier, sys\n"
              "try:\n"
              "    portable_classifier.make_module({'builder': 'no_such_team_pkg.models:net', 'builder_kwargs': {}})\n"
              "except ValueError as exc:\n    print(exc)\n")
    folder = Path(__file__).parents[1] / "soup_pipeline" / "core"
    out = subprocess.run([sys.executable, "-c", script], cwd=folder, capture_output=True, text=True, check=True).stdout
    assert "cannot be imported" in out and "install the package that defines it" in out
