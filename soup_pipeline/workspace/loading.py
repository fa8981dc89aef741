"""What the stages load from the workspace: the sweep's members, the data splits (through the model's own
preprocessing), the ingredients as a store, the merge methods' anchor, the soup objective, and the JSON files earlier
stages wrote."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import Params, SoupSettings
from ..core.data import DataSplits, build_datasets, digits_preprocess
from ..core.families import family_of
from ..core.ingredients import IngredientStore
from ..core.portable_classifier import image_transform, make_module
from ..runtime.errors import SoupError
from ..soups import Objective
from .paths import StagePaths


def with_members(params: Params, members: list[int]) -> Params:
    """`params` with the sweep narrowed to `members`."""
    return params.model_copy(update={"sweep": params.sweep.model_copy(update={"members": members})})


def member_ids(params: Params) -> list[int]:
    """The sweep's member ids."""
    return list(params.sweep.members)


def preprocess_config(params: Params) -> dict:
    """How an image becomes the model's input in this pipeline (open_clip's preprocess config keys): the
    evaluation's transform is built from it, and the registered model carries it to preprocess what it is sent."""
    if params.data.source == "digits":
        return digits_preprocess(params.data.image_size)
    return family_of(params.model).preprocess(params.model, params.data.image_size)


def load_splits(params: Params) -> DataSplits:
    """The data splits; real images are turned into tensors by the model's own eval transform."""
    preprocess = preprocess_config(params)
    transform = None if params.data.source == "digits" else image_transform(preprocess)
    return build_datasets(params.data, transform=transform, mean=preprocess["mean"], std=preprocess["std"])


def open_store(params: Params, paths: StagePaths, members: list[int] | None = None,
               settings: SoupSettings | None = None) -> IngredientStore:
    """The sweep's ingredients (its fine-tunes, then the imported checkpoints), held as `settings` (a method's
    parameters; else the shared soup keys) say; a missing one names the member and how to make it."""
    chosen = member_ids(params) if members is None else members
    files = [paths.ingredient(k) for k in chosen]
    missing = [k for k, p in zip(chosen, files) if not p.exists()]
    if missing:
        raise SoupError(f"ingredients of members {missing} are missing under {paths.ingredients_dir}; "
                        "run `dvc repro` or `soup-pipeline finetune --member K` first")
    dtype = (settings or params.soup).storage_dtype
    return IngredientStore(files + paths.imported_ingredients(), storage_dtype=getattr(torch, dtype) if dtype else None)


def open_anchor(paths: StagePaths, store: IngredientStore) -> dict[str, torch.Tensor]:
    """theta_0 of the merge methods: the base's zero-shot classifier, refused when the ingredients name another base."""
    path = paths.zero_shot_weights
    if not path.is_file():
        raise SoupError(f"{path} is missing; run `soup-pipeline pretrain` (or `dvc repro`) first")
    anchor = IngredientStore([path])
    base = anchor.ingredients[0].meta.get("base_model")
    others = sorted({i.meta.get("base_model") for i in store.ingredients} - {None, base})
    if others:
        raise SoupError(f"the ingredients were fine-tuned from {others}, not from this pipeline's base {base}; "
                        "the merge methods measure them from the model they were fine-tuned from")
    return anchor.load(0)


def soup_objective(params: Params, store: IngredientStore, splits: DataSplits,
                   settings: SoupSettings | None = None) -> Objective:
    """Cross-entropy of the classifier the ingredients were fine-tuned as, fitted on the fit role, choosing on select,
    in mini-batches of `settings.batch_size` (a method's parameters; else the shared soup keys)."""
    spec = store.ingredients[0].meta.get("classifier_spec")
    if spec is None:
        raise SoupError(f"{store.ingredients[0].path} has no classifier_spec in its sidecar; re-run its fine-tune")
    return Objective(model_factory=lambda: make_module(spec), fit=splits.fit, select=splits.select,
                     batch_size=(settings or params.soup).batch_size)


def read_json(path: Path) -> dict:
    """A JSON file a previous stage wrote; a missing one names the stage to run."""
    if not path.is_file():
        raise SoupError(f"{path} is missing; run the stage that writes it first (`dvc repro`)")
    return json.loads(path.read_text())
