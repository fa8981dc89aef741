"""Stage `finetune@K`: one sweep member, fine-tuned from the base into an ingredient."""

from __future__ import annotations

from pathlib import Path

from ..config import Params
from ..finetune import finetune
from ..ingredients import Ingredient, read_ingredient
from ..models import base_model_id
from ..sweep import sample_hparams
from ..layout import Layout, base_reference, load_splits


def is_done(ingredient_file: Path, hparams: dict, base_id: str) -> bool:
    """True when the file exists and its sidecar says it was made from these hparams and this base."""
    if not ingredient_file.is_file():
        return False
    meta = read_ingredient(ingredient_file).meta
    return meta.get("hparams") == hparams and meta.get("base_model") == base_id


def run(params: Params, root: str | Path, member: int, *, reuse: bool = False) -> Ingredient:
    """Fine-tune member `member`; with `reuse`, a finished identical member is returned, not recomputed."""
    layout = Layout(Path(root))
    base = base_reference(params, layout)
    hparams = sample_hparams(params.sweep, member)
    target = layout.ingredient(member)
    if reuse and is_done(target, hparams, base_model_id(params.model.arch, base)):
        return read_ingredient(target)
    return finetune(base, hparams, load_splits(params), target, member=member, arch=params.model.arch,
                    cache_dir=params.model.cache_dir, device=params.sweep.device)
