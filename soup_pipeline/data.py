"""Data sets, splits and augmentation; the embedded default is scikit-learn's handwritten digits.

Digits: 1,797 8x8 images, 10 classes, upscaled to 3-channel tensors normalised like the model
expects, split by one seeded permutation into disjoint pretrain / train / held-out / test
splits, plus a distribution-shifted copy of the test split (random rotation and pixel noise).
Real data: an image folder, or a torchvision data set already on disk (never downloaded).
Augmentation runs on batches of image tensors, so it works the same for every source.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
import torchvision
from sklearn.datasets import load_digits
from torch.utils.data import Dataset, Subset, TensorDataset

from .config import DataParams
from .errors import SoupError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's default (OpenAI CLIP) normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DIGIT_CLASSNAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = (
    "a photo of the digit {}.",
    "a handwritten {}.",
    "the number {}.",
    "a blurry photo of the digit {}.",
    "a drawing of the number {}.",
)
IMAGE_TEMPLATES = ("a photo of a {}.", "a blurry photo of a {}.", "a close-up photo of a {}.", "a photo of the {}.")


@dataclass(frozen=True)
class DataSplits:
    """Disjoint splits, their class names and the prompt templates for the zero-shot head."""

    train: Dataset
    heldout: Dataset
    test: Dataset
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    pretrain: Dataset | None = None
    test_shift: Dataset | None = None


@dataclass(frozen=True)
class Augment:
    """Random per-image affine transform plus Gaussian noise."""

    rotate: float = 0.0  # max |rotation| in degrees
    translate: float = 0.0  # max |shift| as a fraction of the image side
    scale: float = 0.0  # max relative zoom in or out
    noise: float = 0.0  # std of the added Gaussian noise, in the tensor's units


AUGMENTATIONS = {  # suited to 32 px digits: small affine, no flips
    "none": Augment(),
    "light": Augment(rotate=10, translate=0.06, scale=0.05),
    "strong": Augment(rotate=25, translate=0.12, scale=0.15, noise=0.1),
}


def random_affine(images: torch.Tensor, aug: Augment, generator: torch.Generator, *,
                  padding_mode: str = "border") -> torch.Tensor:
    """Apply `aug` to a batch [N, C, H, W], one random draw per image from `generator`."""
    n = images.shape[0]
    draws = torch.rand(n, 4, generator=generator) * 2 - 1
    angle = draws[:, 0] * math.radians(aug.rotate)
    zoom = 1 + draws[:, 1] * aug.scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    shift = draws[:, 2:] * 2 * aug.translate
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, padding_mode=padding_mode, align_corners=False)
    if aug.noise:
        out = out + aug.noise * torch.randn(out.shape, generator=generator).to(out)
    return out


def augment(images: torch.Tensor, preset: str, generator: torch.Generator) -> torch.Tensor:
    """A training batch augmented with a named preset ("none" returns it unchanged)."""
    if preset not in AUGMENTATIONS:
        raise SoupError(f"unknown augmentation {preset!r}; use one of {sorted(AUGMENTATIONS)}")
    return images if preset == "none" else random_affine(images, AUGMENTATIONS[preset], generator)


def split_indices(n: int, sizes: Sequence[int], seed: int) -> list[torch.Tensor]:
    """Disjoint index sets of the given sizes from one seeded permutation of range(n)."""
    if min(sizes, default=0) < 0 or sum(sizes) > n:
        raise SoupError(f"split sizes {list(sizes)} do not fit a data set of {n} images; make them smaller (and none negative)")
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return list(torch.split(permutation[: sum(sizes)], list(sizes)))


def normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Grey or RGB pixels in [0, 1], [N, 1 or 3, H, W], to normalised 3-channel images."""
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (pixels.expand(-1, 3, -1, -1) - mean_t) / std_t


def digits_splits(params: DataParams, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> DataSplits:
    """The embedded default: scikit-learn digits as TensorDatasets (float32 images, int64 labels)."""
    digits = load_digits()
    pixels = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    pixels = F.interpolate(pixels, size=(params.image_size, params.image_size), mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    sizes = [params.pretrain_size, params.train_size, params.heldout_size, params.test_size]
    pretrain, train, heldout, test = split_indices(len(labels), sizes, params.split_seed)

    def subset(index: torch.Tensor, images: torch.Tensor | None = None) -> TensorDataset:
        return TensorDataset(normalize(pixels[index] if images is None else images, mean, std), labels[index])

    shift = Augment(rotate=params.shift_rotation, noise=params.shift_noise)
    generator = torch.Generator().manual_seed(params.shift_seed)
    shifted = random_affine(pixels[test], shift, generator, padding_mode="zeros").clamp(0, 1)
    return DataSplits(
        train=subset(train), heldout=subset(heldout), test=subset(test),
        classnames=DIGIT_CLASSNAMES, templates=tuple(params.templates or DIGIT_TEMPLATES),
        pretrain=subset(pretrain), test_shift=subset(test, shifted),
    )


def image_folder_dataset(root: str | Path, transform: Callable | None) -> torchvision.datasets.ImageFolder:
    """A torchvision ImageFolder (root/CLASS/IMAGE), with a clear error for a missing or empty folder."""
    try:
        return torchvision.datasets.ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, OSError) as exc:
        raise SoupError(f"image folder {root} cannot be read ({exc}); it needs one sub-folder of images per class") from exc


def torchvision_dataset(name: str, root: str | Path, split: str, transform: Callable | None) -> Dataset:
    """A torchvision data set already on disk (download=False); `split` is "train" or "test"."""
    cls = getattr(torchvision.datasets, name, None)
    if not isinstance(cls, type) or not issubclass(cls, Dataset):
        raise SoupError(f"unknown torchvision data set {name!r}; use a class name from torchvision.datasets, e.g. 'CIFAR10'")
    accepted = inspect.signature(cls).parameters
    options = {"root": str(root), "transform": transform, "download": False, "split": split, "train": split == "train"}
    if "split" in accepted:
        options.pop("train")
    kwargs = {key: value for key, value in options.items() if key in accepted}
    try:
        return cls(**kwargs)
    except (RuntimeError, FileNotFoundError, OSError, ValueError) as exc:
        raise SoupError(
            f"torchvision data set {name} ({split}) cannot be opened under {root} ({exc}); nothing is downloaded here: "
            "put the files there on a connected machine first"
        ) from exc


def _classnames(dataset: Dataset) -> tuple[str, ...]:
    classes = getattr(dataset, "classes", None)
    if not classes:
        raise SoupError(f"{type(dataset).__name__} has no `classes` list; class names are needed for the zero-shot head")
    return tuple(str(name).replace("_", " ") for name in classes)


def build_datasets(params: DataParams, *, transform: Callable | None = None,
                   mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> DataSplits:
    """The splits named by `params`; `transform` (the model's val preprocess) turns real images into tensors."""
    if params.source == "digits":
        return digits_splits(params, mean, std)
    root = Path(params.root)
    if params.source == "image_folder":
        folders = {name: image_folder_dataset(root / name, transform) for name in ("train", "heldout", "test")}
        shift_root = root / "test_shift"
        shifted = image_folder_dataset(shift_root, transform) if shift_root.is_dir() else None
        classnames = _classnames(folders["train"])
        for name, dataset in [*folders.items(), ("test_shift", shifted)]:
            if dataset is not None and _classnames(dataset) != classnames:
                raise SoupError(
                    f"{root / name} has classes {_classnames(dataset)} but train has {classnames}; use the same class folders"
                )
        return DataSplits(**folders, classnames=classnames, templates=tuple(params.templates or IMAGE_TEMPLATES),
                          test_shift=shifted)
    full_train = torchvision_dataset(params.torchvision_name, root, "train", transform)
    heldout, train = split_indices(len(full_train), [params.heldout_size, len(full_train) - params.heldout_size],
                                   params.split_seed)
    return DataSplits(
        train=Subset(full_train, train.tolist()), heldout=Subset(full_train, heldout.tolist()),
        test=torchvision_dataset(params.torchvision_name, root, "test", transform),
        classnames=_classnames(full_train), templates=tuple(params.templates or IMAGE_TEMPLATES),
    )
