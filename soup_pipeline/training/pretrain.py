"""Pre-training from scratch on the pre-training split: contrastive for a CLIP model (the embedded default),
supervised (cross-entropy, head included) for the families without a zero-shot head.

Captions are the prompt templates with the class name inserted, one drawn per image per step.
Images of the same class are all positives of each other's captions, so the loss does not
punish a caption that appears twice in a batch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ..core.data import DataSplits
from ..core.models import TINY_ARCH, load_clip, tokenize_prompts
from ..core.portable_classifier import make_module
from ..core.settings import PretrainParams
from ..runtime.atomic import atomic_path
from ..runtime.devices import resolve_device
from ..runtime.errors import SoupError
from ..runtime.randomness import OwnGlobalRNG
from .augment import augment
from .finetune import EpochCallback, train_loop

LOGGER = logging.getLogger(__name__)
MAX_LOGIT_SCALE = 100.0  # the cap CLIP puts on exp(logit_scale)


def contrastive_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy of image-caption logits [N, N]; targets spread over same-class pairs."""
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def pretrain(params: PretrainParams, splits: DataSplits, out_path: str | Path, *, arch: str = TINY_ARCH,
             on_epoch: EpochCallback | None = None) -> Path:
    """Pre-train a randomly initialised `arch` on `splits.pretrain`; save its full state dict (safetensors)."""
    _check_pretrain_split(splits)
    device = resolve_device(params.device)
    rng = OwnGlobalRNG(params.seed, device)
    with rng.active():  # the random initialisation
        clip = load_clip(arch)
    model = clip.model.to(device)
    tokens = tokenize_prompts(clip.tokenizer, splits.classnames, splits.templates)
    generator = torch.Generator().manual_seed(params.seed)

    def loss_fn(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        captions = tokens[labels, torch.randint(tokens.shape[1], (len(labels),), generator=generator)]
        images = augment(images, params.augmentation, generator).to(device)
        image_features = F.normalize(model.encode_image(images), dim=-1)
        text_features = F.normalize(model.encode_text(captions.to(device)), dim=-1)
        scale = model.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
        return contrastive_loss(scale * image_features @ text_features.T, labels.to(device))

    train_loop(model, splits.pretrain, loss_fn, epochs=params.epochs, batch_size=params.batch_size, lr=params.lr,
               weight_decay=params.weight_decay, warmup_frac=params.warmup_frac, generator=generator, rng=rng,
               desc="pre-train", on_epoch=on_epoch)
    return save_base(model, out_path, {"arch": arch, **params.model_dump()})


def supervised_pretrain(params: PretrainParams, splits: DataSplits, out_path: str | Path, spec: dict, *,
                        on_epoch: EpochCallback | None = None) -> Path:
    """Pre-train a randomly initialised module of a family without a zero-shot head (timm, torchvision, a team's
    own: `spec` as its family writes it) on `splits.pretrain`, head included, with cross-entropy; save its state.
    Data without a pre-training split (an image folder) get the seeded random initialisation as their base."""
    device = resolve_device(params.device)
    rng = OwnGlobalRNG(params.seed, device)
    with rng.active():  # the random initialisation
        model = make_module(spec).to(device)
    if splits.pretrain is None or len(splits.pretrain) == 0:
        LOGGER.warning("no pre-training split: the base of %s is its random initialisation (pretrain.seed %d); give "
                       "model.pretrained (a state dict of the module) for a pre-trained one", spec["arch"], params.seed)
        return save_base(model, out_path, {"spec": spec, "seed": params.seed, "epochs": 0})
    generator = torch.Generator().manual_seed(params.seed)

    def loss_fn(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(augment(images, params.augmentation, generator).to(device)), labels.to(device))

    train_loop(model, splits.pretrain, loss_fn, epochs=params.epochs, batch_size=params.batch_size, lr=params.lr,
               weight_decay=params.weight_decay, warmup_frac=params.warmup_frac, generator=generator, rng=rng,
               desc="pre-train", on_epoch=on_epoch)
    return save_base(model, out_path, {"spec": spec, **params.model_dump()})


def _check_pretrain_split(splits: DataSplits) -> None:
    if splits.pretrain is None or len(splits.pretrain) == 0:
        raise SoupError("no pre-training split; set data.pretrain_size > 0, "
                        "or give model.pretrained to skip pre-training")


def save_base(model: torch.nn.Module, out_path: str | Path, made_by: dict) -> Path:
    """The pre-trained model's state dict as safetensors, with how it was made as its one metadata key (safetensors
    writes several in no fixed order, and the file's hash is the base model id)."""
    state = {key: tensor.detach().cpu().contiguous() for key, tensor in model.state_dict().items()}
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        save_file(state, str(tmp), metadata={"pretrain": json.dumps(made_by, sort_keys=True)})
    return out_path
