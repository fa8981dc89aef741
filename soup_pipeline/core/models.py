"""open_clip models: the shipped tiny config, restricted weight loading, the zero-shot image classifier.

With `portable_classifier.py` (the classifier itself, self-contained so that it travels with the registered
model), the only module that imports open_clip. Weights are read with safetensors
or `torch.load(weights_only=True)`, never plain pickle; open_clip tags are resolved from the local
cache only, nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import open_clip
import torch
import torch.nn.functional as F
from huggingface_hub import hf_hub_download
from open_clip.pretrained import HF_WEIGHTS_NAME, _get_safe_alternatives
from torch import nn

from ..runtime.errors import SoupError
from .ingredients import file_sha256, read_state_file
from .portable_classifier import ImageClassifier

TINY_ARCH = "soup-tiny-vit"
CONFIG_DIR = Path(__file__).parent / "configs"

if TINY_ARCH not in open_clip.list_models():
    open_clip.add_model_config(CONFIG_DIR)


@dataclass
class LoadedClip:
    """An open_clip CLIP model with its image transforms (PIL in, tensor out) and tokenizer."""

    model: nn.Module
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable
    arch: str


def model_config(arch: str) -> dict:
    """The open_clip config dict of an architecture; a clear error for an unknown name."""
    config = open_clip.get_model_config(arch)
    if config is None:
        raise SoupError(
            f"unknown open_clip architecture {arch!r}; use one of open_clip.list_models(), "
            f"e.g. {TINY_ARCH!r} or 'ViT-B-32'"
        )
    return config


def _cached_tag_file(arch: str, tag: str, cache_dir: str | None) -> tuple[Path, dict]:
    """The local weights file of an open_clip tag, from the cache only, and the tag's config."""
    tag_cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not tag_cfg:
        raise SoupError(
            f"pretrained {tag!r} is neither an existing file nor an open_clip tag of {arch!r} "
            f"(tags: {open_clip.list_pretrained_tags_by_model(arch)}); give a local weights file or one of those tags"
        )
    if "file" in tag_cfg:
        return Path(tag_cfg["file"]), tag_cfg
    repo_id, filename = os.path.split(tag_cfg.get("hf_hub", ""))
    filename = filename or HF_WEIGHTS_NAME
    for name in [*_get_safe_alternatives(filename), filename]:
        try:
            return Path(hf_hub_download(repo_id, name, cache_dir=cache_dir, local_files_only=True)), tag_cfg
        except Exception:  # not cached under this name; try the next
            continue
    raise SoupError(
        f"open_clip tag {arch}/{tag} is not in the local cache ({cache_dir or 'the Hugging Face default cache'}) and "
        f"nothing is downloaded here; fetch hf-hub {repo_id} into that cache on a connected machine, "
        "or pass a weights file path"
    )


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a weights file into a model strictly, naming missing and unexpected keys on mismatch."""
    state = read_state_file(path, strip_prefix="module.")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SoupError(
            f"{path} does not fit the model: missing keys {sorted(missing)[:5]}, "
            f"unexpected keys {sorted(unexpected)[:5]}; "
            "check that model.arch is the architecture these weights were trained with"
        )


@contextlib.contextmanager
def _quiet_random_init_warning():
    """Hide open_clip's "initialized randomly" warning: the caller asked for random weights or fills them itself."""
    def keep(record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def load_clip(arch: str, pretrained: str | Path | None = None, *, cache_dir: str | None = None) -> LoadedClip:
    """An open_clip model: random (None), from a weights file, or from a cached open_clip tag."""
    config = model_config(arch)
    weights, overrides = None, {}
    if pretrained is not None and Path(pretrained).is_file():
        weights = Path(pretrained)
    elif pretrained is not None:
        weights, tag_cfg = _cached_tag_file(arch, str(pretrained), cache_dir)
        if tag_cfg.get("quick_gelu", False) != config.get("quick_gelu", False):
            raise SoupError(
                f"tag {pretrained!r} was trained with quick_gelu={tag_cfg.get('quick_gelu', False)} but {arch!r} "
                f"uses quick_gelu={config.get('quick_gelu', False)}; "
                f"use the matching architecture (e.g. '{arch}-quickgelu')"
            )
        overrides = {f"image_{key}": tag_cfg[key] for key in ("mean", "std", "interpolation", "resize_mode")
                     if key in tag_cfg}
    with _quiet_random_init_warning():
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(arch, pretrained=None,
                                                                                        **overrides)
    if weights is not None:
        load_weights(model, weights)
    return LoadedClip(model, preprocess_train, preprocess_val, open_clip.get_tokenizer(arch), arch)


def base_model_id(arch: str, pretrained: str | Path) -> str:
    """A stable id of a pre-trained model: arch plus the weights file's hash, or arch/tag."""
    if Path(pretrained).is_file():
        return f"{arch}@sha256:{file_sha256(pretrained)[:16]}"
    return f"{arch}/{pretrained}"


def tokenize_prompts(tokenizer: Callable, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """Token ids of every (class, template) caption: [C, T, context_length]."""
    if not classnames or not templates:
        raise SoupError("no class names or no prompt templates; give at least one of each")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise SoupError(f"prompt templates {bad} must each hold exactly one {{}} for the class name")
    return torch.stack([tokenizer([t.format(name) for t in templates]) for name in classnames])


@torch.no_grad()
def zero_shot_head(clip_model: nn.Module, tokenizer: Callable, classnames: Sequence[str],
                   templates: Sequence[str]) -> torch.Tensor:
    """[C, D]: per class, the text embeddings of all templates, L2-normalised, averaged, re-normalised."""
    tokens = tokenize_prompts(tokenizer, classnames, templates)
    device = next(clip_model.parameters()).device
    was_training = clip_model.training
    clip_model.eval()
    rows = [F.normalize(F.normalize(clip_model.encode_text(t.to(device)), dim=-1).mean(0), dim=0) for t in tokens]
    clip_model.train(was_training)
    return torch.stack(rows).cpu()


def classifier_from_clip(clip_model: nn.Module, head: torch.Tensor) -> ImageClassifier:
    """The classifier on a CLIP model's image tower, with s = the model's exp(logit_scale)."""
    return ImageClassifier(clip_model.visual, head, float(clip_model.logit_scale.detach().exp()))


@functools.lru_cache(maxsize=8)
def preprocess_config(arch: str) -> dict:
    """open_clip's evaluation preprocessing of an architecture (size, mean, std, interpolation, resize mode, fill)."""
    with _quiet_random_init_warning():
        model = open_clip.create_model(arch, pretrained=None)
    return dict(open_clip.get_model_preprocess_cfg(model))


def classifier_spec(arch: str, num_classes: int, *, head_bias: bool = False) -> dict:
    """A JSON-able description from which `classifier_from_spec` builds the same (untrained) classifier (with a bias
    on its head when `head_bias`)."""
    return {"arch": arch, "num_classes": int(num_classes), "model_config": model_config(arch),
            **({"head_bias": True} if head_bias else {})}
