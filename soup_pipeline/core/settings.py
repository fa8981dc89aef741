"""The params sections every layer reads (each stage's own keys, the settings every soup shares), the base
that rejects unknown keys, and the one-line-per-key error messages. `soup_pipeline.config` composes them
into the whole params.yaml model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..runtime.errors import SoupError


class Strict(BaseModel):
    """Base for every params section: unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SoupSettings(Strict):
    """What every soup shares; each method's own parameters extend it (declared in its module)."""

    batch_size: int = Field(128, gt=0)  # held-out mini-batch size
    seed: int = 0  # seeds the ingredient permutations and the held-out stream
    device: str = "auto"  # "auto"/"cuda": every visible GPU, soup i on GPU i mod count (a torchrun rank on its own);
    # else "cpu" or "cuda:1"
    storage_dtype: Literal["float32", "bfloat16", "float16", "float64"] | None = None  # ingredient dtype in memory;
    # None = the file's
    nproc: int = Field(1, ge=1)  # processes per node (torchrun, one per GPU) for the methods that run distributed;
    # results do not depend on it, nor on the three keys below
    nnodes: int = Field(1, ge=1)  # nodes souping together, each running the same command on the same ingredients
    rdzv_endpoint: str | None = None  # host:port of the c10d rendezvous every node's torchrun joins (nnodes > 1)
    join_timeout: int = Field(600, gt=0)  # seconds a node waits for the others to join before the run is refused

    @model_validator(mode="after")
    def _rendezvous(self) -> "SoupSettings":
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"nnodes: {self.nnodes} nodes need rdzv_endpoint, the host:port of the c10d rendezvous "
                             "every node joins (e.g. rdzv_endpoint: node0:29400)")
        return self


def error_lines(exc: ValidationError, prefix: str = "") -> list[str]:
    """One `key: what is wrong (got value)` per bad key; the alternatives of a union share one line.

    A check that spans a section (a value error) names its keys itself, so its whole input is not repeated.
    """
    problems: dict[str, list[str]] = {}
    inputs = {}
    for err in exc.errors():
        key = prefix + (".".join(str(part) for part in err["loc"] if isinstance(part, int) or str(part).isidentifier())
                        or "<root>")
        problems.setdefault(key, []).append(err["msg"].removeprefix("Value error, "))
        inputs[key] = None if err["type"] == "value_error" else repr(err.get("input"))
    return [f"{key}: {'; '.join(dict.fromkeys(msgs))}" + (f" (got {inputs[key]})" if inputs[key] else "")
            for key, msgs in problems.items()]


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per bad key: `section.key: what is wrong (got value)`."""
    return f"invalid parameters in {source}:\n  " + "\n  ".join(error_lines(exc))


def parse_section(model: type[Strict], data: dict | None, source: str = "params") -> Strict:
    """Validate a dict against a params model, raising SoupError that names each bad key."""
    try:
        return model.model_validate(data or {})
    except ValidationError as exc:
        raise SoupError(format_validation_error(exc, source)) from None


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, with a clear error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise SoupError(f"params file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except UnicodeDecodeError:
        raise SoupError(f"params file {path} is not text (not UTF-8); give the YAML params file") from None
    except yaml.YAMLError as exc:
        raise SoupError(f"params file {path} is not valid YAML ({exc}); fix the line it names") from None
    if not isinstance(data, dict):
        raise SoupError(f"params file {path} must hold a mapping at the top level (section: keys), "
                        f"got {type(data).__name__}; see the project's params.yaml")
    return data


# -- model, data, pre-training and sweep ---------------------------------------------------

Augmentation = Literal["none", "light", "strong"]  # presets in soup_pipeline.training.augment.AUGMENTATIONS
Precision = Literal["float32", "bf16"]  # forward passes: float32, or bfloat16 autocast (runtime.precision)


def _check_range(name: str, bounds: tuple[float, float]) -> None:
    if bounds[0] > bounds[1]:
        raise ValueError(f"{name}: low {bounds[0]} is above high {bounds[1]}; give [low, high]")


class ModelParams(Strict):
    """Which model is fine-tuned: its family (`core.families`), architecture and base weights."""

    family: str = "open_clip"  # open_clip, timm, torchvision, or "package.module:function" (a team's own builder)
    arch: str = "soup-tiny-vit"  # the family's architecture name; the default is the tiny open_clip ViT shipped here
    kwargs: dict[str, Any] = {}  # timm, torchvision, own builder: keyword arguments of the model's constructor
    pretrained: str | None = None  # None: pre-train `arch` here first; else a local weights file (open_clip: or a tag
    # in the local cache)
    cache_dir: str | None = None  # cache to resolve open_clip tags from; None = the Hugging Face default cache

    @field_validator("family")
    @classmethod
    def _known_family(cls, value: str) -> str:
        module, sep, function = value.partition(":")
        if value not in FAMILIES and not (sep and module and function):
            raise ValueError(f"unknown model family {value!r}; use one of {list(FAMILIES)} "
                             "or 'package.module:function'")
        return value


FAMILIES = ("open_clip", "timm", "torchvision", "transformers")  # the model families built in (core.families)


class DataParams(Strict):
    """Where the images come from and how they are split."""

    source: Literal["digits", "image_folder", "torchvision"] = "digits"  # digits = scikit-learn's, the embedded default
    root: str | None = None  # image_folder: a folder with train/ heldout/ test/ [test_shift/]; torchvision: the data
    # set's root
    torchvision_name: str | None = None  # torchvision.datasets class already on disk, e.g. "CIFAR10" (never downloaded)
    templates: list[str] | None = None  # prompt templates, each with one {} for the class name; None = the source's
    # default
    image_size: int = Field(32, gt=0)  # digits: side the 8x8 images are upscaled to; image folders with timm,
    # torchvision or an own builder: the side images are resized and cropped to (open_clip's architecture has its own)
    pretrain_size: int = Field(400, ge=0)  # digits: clean images for contrastive pre-training, from the training pool
    train_size: int = Field(400, gt=0)  # digits: source images of the fine-tuning split, from the training pool
    heldout_size: int = Field(397, gt=0)  # held-out source images (torchvision: taken from its train split)
    test_size: int = Field(1000, gt=0)  # digits: test source images, one view each
    heldout_views: int = Field(3, gt=0)  # digits: target-task views per held-out source image
    select_fraction: float = Field(0.5, gt=0, lt=1)  # share of the held-out data in the select role (the rest fits)
    split_seed: int = 0  # seeds the split permutations and the target-task views
    target_rotation: float = Field(20.0, ge=0)  # digits: max |rotation| in degrees of a target-task view
    target_scale: tuple[float, float] = (0.8, 1.0)  # digits: the digit's side as a fraction of the canvas, drawn
    # uniformly
    target_offset: float = Field(0.08, ge=0, lt=0.5)  # digits: max |move| of the digit's centre, as a fraction of the
    # side
    target_noise: float = Field(0.1, ge=0)  # digits: std of Gaussian pixel noise (pixels in [0, 1]) of a target-task
    # view
    shift_rotation: float = Field(45.0, ge=0)  # digits: max |rotation| in degrees of the shifted test views
    shift_noise: float = Field(0.25, ge=0)  # digits: std of Gaussian pixel noise of the shifted test views
    shift_seed: int = 1  # seeds the shifted test views

    @model_validator(mode="after")
    def _source_needs(self) -> "DataParams":
        if self.source != "digits" and not self.root:
            raise ValueError(f"data.root: source {self.source!r} needs a root folder")
        if not 0 < self.target_scale[0] <= self.target_scale[1]:
            raise ValueError(f"data.target_scale: {list(self.target_scale)} must be [low, high] with 0 < low <= high")
        if self.source == "torchvision" and not self.torchvision_name:
            raise ValueError("data.torchvision_name: source 'torchvision' needs a data set class name, e.g. 'CIFAR10'")
        return self


class PretrainParams(Strict):
    """Contrastive pre-training of the tiny model on the pre-training split."""

    epochs: int = Field(30, gt=0)  # passes over the pre-training split
    lr: float = Field(1e-3, gt=0)  # AdamW peak learning rate
    weight_decay: float = Field(0.1, ge=0)  # AdamW weight decay (matrices only)
    batch_size: int = Field(32, gt=0)  # image-caption pairs per step
    warmup_frac: float = Field(0.1, ge=0, lt=1)  # linear warm-up share of the steps, cosine decay after
    augmentation: Augmentation = "light"  # augmentation preset (robust features make fine-tuning with augmentation
    # work)
    seed: int = 0  # seeds the initialisation, the shuffling, the augmentation and the caption choice
    device: str = "auto"  # "auto" takes the GPU when there is one; "cpu" for byte-identical reruns


class FinetuneParams(Strict):
    """The hyperparameters of one fine-tune (one sweep member); recorded in the ingredient's sidecar."""

    lr: float = Field(1e-4, gt=0)  # AdamW peak learning rate
    weight_decay: float = Field(0.1, ge=0)  # AdamW weight decay (matrices only)
    augmentation: Augmentation = "light"  # augmentation preset
    label_smoothing: float = Field(0.0, ge=0, lt=1)  # cross-entropy label smoothing
    epochs: int = Field(10, gt=0)  # passes over the train split
    seed: int = 0  # seeds the shuffling and the augmentation
    batch_size: int = Field(64, gt=0)  # images per step
    warmup_frac: float = Field(0.1, ge=0, lt=1)  # linear warm-up share of the steps, cosine decay after
    precision: Precision = "float32"  # forward passes in float32, or bf16 autocast (float32 weights)


class SweepParams(Strict):
    """Seeded random search: member k's hyperparameters depend only on (seed, k)."""

    members: list[int] = list(range(12))  # member ids (K = how many); an int n means 0..n-1. Append ids to grow the
    # sweep
    seed: int = Field(0, ge=0)  # seeds every member's draw
    lr_range: tuple[float, float] = (3e-5, 1e-3)  # learning rate, drawn log-uniformly
    weight_decay_range: tuple[float, float] = (0.0, 0.2)  # weight decay, drawn uniformly
    label_smoothing_range: tuple[float, float] = (0.0, 0.2)  # label smoothing, drawn uniformly
    epochs_range: tuple[int, int] = (10, 30)  # epochs, an integer drawn uniformly, both ends included
    augmentations: list[Augmentation] = ["none", "light", "strong"]  # presets drawn uniformly
    batch_size: int = Field(64, gt=0)  # images per step, the same for every member
    warmup_frac: float = Field(0.1, ge=0, lt=1)  # linear warm-up share of the steps, the same for every member
    device: str = "auto"  # "auto"/"cuda": every visible GPU, member k on GPU k mod count; "cpu" for byte-identical
    # reruns
    per_device: int = Field(1, ge=1)  # fine-tunes that share one GPU at a time (the flow; on Dask, one GPU resource
    # each)
    workers: int | None = Field(None, ge=0)  # DataLoader processes reading each fine-tune's batches; None: 0 for data
    # held in memory (the digits), half the cores (at most 4, on 4+ cores) for files. Results do not depend on it
    precision: Precision = "float32"  # fine-tuning's forward passes: float32, or bf16 autocast where the device has it

    @field_validator("members", mode="before")
    @classmethod
    def _member_ids(cls, value):
        return list(range(value)) if isinstance(value, int) and value > 0 else value

    @model_validator(mode="after")
    def _ranges(self) -> "SweepParams":
        if not self.members or len(set(self.members)) != len(self.members) or min(self.members) < 0:
            raise ValueError(f"members: {self.members} must be distinct ids >= 0 (or a positive count)")
        for name in ("lr_range", "weight_decay_range", "label_smoothing_range", "epochs_range"):
            _check_range(name, getattr(self, name))
        if self.lr_range[0] <= 0:
            raise ValueError(f"lr_range: low {self.lr_range[0]} must be > 0 (drawn log-uniformly)")
        if (self.weight_decay_range[0] < 0
                or not 0 <= self.label_smoothing_range[0] <= self.label_smoothing_range[1] < 1):
            raise ValueError("weight_decay_range must be >= 0 and label_smoothing_range within [0, 1)")
        if self.epochs_range[0] < 1:
            raise ValueError(f"epochs_range: low {self.epochs_range[0]} must be >= 1")
        if not self.augmentations:
            raise ValueError("augmentations: empty; list presets from 'none', 'light', 'strong'")
        return self


class EvaluateParams(Strict):
    """What is compared, and the ablations (the paper's Fig. 2 and Table 3)."""

    batch_size: int = Field(256, gt=0)  # evaluation batch size
    ingredient_counts: list[int] = [2, 4, 8]  # Fig. 2: greedy and MEHL-Soup+ on the first n members (plus all K)
    remove_top: list[int] = [1, 3]  # Table 3: soups after removing the n best ingredients (by fit accuracy)
    bootstrap_seed: int = 0  # seeds the paired-bootstrap intervals of each method against greedy soup
    bootstrap_resamples: int = Field(2000, gt=0)  # paired-bootstrap resamples
    basin_gap: float = Field(0.1, ge=0, le=1)  # warn when the uniform soup's fit accuracy is this far below the best
    # member's
    workers: int | None = Field(None, ge=0)  # DataLoader processes reading the evaluation batches (None: as the sweep's
    # rule). Results do not depend on it
    precision: Precision = "float32"  # evaluation's forward passes: float32, or bf16 autocast


class KeyRuleParams(Strict):
    """One rule of `imports.key_map`: keys starting with `prefix` (or matching `regex` at their start) get `to`
    there."""

    to: str
    prefix: str | None = None
    regex: str | None = None

    @model_validator(mode="after")
    def _one_pattern(self) -> "KeyRuleParams":
        if (self.prefix is None) == (self.regex is None):
            raise ValueError(f"key rule to {self.to!r} needs exactly one of prefix and regex")
        return self


class ImportParams(Strict):
    """External checkpoints souped beside the sweep's fine-tunes (the `import` stage; soup_pipeline.core.sources)."""

    # files, folders, globs, runs:/<run>/<path>, models:/<name>/<version|@alias>,
    # experiment:<name>/<path>[?metric=...&top=N]
    sources: list[str] = []
    first_member: int = Field(1000, ge=0)  # member id of the first imported checkpoint; the next ones follow
    strip_prefix: str = ""  # removed from every key, e.g. "module."
    key_map: list[KeyRuleParams] = []  # ordered: the first rule matching a key renames it (core.key_maps)
    drop: list[str] = []  # regexes (matched at a key's start) of keys to ignore, e.g. "model\\.transformer\\."
