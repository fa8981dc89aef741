"""`soup-pipeline export`: the open_clip folder (the soup's image tower, the base's text tower, the spec's
preprocessing, zero-shot with new class names) and the classifier folder that loads without soup-pipeline, from a
registered version and from runs/soups/<method> alike; bad sources and a mismatched base are clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from soup_pipeline.cli import main
from soup_pipeline.core import export as core_export, portable_classifier
from soup_pipeline.core.data import digits_preprocess
from soup_pipeline.core.models import TINY_ARCH, base_model_id, classifier_from_clip, classifier_spec, load_clip
from soup_pipeline.runtime.errors import SoupError

MODEL = "soup-pipeline-soup"
NEW_CLASSES = ["a photo of a cat", "a photo of a dog", "a photo of a bird"]  # no class of the digits
# Runs in a process whose sys.path is the classifier folder and the installed packages, never this repository.
CLASSIFY = """
import sys
try:
    import soup_pipeline
except ModuleNotFoundError:
    pass
else:
    sys.exit("soup_pipeline is importable: " + soup_pipeline.__file__)
import torch
from safetensors.torch import load_file, save_file
import portable_classifier
module, spec = portable_classifier.load_classifier(sys.argv[1])
with torch.no_grad():
    save_file({"logits": module(load_file(sys.argv[2])["images"]).contiguous()}, sys.argv[3])
print(portable_classifier.__file__)
"""


def load_open_clip(folder: Path):
    """(model, eval transform, tokenizer) as a user of the open_clip folder gets them."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{folder}")


def pil_images() -> list[Image.Image]:
    """Images of other sizes and modes than the model's input, so the transform resizes, crops and converts."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8), mode) for size, mode in
            (((40, 56, 3), "RGB"), ((8, 8), "L"), ((32, 32, 3), "RGB"))]


def assert_preprocess_is_the_specs(preprocess, spec: dict) -> None:
    """The exported eval transform gives what the spec's preprocessing gives, image for image."""
    expected = portable_classifier.image_transform(spec["preprocess"])
    for image in pil_images():
        torch.testing.assert_close(preprocess(image), expected(image), rtol=0, atol=0)


def zero_shot_logits(model, tokenizer, images: torch.Tensor) -> torch.Tensor:
    """CLIP's zero-shot logits of `images` against NEW_CLASSES."""
    with torch.no_grad():
        text = torch.nn.functional.normalize(model.encode_text(tokenizer(NEW_CLASSES)), dim=-1)
        image = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
        return model.logit_scale.exp() * image @ text.T


def classify_outside(classifier_dir: Path, images: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    """The classifier folder's logits, computed in a process that cannot import soup_pipeline."""
    save_file({"images": images.contiguous()}, str(tmp_path / "images.safetensors"))
    paths = dict.fromkeys([str(classifier_dir), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    done = subprocess.run([sys.executable, "-S", "-c", CLASSIFY, str(classifier_dir),
                           str(tmp_path / "images.safetensors"), str(tmp_path / "logits.safetensors")],
                          cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(paths)})
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == classifier_dir / "portable_classifier.py"
    return load_file(str(tmp_path / "logits.safetensors"))["logits"]


# --- the pure export, on a random base and a perturbed image tower (fast) --------------------------


def random_base(path: Path, seed: int):
    """A randomly initialised tiny CLIP, saved to `path`."""
    torch.manual_seed(seed)
    clip = load_clip(TINY_ARCH).model
    save_file({key: value.contiguous() for key, value in clip.state_dict().items()}, str(path))
    return clip


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A classifier whose tower moved away from a random base (a stand-in fine-tune), its spec and its export."""
    folder = tmp_path_factory.mktemp("export")
    base = random_base(folder / "base.safetensors", seed=0)
    torch.manual_seed(1)
    classifier = classifier_from_clip(load_clip(TINY_ARCH, folder / "base.safetensors").model, torch.randn(3, 128))
    with torch.no_grad():
        for parameter in classifier.visual.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    spec = {**classifier_spec(TINY_ARCH, 3), "classnames": ["zero", "one", "two"], "preprocess": digits_preprocess(32),
            "base_model": base_model_id(TINY_ARCH, folder / "base.safetensors"),
            "builder": portable_classifier.BUILTIN_BUILDER}
    state = classifier.eval().state_dict()
    written = core_export.export(state, spec, folder / "out", folder / "base.safetensors")
    return {"folder": folder, "base": base.eval(), "classifier": classifier, "spec": spec, "state": state,
            "written": written, "images": torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))}


def test_the_open_clip_folder_is_the_tower_on_the_base_text_tower_with_the_specs_preprocessing(toy):
    model, preprocess, tokenizer = load_open_clip(toy["written"]["open_clip"])
    with torch.no_grad():
        features = model.encode_image(toy["images"])
        torch.testing.assert_close(features, toy["classifier"].visual(toy["images"]), rtol=1e-6, atol=1e-6)
        # the tower, not the base's
        assert not torch.allclose(features, toy["base"].encode_image(toy["images"]), atol=1e-3)
        tokens = tokenizer(NEW_CLASSES)
        torch.testing.assert_close(model.encode_text(tokens), toy["base"].encode_text(tokens), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.logit_scale, toy["base"].logit_scale)
    assert_preprocess_is_the_specs(preprocess, toy["spec"])
    logits = zero_shot_logits(model, tokenizer, toy["images"])
    assert logits.shape == (4, len(NEW_CLASSES)) and torch.isfinite(logits).all()


def test_the_classifier_folder_loads_with_torch_and_open_clip_alone(toy, tmp_path):
    folder = toy["written"]["classifier"]
    assert json.loads((folder / portable_classifier.SPEC_FILE).read_text()) == toy["spec"]
    with torch.no_grad():
        expected = toy["classifier"](toy["images"])
    torch.testing.assert_close(classify_outside(folder, toy["images"], tmp_path), expected, rtol=1e-6, atol=1e-6)


def test_a_base_the_soup_was_not_fine_tuned_from_is_refused_naming_both_and_nothing_is_written(toy, tmp_path):
    other = tmp_path / "other.safetensors"
    random_base(other, seed=5)
    with pytest.raises(SoupError) as refused:
        core_export.export(toy["state"], toy["spec"], tmp_path / "out", other)
    assert toy["spec"]["base_model"] in str(refused.value) and base_model_id(TINY_ARCH, other) in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_a_spec_without_its_base_or_preprocessing_or_with_another_builder_is_refused(toy, tmp_path):
    for change, message in (({"base_model": None}, "base_model"), ({"preprocess": None}, "preprocess"),
                            ({"builder": "team.models:build"}, "team.models:build")):
        with pytest.raises(SoupError, match=message):
            core_export.export(toy["state"], {**toy["spec"], **change}, tmp_path / "out",
                               toy["folder"] / "base.safetensors")


def test_unknown_sources_and_a_soup_not_built_are_clear_errors(tmp_path, capsys):
    params = Path(__file__).resolve().parents[1] / "params.yaml"
    for source, message in (("runs/ingredients/member-0.safetensors", "unknown source"),
                            ("elsewhere", "unknown source"),
                            ("runs/soups/uniform", "soup-pipeline soup --method uniform")):
        code = main(["--params", str(params), "--root", str(tmp_path), "export", source,
                     "--out", str(tmp_path / "out")])
        assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_registered_version_needs_a_base_outside_a_pipeline_root(toy, tmp_path):
    from soup_pipeline.stages import export as stage_export

    with pytest.raises(SoupError, match="--base"):
        stage_export.run(toy["state"], toy["spec"], tmp_path / "out", base=None, params=None, root=tmp_path)


# --- from the flow's registry and its runs/ (the session's pipeline; slow) -------------------------


@pytest.fixture(scope="module")
def exports(pipeline, tmp_path_factory):
    """The flow's champion exported from the registry and the same soup from runs/soups/, both by the CLI."""
    out = tmp_path_factory.mktemp("exports")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", pipeline.uri)
        for name, source in (("registry", f"models:/{MODEL}@champion"), ("runs", "runs/soups/mehl_soup_auto")):
            code = main(["--params", str(pipeline.repo / "params.yaml"), "--root", str(pipeline.repo), "export", source,
                         "--out", str(out / name)])
            assert code == 0, name
    return out


@pytest.fixture
def registered(pipeline, monkeypatch):
    """The registered champion as MLflow loads it: (its module, its spec, test images)."""
    import mlflow

    from soup_pipeline.config import load_params
    from soup_pipeline.workspace.loading import load_splits

    monkeypatch.setenv("MLFLOW_TRACKING_URI", pipeline.uri)
    mlflow.set_tracking_uri(pipeline.uri)
    mlflow.set_registry_uri(pipeline.uri)
    wrapper = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion").unwrap_python_model()
    images = load_splits(load_params(pipeline.repo / "params.yaml")).test.tensors[0][:8]
    return wrapper.module.eval(), wrapper.spec, images


@pytest.mark.slow
def test_the_exported_champion_is_the_registered_model_in_open_clip_and_in_plain_torch(exports, registered, tmp_path):
    module, spec, images = registered
    model, preprocess, tokenizer = load_open_clip(exports / "registry" / "open_clip")
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), module.visual(images), rtol=1e-6, atol=1e-6)
        expected = module(images)
    assert_preprocess_is_the_specs(preprocess, spec)
    logits = zero_shot_logits(model, tokenizer, images)
    assert logits.shape == (len(images), len(NEW_CLASSES)) and torch.isfinite(logits).all()
    outside = classify_outside(exports / "registry" / "classifier", images, tmp_path)
    torch.testing.assert_close(outside, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_the_export_from_runs_is_the_export_from_the_registry(exports):
    for name in ("open_clip/open_clip_config.json", "classifier/model_spec.json", "classifier/portable_classifier.py"):
        assert (exports / "runs" / name).read_text() == (exports / "registry" / name).read_text(), name
    for name in ("open_clip/open_clip_model.safetensors", "classifier/weights.safetensors"):
        runs, registry = load_file(str(exports / "runs" / name)), load_file(str(exports / "registry" / name))
        assert runs.keys() == registry.keys()
        for key in runs:
            torch.testing.assert_close(runs[key], registry[key], rtol=0, atol=0)


@pytest.mark.slow
def test_the_cli_refuses_a_mismatched_base_and_an_unknown_registered_model(pipeline, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", pipeline.uri)
    other = tmp_path / "other.safetensors"
    random_base(other, seed=3)
    args = ["--params", str(pipeline.repo / "params.yaml"), "--root", str(pipeline.repo), "export"]
    assert main([*args, f"models:/{MODEL}/1", "--out", str(tmp_path / "out"), "--base", str(other)]) == 2
    error = capsys.readouterr().err
    assert base_model_id(TINY_ARCH, other) in error and "fine-tuned from soup-tiny-vit@sha256:" in error
    assert main([*args, "models:/no-such-model@champion", "--out", str(tmp_path / "out")]) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
