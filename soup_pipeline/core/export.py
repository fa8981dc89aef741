"""The soup outside this package (`soup-pipeline export`): two folders, each loaded without soup-pipeline.

`open_clip/` is a CLIP model that `open_clip.create_model_and_transforms("local-dir:DIR/open_clip")` loads: the
soup's image tower with the base CLIP's text tower and logit scale (so zero-shot classification with any class
names still works) and the preprocessing the soup was evaluated with. `classifier/` is the classifier itself
(weights.safetensors, model_spec.json) with a copy of `portable_classifier.py` that rebuilds it with torch and
open_clip alone. open_clip is reached through `models.py` only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

from ..runtime.errors import SoupError
from . import models, portable_classifier

OPEN_CLIP_DIR, CLASSIFIER_DIR = "open_clip", "classifier"  # the two folders under the export's DIR
OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS = "open_clip_config.json", "open_clip_model.safetensors"  # what local-dir: reads
VISUAL = "visual."  # the image tower's keys, in the classifier and in the CLIP model alike


def check_exportable(spec: Mapping) -> None:
    """Refuse a spec that is not this package's open_clip classifier with its preprocessing and base model."""
    if spec.get("builder") not in (None, portable_classifier.BUILTIN_BUILDER):
        raise SoupError(f"the model is built by {spec['builder']!r}, not {portable_classifier.BUILTIN_BUILDER!r}; "
                        "only the open_clip classifier can be exported")
    missing = [key for key in ("arch", "model_config", "preprocess", "base_model") if not spec.get(key)]
    if missing:
        raise SoupError(f"the model's spec lacks {missing}; register it again (or rebuild the soup) with this version "
                        "of soup-pipeline, which records them")


def check_base(spec: Mapping, base: str | Path) -> None:
    """Refuse a base that is not the pre-trained CLIP the soup's fine-tunes started from (by `base_model_id`)."""
    given = models.base_model_id(spec["arch"], base)
    if given != spec["base_model"]:
        raise SoupError(f"the base {base} is {given}, but the soup was fine-tuned from {spec['base_model']}; pass "
                        "--base with the weights of that model (its text tower is what zero-shot classification needs)")


def clip_state_dict(classifier_state: Mapping[str, torch.Tensor],
                    base_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base CLIP's state dict with its image tower replaced by the classifier's (in the base's dtypes)."""
    tower = {key: tensor for key, tensor in classifier_state.items() if key.startswith(VISUAL)}
    base_tower = {key: tensor.shape for key, tensor in base_state.items() if key.startswith(VISUAL)}
    wrong = sorted(key for key in base_tower.keys() | tower.keys()
                   if key not in tower or base_tower.get(key) != tower[key].shape)
    if wrong:
        raise SoupError(f"the soup's image tower does not fit the base CLIP (keys missing or of another shape: "
                        f"{wrong[:5]}); check that both are the same architecture")
    return {key: tower[key].to(tensor.dtype) if key in tower else tensor for key, tensor in base_state.items()}


def write_open_clip(folder: Path, clip_state: Mapping[str, torch.Tensor], spec: Mapping) -> Path:
    """`folder` as open_clip's local-dir: the model and preprocess config, and the CLIP weights."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": spec["model_config"], "preprocess_cfg": dict(spec["preprocess"])}
    (folder / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({key: tensor.detach().cpu().contiguous() for key, tensor in clip_state.items()},
              str(folder / OPEN_CLIP_WEIGHTS))
    return folder


def write_classifier(folder: Path, classifier_state: Mapping[str, torch.Tensor], spec: Mapping) -> Path:
    """`folder` as the classifier's weights.safetensors and model_spec.json, with portable_classifier.py to load
    them."""
    folder.mkdir(parents=True, exist_ok=True)
    portable_classifier.write_model_files(classifier_state, {**spec, "builder": portable_classifier.BUILTIN_BUILDER},
                                          folder)
    shutil.copyfile(portable_classifier.__file__, folder / "portable_classifier.py")
    return folder


def export(classifier_state: Mapping[str, torch.Tensor], spec: Mapping, out: str | Path, base: str | Path, *,
           cache_dir: str | None = None) -> dict[str, Path]:
    """Write OUT/open_clip and OUT/classifier for the classifier `classifier_state` described by `spec` (the
    registered model's spec), whose fine-tunes started from `base` (a weights file or a cached open_clip tag).
    Everything is checked before anything is written. Returns both folders by name."""
    check_exportable(spec)
    check_base(spec, base)
    base_clip = models.load_clip(spec["arch"], base, cache_dir=cache_dir).model
    clip_state = clip_state_dict(classifier_state, base_clip.state_dict())
    out = Path(out)
    return {OPEN_CLIP_DIR: write_open_clip(out / OPEN_CLIP_DIR, clip_state, spec),
            CLASSIFIER_DIR: write_classifier(out / CLASSIFIER_DIR, classifier_state, spec)}
