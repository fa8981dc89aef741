"""data.py: digits splits, the shifted test, augmentation, image folders and torchvision data sets; params errors."""

from __future__ import annotations

from typing import get_args

import pytest
import torch
from PIL import Image
from torchvision.transforms import ToTensor

from soup_pipeline.config import Augmentation, DataParams, SweepParams, parse_section
from soup_pipeline.data import (
    AUGMENTATIONS, DIGIT_CLASSNAMES, IMAGE_TEMPLATES, augment, build_datasets, digits_splits, split_indices,
    torchvision_dataset,
)
from soup_pipeline.errors import SoupError


def test_split_indices_are_disjoint_and_deterministic():
    sizes = [500, 300, 500, 497]
    first, again = split_indices(1797, sizes, seed=0), split_indices(1797, sizes, seed=0)
    assert [len(part) for part in first] == sizes
    assert len(torch.cat(first).unique()) == sum(sizes)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], split_indices(1797, sizes, seed=1)[0])


def test_split_sizes_too_large_are_refused():
    with pytest.raises(SoupError, match=r"\[1000, 1000\]"):
        split_indices(1797, [1000, 1000], seed=0)


def test_digits_default_splits():
    splits = digits_splits(DataParams())
    assert [len(splits.pretrain), len(splits.train), len(splits.heldout), len(splits.test)] == [500, 300, 500, 497]
    images, labels = splits.train.tensors
    assert images.shape == (300, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert splits.classnames == DIGIT_CLASSNAMES and all("{}" in t for t in splits.templates)
    assert torch.equal(splits.test.tensors[1], splits.test_shift.tensors[1])
    assert not torch.allclose(splits.test.tensors[0], splits.test_shift.tensors[0])
    again = digits_splits(DataParams())
    for name in ("pretrain", "train", "heldout", "test", "test_shift"):
        for a, b in zip(getattr(splits, name).tensors, getattr(again, name).tensors):
            assert torch.equal(a, b), name


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
    assert [len(splits.train), len(splits.heldout), len(splits.test)] == [4, 4, 4] and splits.test_shift is None
    image, label = splits.train[2]
    assert image.shape == (3, 40, 40) and label == 1


def test_image_folder_missing_split_names_the_folder(tmp_path):
    with pytest.raises(SoupError, match="train"):
        build_datasets(DataParams(source="image_folder", root=str(tmp_path)))


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
