"""Stage `finetune@K`: one sweep member, fine-tuned from the base into an ingredient."""

from __future__ import annotations

from pathlib import Path

from ..config import Params
from ..core.ingredients import Ingredient, read_ingredient
from ..core.models import base_model_id
from ..runtime.kill_points import reached
from ..runtime.placement import placed_device, visible_gpus
from ..training.finetune import finetune
from ..training.sweep import sample_hparams
from ..workspace.inputs import stage_inputs_sha256
from ..workspace.loading import load_splits
from ..workspace.paths import StagePaths, base_reference


def is_done(ingredient_file: Path, hparams: dict, base_id: str, inputs: str | None) -> bool:
    """True when the file exists and its sidecar says it was made from these hparams, this base and
    these stage inputs (the deps and params dvc.yaml declares; None outside a DVC project)."""
    if not ingredient_file.is_file():
        return False
    meta = read_ingredient(ingredient_file).meta
    return meta.get("hparams") == hparams and meta.get("base_model") == base_id and meta.get("inputs_sha256") == inputs


def up_to_date(params: Params, root: str | Path, member: int) -> bool:
    """True when member `member`'s ingredient was made from its hparams, this base and these stage inputs:
    exactly when `dvc repro` would not rerun `finetune@member`."""
    paths = StagePaths(Path(root))
    base_id = base_model_id(params.model.arch, base_reference(params, paths))
    return is_done(paths.ingredient(member), sample_hparams(params.sweep, member), base_id,
                   stage_inputs_sha256(root, "finetune", params))


def run(params: Params, root: str | Path, member: int, *, reuse: bool = False) -> Ingredient:
    """Fine-tune member `member` on its device (`runtime.placement`: GPU member mod count on CUDA); with `reuse`, a
    finished member that is `up_to_date` is returned, not recomputed."""
    paths = StagePaths(Path(root))
    target = paths.ingredient(member)
    if reuse and up_to_date(params, root, member):
        return read_ingredient(target)
    base = base_reference(params, paths)
    hparams = sample_hparams(params.sweep, member)
    inputs = stage_inputs_sha256(root, "finetune", params)
    device = placed_device(params.sweep.device, member, visible_gpus())
    ingredient = finetune(base, hparams, load_splits(params), target, member=member, model_params=params.model,
                          device=device, workers=params.sweep.workers, extra_meta={"inputs_sha256": inputs})
    reached("finetune-saved", member)
    return ingredient
