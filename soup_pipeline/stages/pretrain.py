"""Stage `pretrain`: the base model every fine-tune starts from, its zero-shot classifier and its accuracy.

With `model.pretrained` unset (the embedded default), the model is pre-trained here on the pre-training split
(the tiny CLIP contrastively; a family without a zero-shot head, timm or torchvision, supervised, head included);
otherwise the given weights (a file, or a cached open_clip tag) are the base. The "zero-shot" classifier is the one
every fine-tune starts from: open_clip's zero-shot head on the image tower, else the base classifier itself.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import Params
from ..core.families import family_of
from ..core.ingredients import save_ingredient
from ..core.models import base_model_id
from ..evaluation.scoring import predictor, split_accuracies
from ..runtime.atomic import write_json
from ..runtime.devices import resolve_device
from ..runtime.kill_points import reached
from ..training.pretrain import pretrain, supervised_pretrain
from ..workspace.inputs import stage_inputs_sha256
from ..workspace.loading import load_splits, read_json
from ..workspace.paths import StagePaths, base_reference


def settings(params: Params) -> dict:
    """What the base depends on: the model, the data and the pre-training params."""
    return {"model": params.model.model_dump(), "data": params.data.model_dump(),
            "pretrain": params.pretrain.model_dump()}


def reusable(params: Params, root: str | Path) -> dict | None:
    """The base's info when it was made from these settings and stage inputs (the deps and params dvc.yaml
    declares, when there is one): exactly when `dvc repro` would not rerun `pretrain`; else None."""
    paths = StagePaths(Path(root))
    if not paths.base_info.is_file():
        return None
    info = read_json(paths.base_info)
    same = (info.get("settings") == json.loads(json.dumps(settings(params)))
            and info.get("inputs_sha256") == stage_inputs_sha256(root, "pretrain", params))
    made = paths.zero_shot_weights.is_file() and (params.model.pretrained is not None or paths.base_weights.is_file())
    return info if same and made else None


def run(params: Params, root: str | Path, *, reuse: bool = False) -> dict:
    """Pre-train when needed; write runs/base/base.json with the base id and zero-shot accuracies, and the
    zero-shot classifier (theta_0 of the merge methods) as runs/base/zero_shot.safetensors.

    With `reuse`, a base that is `reusable` is returned, not pre-trained again.
    """
    paths = StagePaths(Path(root))
    if reuse and (info := reusable(params, root)) is not None:
        return info
    inputs = stage_inputs_sha256(root, "pretrain", params)
    splits = load_splits(params)
    family = family_of(params.model)
    spec = family.spec(params.model, len(splits.classnames))
    if params.model.pretrained is None and family.zero_shot:
        pretrain(params.pretrain, splits, paths.base_weights, arch=params.model.arch,
                 on_epoch=lambda *_: reached("pretrain-epoch"))
    elif params.model.pretrained is None:
        supervised_pretrain(params.pretrain, splits, paths.base_weights, spec,
                            on_epoch=lambda *_: reached("pretrain-epoch"))
    base = base_reference(params, paths)
    device = resolve_device(params.pretrain.device)
    model = family.base_classifier(params.model, base, splits).to(device)
    zero_shot = split_accuracies(predictor(model, params.evaluate.batch_size, device), splits)
    base_id = base_model_id(params.model.arch, base)
    save_ingredient(model.state_dict(), paths.zero_shot_weights, meta={"base_model": base_id, "classifier_spec": spec})
    info = {"base": base_id, "arch": params.model.arch,
            "chance_acc": 1.0 / len(splits.classnames), "zero_shot": zero_shot, "settings": settings(params),
            "inputs_sha256": inputs}
    write_json(paths.base_info, info)
    return info
