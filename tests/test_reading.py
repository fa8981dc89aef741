"""core/reading.py and runtime/precision.py: batches read by DataLoader worker processes are the same bytes as batches
read in the calling thread (a fine-tune's ingredient and an evaluation's logits alike), and bfloat16 autocast reaches
the forward passes of fine-tuning, evaluation and MEHL-Soup's inner steps, nothing else."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.datasets import ImageFolder

from soup_pipeline.core.data import CLIP_MEAN, CLIP_STD, DataSplits, digits_preprocess, image_folder_splits
from soup_pipeline.core.ingredients import file_sha256
from soup_pipeline.core.portable_classifier import image_transform
from soup_pipeline.core.reading import held_in_memory, read_batches, resolve_workers, sequential_batches
from soup_pipeline.core.settings import DataParams, EvaluateParams, FinetuneParams, SweepParams, parse_section
from soup_pipeline.evaluation.scoring import model_outputs
from soup_pipeline.runtime.errors import SoupError
from soup_pipeline.runtime.precision import autocast
from soup_pipeline.soups import Objective, run_method
from soup_pipeline.soups.comparators.ensemble import ensemble_logits
from soup_pipeline.training.finetune import finetune
from soup_pipeline.training.sweep import sample_hparams
from toys import params_for, toy_ingredients, toy_objective

ONE_EPOCH = FinetuneParams(epochs=1, lr=1e-4, augmentation="strong", label_smoothing=0.1, seed=7).model_dump()


class RecordingFolder(ImageFolder):
    """An image folder that notes, in a file, the process that read each image."""

    def __init__(self, root: Path, transform, log: Path):
        super().__init__(str(root), transform=transform)
        self.log = log

    def __getitem__(self, index: int):
        with self.log.open("a") as out:
            out.write(f"{os.getpid()}\n")
        return super().__getitem__(index)


def write_digit_folder(splits, root: Path) -> None:
    """The tiny digits as 8-bit PNGs in an image folder (root/{train,heldout,test}/CLASS/i.png)."""
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    parts = {"train": [splits.train], "heldout": [splits.fit, splits.select], "test": [splits.test]}
    for split, datasets in parts.items():
        for part, dataset in enumerate(datasets):
            for i, (image, label) in enumerate(dataset):
                folder = root / split / splits.classnames[int(label)]
                folder.mkdir(parents=True, exist_ok=True)
                pixels = ((image * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
                Image.fromarray(pixels).save(folder / f"{part}-{i}.png")


def dtype_recording(objective: Objective) -> tuple[Objective, list[torch.dtype]]:
    """The objective whose models note, in the list returned, the dtype of each forward pass's output."""
    seen: list[torch.dtype] = []

    def recording_model():
        model = objective.model_factory()
        model.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
        return model

    return dataclasses.replace(objective, model_factory=recording_model), seen


@pytest.fixture(scope="module")
def digit_folder(tiny_splits, tmp_path_factory):
    """(the folder's splits, read through the pipeline's image transform, and the transform)."""
    root = tmp_path_factory.mktemp("digit-folder")
    write_digit_folder(tiny_splits, root)
    transform = image_transform(digits_preprocess(32))
    return image_folder_splits(DataParams(source="image_folder", root=str(root), image_size=32), transform), transform


def test_workers_read_the_same_batches_in_other_processes(digit_folder, tmp_path):
    splits, transform = digit_folder
    log = tmp_path / "pids.txt"
    folder = RecordingFolder(Path(splits.train.root), transform, log)
    order = torch.randperm(len(folder), generator=torch.Generator().manual_seed(0)).split(16)
    alone = list(read_batches(folder, order, workers=0))
    readers_alone = set(log.read_text().split())
    log.unlink()
    together = list(read_batches(folder, order, workers=2))
    assert readers_alone == {str(os.getpid())}
    assert str(os.getpid()) not in log.read_text().split() and len(set(log.read_text().split())) == 2
    assert len(alone) == len(together) == len(order)
    for (x0, y0), (x2, y2) in zip(alone, together):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)


def test_a_finetune_read_by_workers_is_the_same_bytes_as_one_read_in_its_thread(pretrained_base, digit_folder,
                                                                                 tmp_path):
    base, _ = pretrained_base
    splits, transform = digit_folder
    log = tmp_path / "pids.txt"
    recorded = dataclasses.replace(splits, train=RecordingFolder(Path(splits.train.root), transform, log))
    alone = finetune(base, ONE_EPOCH, splits, tmp_path / "alone.safetensors", member=0, workers=0)
    together = finetune(base, ONE_EPOCH, recorded, tmp_path / "together.safetensors", member=0, workers=2)
    assert str(os.getpid()) not in log.read_text().split()  # every training image was read by a worker
    assert file_sha256(alone.path) == file_sha256(together.path)
    assert (alone.meta["fit_acc"], alone.meta["select_acc"]) == (together.meta["fit_acc"], together.meta["select_acc"])


def test_evaluation_logits_are_the_same_whatever_the_workers(digit_folder):
    splits, _ = digit_folder
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    alone = model_outputs(model, splits.test, 64, torch.device("cpu"), workers=0)
    together = model_outputs(model, splits.test, 64, torch.device("cpu"), workers=2)
    assert torch.equal(alone[0], together[0]) and torch.equal(alone[1], together[1])


def test_the_default_workers_follow_where_the_data_are_held(tiny_splits, digit_folder):
    splits, _ = digit_folder
    assert held_in_memory(tiny_splits.train) and held_in_memory(tiny_splits.fit)  # tensors, and a subset of them
    assert not held_in_memory(splits.train) and not held_in_memory(splits.fit)
    assert resolve_workers(None, tiny_splits.train) == 0
    cores = os.cpu_count() or 1
    assert resolve_workers(None, splits.train) == (min(4, cores // 2) if cores >= 4 else 0)
    assert resolve_workers(3, tiny_splits.train) == 3
    assert [len(t) for _, t in sequential_batches(tiny_splits.test, 64)] == [64, 64, 64, 8]


def test_bf16_autocast_runs_matrix_products_in_bfloat16_and_float32_leaves_them_alone():
    layer, x = nn.Linear(4, 3), torch.randn(2, 4)
    with autocast("bf16", "cpu"):
        assert layer(x).dtype == torch.bfloat16
    with autocast("float32", "cpu"):
        assert layer(x).dtype == torch.float32
    with pytest.raises(SoupError, match="not on meta"):
        autocast("bf16", "meta")


def test_a_bf16_finetune_is_recorded_and_differs_from_float32(pretrained_base, tiny_splits, tmp_path):
    base, _ = pretrained_base
    float32 = finetune(base, ONE_EPOCH, tiny_splits, tmp_path / "f32.safetensors", member=0)
    bf16 = finetune(base, {**ONE_EPOCH, "precision": "bf16"}, tiny_splits, tmp_path / "bf16.safetensors", member=0)
    assert float32.meta["hparams"]["precision"] == "float32" and bf16.meta["hparams"]["precision"] == "bf16"
    assert file_sha256(float32.path) != file_sha256(bf16.path)
    assert abs(float32.meta["select_acc"] - bf16.meta["select_acc"]) < 0.1  # the same training, rounded products
    assert sample_hparams(SweepParams(precision="bf16"), 3)["precision"] == "bf16"


def test_bf16_evaluation_gives_float32_logits_close_to_float32s(tiny_splits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    exact, _ = model_outputs(model, tiny_splits.test, 64, torch.device("cpu"))
    rounded, _ = model_outputs(model, tiny_splits.test, 64, torch.device("cpu"), precision="bf16")
    assert rounded.dtype == torch.float32 and not torch.equal(exact, rounded)
    assert torch.allclose(exact, rounded, atol=0.05 * exact.abs().max())


def test_the_ensemble_is_scored_in_the_evaluations_precision_and_the_same_with_workers(tmp_path):
    store = toy_ingredients(tmp_path, 3, dtype=torch.float32)
    objective, seen = dtype_recording(toy_objective(torch.float32))
    cpu, data = torch.device("cpu"), objective.fit
    exact = ensemble_logits(store, objective, cpu, data)
    assert set(seen) == {torch.float32}
    seen.clear()
    rounded = ensemble_logits(store, objective, cpu, data, precision="bf16")
    assert set(seen) == {torch.bfloat16} and rounded.dtype == torch.float32  # each member's forward passes, rounded
    assert not torch.equal(exact, rounded) and torch.allclose(exact, rounded, atol=0.05 * exact.abs().max())
    assert torch.equal(ensemble_logits(store, objective, cpu, data, workers=2), exact)


def test_a_teams_subflow_scores_in_its_precision_and_the_same_with_workers(tmp_path):
    from soup_pipeline.prefect.blocks import evaluate_task

    store = toy_ingredients(tmp_path, 3, dtype=torch.float32)
    objective, seen = dtype_recording(toy_objective(torch.float32))
    data = objective.fit
    splits = DataSplits(train=data, fit=data, select=data, test=data, classnames=(), templates=())
    paths = [str(ingredient.path) for ingredient in store.ingredients]
    exact = evaluate_task.fn({}, paths, objective, splits, batch_size=16)
    assert set(seen) == {torch.float32}
    seen.clear()
    evaluate_task.fn({}, paths, objective, splits, batch_size=16, precision="bf16")
    assert set(seen) == {torch.bfloat16}
    assert evaluate_task.fn({}, paths, objective, splits, batch_size=16, workers=2) == exact


def test_mehl_soup_inner_steps_run_in_bf16_and_the_soup_stays_float32(tmp_path):
    store = toy_ingredients(tmp_path, 4, dtype=torch.float32)
    objective, seen = dtype_recording(toy_objective(torch.float32))
    settings = {"model_batch": 2, "passes": 2.0, "lr": 0.1, "seed": 0, "device": "cpu"}
    exact = run_method("mehl_soup", store, objective, params_for("mehl_soup", **settings))
    steps_in_float32 = seen.count(torch.float32)
    seen.clear()
    rounded = run_method("mehl_soup", store, objective, params_for("mehl_soup", **settings, precision="bf16"))
    assert steps_in_float32 > 0 and seen.count(torch.bfloat16) == steps_in_float32  # every inner step, rounded
    assert {k: v.dtype for k, v in rounded.state_dict.items()} == {k: v.dtype for k, v in exact.state_dict.items()}
    assert rounded.state_dict["net.0.weight"].dtype == torch.float32
    assert torch.allclose(rounded.beta.sum(0), torch.ones_like(rounded.beta[0]), atol=1e-6)
    assert not torch.equal(exact.beta, rounded.beta) and torch.allclose(exact.beta, rounded.beta, atol=0.05)


@pytest.mark.parametrize(("model", "values", "key"), [
    (SweepParams, {"precision": "fp16"}, "precision"), (SweepParams, {"workers": -1}, "workers"),
    (EvaluateParams, {"precision": "half"}, "precision"), (FinetuneParams, {"precision": "int8"}, "precision"),
])
def test_impossible_precision_or_workers_name_the_key(model, values, key):
    with pytest.raises(SoupError, match=rf"(?m)^  {key}: "):
        parse_section(model, values)
