"""One fine-tune: the base classifier of the model's family (open_clip: the pre-trained image tower and its zero-shot
head), trained end to end, saved as an ingredient.

Also the training loop shared with pre-training: seeded shuffles, AdamW with linear warm-up and
cosine decay, weight decay on matrices only. On the CPU a given seed gives identical bytes, whether
the fine-tune runs alone or in a thread beside others (randomness.py).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..core.batches import Inputs, forward, to_device
from ..core.data import DataSplits
from ..core.families import family_of
from ..core.ingredients import Ingredient, save_ingredient
from ..core.models import base_model_id
from ..core.reading import read_batches
from ..core.schedule import warmup_cosine_scheduler
from ..core.settings import FinetuneParams, ModelParams, parse_section
from ..evaluation.scoring import predictor, split_accuracies
from ..runtime.devices import resolve_device
from ..runtime.errors import SoupError
from ..runtime.precision import autocast
from ..runtime.randomness import OwnGlobalRNG
from .augment import augment

EpochCallback = Callable[[int, float], None]  # (epoch index, mean training loss)


def adamw_warmup_cosine(model: nn.Module, *, lr: float, weight_decay: float, total_steps: int,
                        warmup_frac: float) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (decay on tensors of 2+ dims only) with linear warm-up, then cosine decay to 0, per step
    (`core.schedule`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr)
    return optimizer, warmup_cosine_scheduler(optimizer, total_steps, warmup_frac)


def train_loop(model: nn.Module, dataset: Dataset, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
               epochs: int, batch_size: int, lr: float, weight_decay: float, warmup_frac: float,
               generator: torch.Generator, rng: OwnGlobalRNG, desc: str, on_epoch: EpochCallback | None = None,
               workers: int | None = 0, device: torch.device | str = "cpu") -> list[float]:
    """Train for `epochs` seeded passes; `loss_fn(images, labels)` gets CPU batches (pinned for a GPU `device`),
    read by `workers` DataLoader processes (`core.reading`). Returns mean loss per epoch.

    `generator` orders the batches; `loss_fn` (the forward pass) runs with `rng` as torch's global generators.
    """
    if len(dataset) == 0:
        raise SoupError(f"{desc}: the training split is empty; give it some images")
    steps_per_epoch = math.ceil(len(dataset) / batch_size)
    optimizer, schedule = adamw_warmup_cosine(model, lr=lr, weight_decay=weight_decay,
                                              total_steps=epochs * steps_per_epoch, warmup_frac=warmup_frac)
    model.train()
    history = []
    for epoch in tqdm(range(epochs), desc=desc, unit="epoch", disable=None):
        order, total = torch.randperm(len(dataset), generator=generator), 0.0
        for images, labels in read_batches(dataset, order.split(batch_size), workers=workers, device=device):
            with rng.active():
                loss = loss_fn(images, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(labels)
        history.append(total / len(dataset))
        if on_epoch is not None:
            on_epoch(epoch, history[-1])
    return history


def finetune(base: str | Path, hparams: Mapping, splits: DataSplits, out_path: str | Path, *, member: int,
             model_params: ModelParams = ModelParams(), device: str = "cpu", workers: int | None = None,
             on_epoch: EpochCallback | None = None, extra_meta: Mapping | None = None) -> Ingredient:
    """Fine-tune the classifier the model's family starts from `base` (open_clip: a CLIP file or cached tag and its
    zero-shot head; else the family's module with the base weights) and save it as an ingredient.

    hparams: the keys of `FinetuneParams` (`precision: bf16` runs the forward passes under bfloat16 autocast).
    `workers`: DataLoader processes reading the batches (None: `core.reading.resolve_workers`); the ingredient is
    the same bytes whatever it is. The sidecar records hparams, fit_acc and select_acc
    (accuracy on the two held-out roles), the mean training loss per epoch, base_model, member
    and classifier_spec (to rebuild an empty model), plus `extra_meta`.
    """
    hp = parse_section(FinetuneParams, dict(hparams), f"hparams of member {member}")
    target = resolve_device(device)
    rng = OwnGlobalRNG(hp.seed, target)
    family = family_of(model_params)
    with rng.active():  # open_clip builds a CLIP (its text tower freed on return) and draws nothing after
        model = family.base_classifier(model_params, base, splits).to(target)
    generator = torch.Generator().manual_seed(hp.seed)

    def loss_fn(inputs: Inputs, labels: torch.Tensor) -> torch.Tensor:
        if not isinstance(inputs, Mapping):
            inputs = augment(inputs, hp.augmentation, generator)
        elif hp.augmentation != "none":
            raise SoupError(f"member {member}: augmentation {hp.augmentation!r} transforms images; the inputs are "
                            f"named tensors ({sorted(inputs)}): give augmentation 'none'")
        with autocast(hp.precision, target):
            logits = forward(model, to_device(inputs, target))
        return F.cross_entropy(logits, labels.to(target), label_smoothing=hp.label_smoothing)

    losses = train_loop(model, splits.train, loss_fn, epochs=hp.epochs, batch_size=hp.batch_size, lr=hp.lr,
                        weight_decay=hp.weight_decay, warmup_frac=hp.warmup_frac, generator=generator, rng=rng,
                        desc=f"fine-tune member {member}", on_epoch=on_epoch, workers=workers, device=target)
    meta = {
        **dict(extra_meta or {}),
        "train_loss": losses,
        "hparams": hp.model_dump(),
        **split_accuracies(predictor(model, 256, target, workers=workers, precision=hp.precision), splits,
                           roles=("fit", "select")),
        "base_model": base_model_id(model_params.arch, base),
        "member": int(member),
        "classifier_spec": family.spec(model_params, len(splits.classnames)),
    }
    return save_ingredient(model.state_dict(), out_path, meta=meta)
