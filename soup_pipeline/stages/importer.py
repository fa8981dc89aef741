"""`soup-pipeline import`: an external checkpoint (e.g. one of the public model-soups fine-tunes) as a sweep member.

The file is read by the restricted loader (safetensors or `torch.load(weights_only=True)`), its keys
are checked against the classifier of `model.arch`, and its fit and select accuracy are measured, so the
imported ingredient is souped like any fine-tune of the sweep.
"""

from __future__ import annotations

from pathlib import Path

from ..config import Params
from ..errors import IngredientError
from ..evaluate import predictor, split_accuracies
from ..ingredients import Ingredient, read_state_file, save_ingredient
from ..models import classifier_from_spec, classifier_spec
from ..soups.base import resolve_device
from ..layout import Layout, load_splits


def run(params: Params, root: str | Path, source: str | Path, member: int, *, strip_prefix: str = "",
        base_model: str = "external") -> Ingredient:
    """Write runs/ingredients/member-MEMBER.safetensors from `source`, with its measured fit and select accuracy."""
    splits = load_splits(params)
    spec = classifier_spec(params.model.arch, len(splits.classnames))
    model = classifier_from_spec(spec)
    state = read_state_file(source, strip_prefix=strip_prefix)
    missing, extra = sorted(set(model.state_dict()) - set(state)), sorted(set(state) - set(model.state_dict()))
    if missing or extra:
        raise IngredientError(f"{source} does not fit {params.model.arch} with {len(splits.classnames)} classes: "
                              f"missing {missing[:5]}, unexpected {extra[:5]}; map its keys (--strip-prefix) or fix model.arch")
    model.load_state_dict(state)
    device = resolve_device(params.soup.device)
    accuracies = split_accuracies(predictor(model.to(device), params.evaluate.batch_size, device), splits,
                                  roles=("fit", "select"))
    meta = {"hparams": {}, **accuracies, "base_model": base_model, "member": member,
            "classifier_spec": spec, "imported_from": str(source)}
    return save_ingredient(state, Layout(Path(root)).ingredient(member), meta=meta)
