"""Data sets, splits and augmentation; the embedded default is scikit-learn's handwritten digits.

Digits: 1,797 8x8 images, 10 classes, upscaled to 3-channel 8-bit images (as a PNG would hold them)
normalised like the model expects. The base is pre-trained on clean upright digits; the target task is digits rotated,
shrunk and moved on the canvas with noise (see `digits_splits`), on held-out and test source
images that pre-training and fine-tuning never see, plus a shifted test (stronger rotation and
noise). Held-out data are cut into a fit and a select role (`select_split`).
Real data: an image folder, or a torchvision data set already on disk (never downloaded). An image
folder is checked when it is built, before any model work: every split has the same class folders,
none of them empty, and every image file opens and verifies with PIL.
Training augmentation lives in `augment.py`, which only the training code imports.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import Dataset, Subset, TensorDataset, default_collate
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..runtime.errors import SoupError
from .batches import Inputs
from .settings import DataParams

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
MAX_NAMED = 10  # unreadable image files named in one error


@dataclass(frozen=True)
class DataSplits:
    """Disjoint splits, their class names and the prompt templates for the zero-shot head.

    The held-out data have two roles: `fit` (what greedy soup's inclusion test and every learned
    coefficient see) and `select` (what compares methods and settings); test data decide nothing.
    """

    train: Dataset
    fit: Dataset
    select: Dataset
    test: Dataset
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    pretrain: Dataset | None = None
    test_shift: Dataset | None = None
    sources: Mapping[str, torch.Tensor] | None = None  # digits: per split, the source image of each example


def stratified_indices(labels: torch.Tensor, sizes: Sequence[int], seed: int) -> list[torch.Tensor]:
    """Disjoint index sets of the given sizes, each holding the classes in about their overall proportions.

    A seeded permutation is reordered so that every class is spread evenly along it (an example's
    position is its rank within its class divided by the class size), then cut into `sizes`.
    """
    labels = torch.as_tensor(labels)
    n = len(labels)
    if min(sizes, default=0) < 0 or sum(sizes) > n:
        raise SoupError(f"split sizes {list(sizes)} do not fit a data set of {n} images; "
                        "make them smaller (and none negative)")
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    permuted = labels[permutation]
    position = torch.empty(n, dtype=torch.float64)
    for label in permuted.unique():
        members = (permuted == label).nonzero().flatten()
        position[members] = (torch.arange(len(members), dtype=torch.float64) + 0.5) / len(members)
    order = permutation[torch.argsort(position, stable=True)]
    return list(torch.split(order[: sum(sizes)], list(sizes)))


def select_split(labels: torch.Tensor, select_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, select) indices of a held-out set: seeded, stratified by class, sorted.

    The select part holds round(select_fraction * n) examples; each role keeps at least one.
    """
    n = len(labels)
    n_select = round(select_fraction * n)
    if not 0 < n_select < n:
        raise SoupError(f"data.select_fraction {select_fraction} leaves {n_select} of {n} held-out examples for "
                        "select; both fit and select need some: use a fraction between 0 and 1 or more held-out data")
    select, fit = stratified_indices(labels, [n_select, n - n_select], seed)
    return fit.sort().values, select.sort().values


def as_8bit(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] as an 8-bit image holds them (k / 255): what a PNG of the image stores, so an image the
    data set holds and the same image sent to the registered model as a PNG become the same input."""
    return (pixels.clamp(0, 1) * 255).round() / 255


def digits_preprocess(image_size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> dict:
    """The digits' preprocessing in open_clip's preprocess config keys: for an image of `image_size` pixels (the
    data set's own) the transform only normalises, as `digits_splits` does."""
    return {"size": image_size, "mode": "RGB", "mean": list(mean), "std": list(std), "interpolation": "bicubic",
            "resize_mode": "shortest", "fill_color": 0}


def normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Grey or RGB pixels in [0, 1], [N, 1 or 3, H, W], to normalised 3-channel images."""
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (pixels.expand(-1, 3, -1, -1) - mean_t) / std_t


def canvas_views(pixels: torch.Tensor, views: int, *, rotation: float, scale: tuple[float, float], offset: float,
                 noise: float, generator: torch.Generator) -> torch.Tensor:
    """`views` random views of every image [N, 1, H, W] (pixels in [0, 1]), grouped by image: [N * views, 1, H, W].

    Each view rotates the digit by up to +-`rotation` degrees, shrinks it to a side fraction drawn
    uniformly from `scale`, moves its centre by up to +-`offset` of the side and adds Gaussian
    noise of std `noise`; the background stays empty (zero).
    """
    images = pixels.repeat_interleave(views, dim=0)
    n = len(images)
    draws = torch.rand(n, 4, generator=generator)
    angle = (draws[:, 0] * 2 - 1) * math.radians(rotation)
    size = scale[0] + draws[:, 1] * (scale[1] - scale[0])
    centre = (draws[:, 2:] * 2 - 1) * 2 * offset  # in grid units (the side spans 2)
    cos, sin = torch.cos(angle) / size, torch.sin(angle) / size
    linear = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    shift = -(linear @ centre.unsqueeze(-1)).squeeze(-1)  # the output point `centre` samples the input's centre
    theta = torch.cat([linear, shift.unsqueeze(-1)], dim=2)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, padding_mode="zeros", align_corners=False)
    return (out + noise * torch.randn(out.shape, generator=generator)).clamp(0, 1)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 handwritten digits: 8 x 8 images (values 0-16) and their labels, read from the file
    scikit-learn ships without importing it (its import would cost every stage about a second); through its
    loader where that file is not found."""
    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    bundled = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if bundled is not None and bundled.is_file():
        table = np.loadtxt(bundled, delimiter=",")
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target


def digits_splits(params: DataParams, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> DataSplits:
    """The embedded default: scikit-learn digits as TensorDatasets (float32 images, int64 labels).

    Source images are split once, stratified by class: held-out and test sources first, the
    rest is the training pool. Pre-training sees clean, upright, centred images of the pool;
    fine-tuning sees the first `train_size` pool images as target-task views (digits rotated,
    shrunk and moved on the canvas, with noise); held-out and test hold views of their own
    sources only, so no source image of held-out or test is ever trained on. The shifted test
    views the test sources with a stronger rotation and noise. Held-out views of one source
    stay together in one role (fit or select).
    """
    images, targets = digits_arrays()
    pixels = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    pixels = F.interpolate(pixels, size=(params.image_size, params.image_size), mode="bilinear", align_corners=False)
    labels = torch.tensor(targets, dtype=torch.int64)
    pool_size = len(labels) - params.heldout_size - params.test_size
    if pool_size < max(params.train_size, params.pretrain_size):
        raise SoupError(f"data: heldout_size {params.heldout_size} + test_size {params.test_size} leave {pool_size} of "
                        f"{len(labels)} digits for training, fewer than train_size {params.train_size} or "
                        f"pretrain_size {params.pretrain_size}; make the splits smaller")
    heldout, test, pool = stratified_indices(labels, [params.heldout_size, params.test_size, pool_size],
                                             params.split_seed)
    target = {"rotation": params.target_rotation, "noise": params.target_noise}

    def views(index: torch.Tensor, count: int, seed: int, rotation: float, noise: float) -> TensorDataset:
        images = canvas_views(pixels[index], count, rotation=rotation, scale=tuple(params.target_scale),
                              offset=params.target_offset, noise=noise, generator=torch.Generator().manual_seed(seed))
        return TensorDataset(normalize(as_8bit(images), mean, std), labels[index].repeat_interleave(count))

    heldout_views = views(heldout, params.heldout_views, params.split_seed + 1, **target)
    fit_sources, select_sources = select_split(labels[heldout], params.select_fraction, params.split_seed)
    fit_views, select_views = (source_views(part, params.heldout_views) for part in (fit_sources, select_sources))
    pretrain, train = pool[: params.pretrain_size], pool[: params.train_size]
    heldout_source = heldout.repeat_interleave(params.heldout_views)
    return DataSplits(
        pretrain=TensorDataset(normalize(as_8bit(pixels[pretrain]), mean, std), labels[pretrain]),
        train=views(train, 1, params.split_seed + 2, **target),
        fit=take(heldout_views, fit_views),
        select=take(heldout_views, select_views),
        test=views(test, 1, params.split_seed + 3, **target),
        test_shift=views(test, 1, params.shift_seed, rotation=params.shift_rotation, noise=params.shift_noise),
        classnames=DIGIT_CLASSNAMES, templates=tuple(params.templates or DIGIT_TEMPLATES),
        sources={"pretrain": pretrain, "train": train, "fit": heldout_source[fit_views],
                 "select": heldout_source[select_views], "test": test, "test_shift": test},
    )


class TokenizedDataset(Dataset):
    """Examples as named tensors of equal length (a tokenizer's padded output: input_ids, attention_mask, ...), one
    label each; an example is ({name: tensor}, label), a batch's inputs a mapping the model takes as keywords."""

    def __init__(self, encodings: Mapping[str, Sequence], labels: Sequence[int] | torch.Tensor):
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.encodings = {name: torch.as_tensor(values) for name, values in encodings.items()}
        wrong = {name: len(values) for name, values in self.encodings.items() if len(values) != len(self.labels)}
        if not self.encodings or wrong:
            raise SoupError(f"tokenized data set: {len(self.labels)} labels, but encodings of lengths "
                            f"{wrong or 'none'}; give one row of every named tensor per label (pad to one length)")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return {name: values[index] for name, values in self.encodings.items()}, self.labels[index]


def fetch_batch(dataset: Dataset, indices: Sequence[int] | torch.Tensor) -> tuple[Inputs, torch.Tensor]:
    """The (inputs, targets) of the given examples, by tensor indexing when the data set allows."""
    if isinstance(dataset, (TensorDataset, TokenizedDataset)):
        index = torch.as_tensor(indices, dtype=torch.long)
        if isinstance(dataset, TokenizedDataset):
            return {name: values[index] for name, values in dataset.encodings.items()}, dataset.labels[index]
        return dataset.tensors[0][index], dataset.tensors[1][index]
    return default_collate([dataset[int(i)] for i in indices])


def take(dataset: TensorDataset, index: torch.Tensor) -> TensorDataset:
    """The examples `index` of a tensor data set, as a tensor data set."""
    return TensorDataset(*(tensor[index] for tensor in dataset.tensors))


def source_views(sources: torch.Tensor, views: int) -> torch.Tensor:
    """Indices of the views of `sources` in a data set that holds `views` consecutive views per source."""
    return (sources.unsqueeze(1) * views + torch.arange(views)).flatten()


def image_folder_dataset(root: str | Path, transform: Callable | None) -> torchvision.datasets.ImageFolder:
    """A torchvision ImageFolder (root/CLASS/IMAGE), with a clear error for a missing folder or an empty class
    folder."""
    try:
        dataset = torchvision.datasets.ImageFolder(str(root), transform=transform, allow_empty=True)
    except (FileNotFoundError, OSError) as exc:
        raise SoupError(f"image folder {root} cannot be read ({exc}); "
                        "it needs one sub-folder of images per class") from exc
    empty = sorted(set(dataset.classes) - {dataset.classes[target] for target in dataset.targets})
    if empty:
        raise SoupError(
            f"class folder(s) {', '.join(str(Path(root) / name) for name in empty)} hold no images "
            f"({', '.join(IMG_EXTENSIONS)}); add images of that class, or remove its folder from every split"
        )
    return dataset


def check_same_classes(root: Path, folders: Mapping[str, torchvision.datasets.ImageFolder]) -> None:
    """Raise unless every split has the class folders of train, naming the split and the classes it lacks or adds."""
    reference = set(folders["train"].classes)
    for name, dataset in folders.items():
        missing, extra = sorted(reference - set(dataset.classes)), sorted(set(dataset.classes) - reference)
        if missing or extra:
            raise SoupError(
                f"split '{name}' ({root / name}) lacks class folder(s) {missing} and has extra {extra} compared with "
                f"train ({root / 'train'}); give every split the same class folders, each holding images"
            )


def image_problem(path: str | Path) -> str | None:
    """Why PIL cannot open and verify the image file at `path` (no full decode), or None when it can."""
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as exc:  # PIL raises OSError, SyntaxError, struct.error, ... for damaged files
        return f"{type(exc).__name__}: {exc}"
    return None


def check_images(paths: Iterable[str | Path]) -> None:
    """Open and verify every image file; one error names each file that fails and the fix."""
    bad = [f"{path} ({problem})" for path in paths if (problem := image_problem(path)) is not None]
    if bad:
        shown = "; ".join(bad[:MAX_NAMED])
        raise SoupError(f"{len(bad)} image file(s) cannot be read (at most {MAX_NAMED} named): {shown}; "
                        "replace them with intact images or delete them")


def image_folder_splits(params: DataParams, transform: Callable | None) -> DataSplits:
    """root/{train,heldout,test[,test_shift]}/CLASS/IMAGE, checked (class folders, then every image) before use."""
    root = Path(params.root)
    names = ("train", "heldout", "test", *(("test_shift",) if (root / "test_shift").is_dir() else ()))
    folders = {name: image_folder_dataset(root / name, transform) for name in names}
    check_same_classes(root, folders)
    check_images(path for dataset in folders.values() for path, _ in dataset.samples)
    fit, select = fit_and_select(folders["heldout"], params.select_fraction, params.split_seed)
    return DataSplits(train=folders["train"], fit=fit, select=select, test=folders["test"],
                      classnames=_classnames(folders["train"]), templates=tuple(params.templates or IMAGE_TEMPLATES),
                      test_shift=folders.get("test_shift"))


def torchvision_dataset(name: str, root: str | Path, split: str, transform: Callable | None) -> Dataset:
    """A torchvision data set already on disk (download=False); `split` is "train" or "test"."""
    cls = getattr(torchvision.datasets, name, None)
    if not isinstance(cls, type) or not issubclass(cls, Dataset):
        raise SoupError(f"unknown torchvision data set {name!r}; "
                        "use a class name from torchvision.datasets, e.g. 'CIFAR10'")
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


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """Every example's class index, from `targets` / tensors where the data set has them (no image is decoded)."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1]
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return torch.as_tensor(targets, dtype=torch.long)
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)


def fit_and_select(heldout: Dataset, select_fraction: float, seed: int) -> tuple[Subset, Subset]:
    """The held-out data set cut into its fit and select roles (seeded, stratified by class)."""
    fit, select = select_split(dataset_labels(heldout), select_fraction, seed)
    return Subset(heldout, fit.tolist()), Subset(heldout, select.tolist())


def _classnames(dataset: Dataset) -> tuple[str, ...]:
    classes = getattr(dataset, "classes", None)
    if not classes:
        raise SoupError(f"{type(dataset).__name__} has no `classes` list; "
                        "class names are needed for the zero-shot head")
    return tuple(str(name).replace("_", " ") for name in classes)


def build_datasets(params: DataParams, *, transform: Callable | None = None,
                   mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> DataSplits:
    """The splits named by `params`; `transform` (the model's val preprocess) turns real images into tensors."""
    if params.source == "digits":
        return digits_splits(params, mean, std)
    if params.source == "image_folder":
        return image_folder_splits(params, transform)
    root = Path(params.root)
    full_train = torchvision_dataset(params.torchvision_name, root, "train", transform)
    heldout, train = stratified_indices(dataset_labels(full_train),
                                        [params.heldout_size, len(full_train) - params.heldout_size], params.split_seed)
    fit, select = fit_and_select(Subset(full_train, heldout.tolist()), params.select_fraction, params.split_seed)
    return DataSplits(
        train=Subset(full_train, train.tolist()), fit=fit, select=select,
        test=torchvision_dataset(params.torchvision_name, root, "test", transform),
        classnames=_classnames(full_train), templates=tuple(params.templates or IMAGE_TEMPLATES),
    )
