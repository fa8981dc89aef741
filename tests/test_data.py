"""data.py: digits splits, the shifted test, augmentation, image folders and torchvision data sets; params errors."""

from __future__ import annotations

import importlib.util
import random
import shutil
import subprocess
import sys
from typing import get_args

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torchvision.transforms import ToTensor

from soup_pipeline.config import Params, load_params
from soup_pipeline.core.data import (
    DIGIT_CLASSNAMES,
    IMAGE_TEMPLATES,
    build_datasets,
    digits_arrays,
    digits_splits,
    select_split,
    stratified_indices,
    torchvision_dataset,
)
from soup_pipeline.core.settings import Augmentation, DataParams, SweepParams, parse_section
from soup_pipeline.runtime.errors import SoupError
from soup_pipeline.training.augment import AUGMENTATIONS, augment
from soup_pipeline.workspace.loading import load_splits


def test_stratified_indices_are_disjoint_deterministic_and_keep_class_shares():
    labels = torch.arange(1000) % 4  # four classes of 250
    sizes = [400, 200, 100]
    first, again = stratified_indices(labels, sizes, seed=0), stratified_indices(labels, sizes, seed=0)
    assert [len(part) for part in first] == sizes
    assert len(torch.cat(first).unique()) == sum(sizes)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], stratified_indices(labels, sizes, seed=1)[0])
    for part, size in zip(first, sizes):
        assert torch.bincount(labels[part], minlength=4).tolist() == [size // 4] * 4


def test_split_sizes_too_large_are_refused():
    with pytest.raises(SoupError, match=r"\[1000, 1000\]"):
        stratified_indices(torch.zeros(1797, dtype=torch.long), [1000, 1000], seed=0)


def test_select_split_is_stratified_seeded_and_refuses_an_empty_role():
    labels = torch.arange(300) % 3
    fit, select = select_split(labels, 0.4, seed=0)
    assert len(select) == 120 and len(fit) == 180 and not set(fit.tolist()) & set(select.tolist())
    assert torch.bincount(labels[select]).tolist() == [40, 40, 40]
    assert torch.equal(select, select_split(labels, 0.4, seed=0)[1])
    assert not torch.equal(select, select_split(labels, 0.4, seed=1)[1])
    with pytest.raises(SoupError, match="select_fraction"):
        select_split(labels[:2], 0.1, seed=0)


def test_the_digits_are_scikit_learns_read_without_importing_it(monkeypatch):
    images, labels = digits_arrays()
    assert np.array_equal(images, load_digits().images) and np.array_equal(labels, load_digits().target)
    done = subprocess.run([sys.executable, "-c", "import sys; from soup_pipeline.core.data import digits_arrays; "
                           "digits_arrays(); print('sklearn' in sys.modules)"], capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # the file not found: scikit-learn's loader
    fallback_images, fallback_labels = digits_arrays()
    assert np.array_equal(fallback_images, images) and np.array_equal(fallback_labels, labels)


def test_digits_default_splits_sizes_and_source_disjointness():
    splits = digits_splits(DataParams())
    sizes = {name: len(getattr(splits, name)) for name in ("pretrain", "train", "fit", "select", "test", "test_shift")}
    assert sizes["fit"] + sizes["select"] >= 1000 and sizes["test"] >= 1000 and sizes["test_shift"] == sizes["test"]
    assert sizes == {"pretrain": 400, "train": 400, "fit": 597, "select": 594, "test": 1000, "test_shift": 1000}
    images, labels = splits.train.tensors
    assert images.shape == (400, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert splits.classnames == DIGIT_CLASSNAMES and all("{}" in t for t in splits.templates)
    sources = {name: set(value.tolist()) for name, value in splits.sources.items()}
    trained_on = sources["pretrain"] | sources["train"]
    for evaluated in ("fit", "select", "test"):  # no held-out or test source image is trained on
        assert not sources[evaluated] & trained_on, evaluated
    assert not sources["fit"] & sources["select"] and not (sources["fit"] | sources["select"]) & sources["test"]
    assert len(sources["fit"] | sources["select"]) == 397 and len(sources["test"]) == 1000
    for name in ("fit", "select", "test"):  # each view is labelled like its source image
        assert torch.equal(getattr(splits, name).tensors[1],
                           torch.as_tensor(load_digits().target)[splits.sources[name]])
    assert torch.equal(splits.test.tensors[1], splits.test_shift.tensors[1])
    assert not torch.allclose(splits.test.tensors[0], splits.test_shift.tensors[0])
    again = digits_splits(DataParams())
    for name in ("pretrain", "train", "fit", "select", "test", "test_shift"):
        for a, b in zip(getattr(splits, name).tensors, getattr(again, name).tensors):
            assert torch.equal(a, b), name


def test_select_fraction_moves_held_out_sources_between_roles_only():
    half, third = digits_splits(DataParams()), digits_splits(DataParams(select_fraction=0.3))
    assert torch.equal(half.test.tensors[0], third.test.tensors[0])  # test data do not depend on the roles
    assert torch.equal(half.train.tensors[0], third.train.tensors[0])
    assert set(torch.cat([half.sources["fit"], half.sources["select"]]).tolist()) == \
        set(torch.cat([third.sources["fit"], third.sources["select"]]).tolist())
    assert len(third.select) < len(half.select)


def test_the_target_task_moves_the_digits_off_the_pre_training_images():
    splits = digits_splits(DataParams(heldout_views=2))
    fit_images, sources = splits.fit.tensors[0], splits.sources["fit"]
    assert torch.equal(sources[0::2], sources[1::2])  # views of one source sit side by side
    assert not torch.allclose(fit_images[0::2], fit_images[1::2])  # and differ


def test_augmentation_presets():
    assert set(AUGMENTATIONS) == set(get_args(Augmentation))
    images = torch.randn(4, 3, 32, 32)
    assert augment(images, "none", torch.Generator()) is images
    light = augment(images, "light", torch.Generator().manual_seed(3))
    assert light.shape == images.shape and not torch.allclose(light, images)
    assert torch.equal(light, augment(images, "light", torch.Generator().manual_seed(3)))
    with pytest.raises(SoupError, match="'flip'"):
        augment(images, "flip", torch.Generator())


def _write_folder(root, classes=("cat", "dog"), per_class=2):
    for split in ("train", "heldout", "test"):
        for index, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (40, 40), (index * 200, i * 50, 0)).save(root / split / name / f"{i}.png")


def test_image_folder_splits_are_read(tmp_path):
    _write_folder(tmp_path)
    splits = build_datasets(DataParams(source="image_folder", root=str(tmp_path)), transform=ToTensor())
    assert splits.classnames == ("cat", "dog") and splits.templates == IMAGE_TEMPLATES
    assert [len(splits.train), len(splits.fit), len(splits.select), len(splits.test)] == [4, 2, 2, 4]
    assert splits.test_shift is None
    assert sorted(splits.fit[i][1] for i in range(2)) == [0, 1]  # stratified: one of each class in each role
    image, label = splits.train[2]
    assert image.shape == (3, 40, 40) and label == 1


def test_image_folder_missing_split_names_the_folder(tmp_path):
    with pytest.raises(SoupError, match="train"):
        build_datasets(DataParams(source="image_folder", root=str(tmp_path)))


def _build_folder(root):
    return build_datasets(DataParams(source="image_folder", root=str(root)), transform=ToTensor())


def _error(root) -> str:
    """The SoupError message that building the image-folder splits under `root` raises."""
    with pytest.raises(SoupError) as err:
        _build_folder(root)
    return str(err.value)


@pytest.mark.parametrize("damage", ["random bytes", "truncated"])
def test_a_corrupt_image_is_named_when_the_splits_are_built(tmp_path, damage):
    _write_folder(tmp_path)
    bad = tmp_path / "heldout" / "dog" / "1.png"
    data = bad.read_bytes()
    bad.write_bytes(random.Random(0).randbytes(len(data)) if damage == "random bytes" else data[: len(data) // 2])
    message = _error(tmp_path)  # read lazily, these splits would fail only when training reached that image
    assert message.startswith(f"1 image file(s) cannot be read (at most 10 named): {bad} (")
    assert "replace them with intact images or delete them" in message


def test_an_empty_class_folder_is_named(tmp_path):
    _write_folder(tmp_path, classes=("cat", "dog", "owl"))
    for image in (tmp_path / "test" / "owl").iterdir():
        image.unlink()
    message = _error(tmp_path)
    assert message.startswith(f"class folder(s) {tmp_path / 'test' / 'owl'} hold no images (.jpg, ")
    assert "add images of that class, or remove its folder from every split" in message


def test_a_class_folder_missing_from_one_split_names_the_split_and_the_class(tmp_path):
    _write_folder(tmp_path, classes=("a", "b", "c"))
    shutil.rmtree(tmp_path / "test" / "c")
    assert _error(tmp_path).startswith(f"split 'test' ({tmp_path / 'test'}) lacks class folder(s) ['c'] "
                                       "and has extra []")
    shutil.copytree(tmp_path / "train" / "c", tmp_path / "test" / "c")
    shutil.copytree(tmp_path / "train", tmp_path / "test_shift")
    shutil.copytree(tmp_path / "train" / "a", tmp_path / "test_shift" / "d")
    message = _error(tmp_path)
    assert message.startswith(f"split 'test_shift' ({tmp_path / 'test_shift'}) lacks class folder(s) [] "
                              "and has extra ['d']")
    assert "give every split the same class folders" in message


def test_torchvision_dataset_on_disk_only(tmp_path):
    fake = torchvision_dataset("FakeData", tmp_path, "train", ToTensor())
    assert len(fake) > 0
    with pytest.raises(SoupError, match="nothing is downloaded"):
        torchvision_dataset("MNIST", tmp_path, "train", None)
    with pytest.raises(SoupError, match="'NoSuchSet'"):
        torchvision_dataset("NoSuchSet", tmp_path, "train", None)


def test_bad_params_key_is_named():
    with pytest.raises(SoupError, match="train_sise"):
        parse_section(DataParams, {"train_sise": 3}, "params.yaml:data")
    with pytest.raises(SoupError, match="lr_range"):
        parse_section(SweepParams, {"lr_range": [1e-3, 1e-5]}, "params.yaml:sweep")
    with pytest.raises(SoupError, match="root"):
        parse_section(DataParams, {"source": "image_folder"})


@pytest.mark.parametrize("text, message", [
    ("sweep:\n  members: [0, 1, 1]\n", "sweep: members: [0, 1, 1] must be distinct ids"),
    ("sweep:\n  lr_range: [a, 0.1]\n", "sweep.lr_range.0: Input should be a valid number, unable to parse string as a "
                                        "number (got 'a')"),
    ("- a list\n- not a mapping\n", "must hold a mapping at the top level"),
    (bytes(range(256)), "is not text (not UTF-8)"),
])
def test_a_bad_params_file_names_the_file_and_key(tmp_path, text, message):
    bad = tmp_path / "params.yaml"
    bad.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(SoupError) as err:
        load_params(bad)
    assert str(bad) in str(err.value) and message in str(err.value)


def test_held_out_roles_stay_put_when_members_are_added():
    params = Params()
    grown = params.model_copy(update={"sweep": params.sweep.model_copy(
        update={"members": [*params.sweep.members, 12]})})
    before, after = load_splits(params), load_splits(grown)
    for role in ("fit", "select"):
        assert torch.equal(before.sources[role], after.sources[role])
        assert torch.equal(getattr(before, role).tensors[0], getattr(after, role).tensors[0])
