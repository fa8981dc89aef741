"""`soup-pipeline import`: external checkpoints (e.g. the public model-soups fine-tunes) as sweep members.

Each file is read by the restricted loader (safetensors or `torch.load(weights_only=True)`), its keys mapped onto
the classifier's (`imports.key_map` and `imports.drop`, or a recognised layout such as the public model-soups
fine-tunes': `core.key_maps`), its keys and shapes checked against the classifier of `model.arch` and its tensors
for NaN and Inf, and its fit and select accuracy are measured, so the imported ingredient is souped like any
fine-tune of the sweep. `run_many` takes
the sources `soup_pipeline.core.sources` resolves (folders, globs, MLflow runs, models and experiments), checks
every checkpoint before it writes any ingredient, and records each one's lineage in its sidecar.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..config import Params
from ..core.data import DataSplits
from ..core.families import family_of
from ..core.ingredients import Ingredient, check_finite, file_sha256, read_state_file, save_ingredient
from ..core.key_maps import HEAD_BIAS, KeyMap, KeyRule, detect_layout, remap
from ..core.models import base_model_id
from ..core.portable_classifier import make_module
from ..core.sources import Checkpoint, Remote, resolve
from ..evaluation.scoring import predictor, split_accuracies
from ..runtime.atomic import write_json
from ..runtime.devices import resolve_device
from ..runtime.errors import IngredientError
from ..workspace.loading import load_splits
from ..workspace.paths import StagePaths, base_reference


def run(params: Params, root: str | Path, source: str | Path, member: int, *, strip_prefix: str = "",
        base_model: str = "external") -> Ingredient:
    """Write runs/imported/member-MEMBER.safetensors from the file `source`, with its measured fit and select
    accuracy and its lineage."""
    splits = load_splits(params)
    checkpoint = Checkpoint(uri=str(Path(source).resolve()), path=Path(source))
    return _import(params, root, splits, checkpoint, member, key_map=key_map_of(params), strip_prefix=strip_prefix,
                   base_model=base_model)


def run_many(params: Params, root: str | Path, sources: Sequence[str], *, first_member: int, strip_prefix: str = "",
             base_model: str = "external", remote: Remote | None = None) -> list[Ingredient]:
    """Import every checkpoint the sources name (`soup_pipeline.core.sources`) as members first_member,
    first_member + 1, ...

    All are resolved and checked before the first ingredient is written; MLflow downloads go to a temporary
    folder under runs/.downloads/, removed afterwards."""
    downloads = StagePaths(Path(root)).runs / ".downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    key_map = key_map_of(params)
    with tempfile.TemporaryDirectory(prefix="import-", dir=downloads) as folder:
        checkpoints = resolve(sources, folder, remote=remote)
        splits = load_splits(params)
        for checkpoint in checkpoints:
            checked_state(_spec(params, splits), checkpoint.path, key_map=key_map, strip_prefix=strip_prefix)
        return [_import(params, root, splits, checkpoint, first_member + offset, key_map=key_map,
                        strip_prefix=strip_prefix, base_model=base_model)
                for offset, checkpoint in enumerate(checkpoints)]


def key_map_of(params: Params) -> KeyMap:
    """`imports.key_map` and `imports.drop` as a KeyMap (empty: a checkpoint's known layout is recognised)."""
    rules = tuple(KeyRule(**rule.model_dump(exclude_none=True)) for rule in params.imports.key_map)
    return KeyMap(rules=rules, drop=tuple(params.imports.drop))


def _spec(params: Params, splits: DataSplits) -> dict:
    """The classifier spec of the model's family and `model.arch` for the data's classes, which checkpoints must fit."""
    return family_of(params.model).spec(params.model, len(splits.classnames))


def checked_state(spec: Mapping, path: str | Path, *, key_map: KeyMap = KeyMap(),
                  strip_prefix: str = "") -> tuple[dict[str, torch.Tensor], dict]:
    """The checkpoint's state dict, read without pickle, its keys mapped (`key_map`, else its recognised layout:
    `core.key_maps`), and the classifier spec it fits: `spec`, with a head bias where the checkpoint's head has one.
    Its keys and shapes must fit that classifier and its floating tensors be finite."""
    fits = f"{spec['arch']} with {spec['num_classes']} classes"
    raw = read_state_file(path, strip_prefix=strip_prefix)
    clip_classifier = "builder_kwargs" not in spec  # open_clip's classifier, whose head may take a bias
    expected = dict(expected_shapes(json.dumps({**spec, "head_bias": True} if clip_classifier else spec,
                                               sort_keys=True)))
    state = remap(raw, key_map or detect_layout(list(raw)), list(expected), source=str(path))
    spec = {key: value for key, value in spec.items() if key != "head_bias"}
    if clip_classifier and HEAD_BIAS in state:
        spec["head_bias"] = True
    elif clip_classifier:
        expected.pop(HEAD_BIAS)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise IngredientError(f"{path} does not fit {fits}: missing {missing[:5]}; map its keys (imports.key_map, "
                              "--strip-prefix) or fix model.arch")
    for key, tensor in state.items():
        if tensor.shape != expected[key]:
            raise IngredientError(f"{path}: tensor '{key}' has shape {list(tensor.shape)}, but {fits} needs "
                                  f"{list(expected[key])}; fix model.arch or the number of classes")
    check_finite(state, str(path))
    return state, spec


@functools.lru_cache(maxsize=4)
def expected_shapes(spec_json: str) -> tuple[tuple[str, torch.Size], ...]:
    """The keys and shapes of the module a spec (as sorted JSON) builds: built once per spec, not per checkpoint."""
    return tuple((key, tensor.shape) for key, tensor in make_module(json.loads(spec_json)).state_dict().items())


def _import(params: Params, root: str | Path, splits: DataSplits, checkpoint: Checkpoint, member: int, *,
            key_map: KeyMap, strip_prefix: str, base_model: str) -> Ingredient:
    """Write member `member` from one checkpoint, checked, with its accuracies and its lineage."""
    state, spec = checked_state(_spec(params, splits), checkpoint.path, key_map=key_map, strip_prefix=strip_prefix)
    source_sha256 = file_sha256(checkpoint.path)
    model = make_module(spec)
    model.load_state_dict(state)
    device = resolve_device(params.soup.device)
    accuracies = split_accuracies(predictor(model.to(device), params.evaluate.batch_size, device), splits,
                                  roles=("fit", "select"))
    lineage = {"imported_from": checkpoint.uri, "source_uri": checkpoint.uri, "source_sha256": source_sha256,
               **({"run_id": checkpoint.run_id} if checkpoint.run_id else {})}
    meta = {"hparams": {}, **accuracies, "base_model": base_model, "member": member, "classifier_spec": spec, **lineage}
    return save_ingredient(state, StagePaths(Path(root)).imported(member), meta=meta)


def pipeline_base(params: Params, root: str | Path) -> str:
    """The id of the pipeline's base (`model.pretrained`, or the base it pre-trains), which imported checkpoints are
    declared to be fine-tuned from, so that they soup with the sweep's fine-tunes."""
    base = base_reference(params, StagePaths(Path(root)))
    if params.model.pretrained is None and not Path(base).is_file():
        raise IngredientError(f"the pipeline's base {base} is missing; pre-train it first (`dvc repro pretrain`)")
    return base_model_id(params.model.arch, base)


def run_params(params: Params, root: str | Path, *, remote: Remote | None = None) -> list[Ingredient]:
    """Stage `import`: runs/imported/ holds exactly the checkpoints `imports.sources` name (members
    imports.first_member, ...), declared fine-tunes of the pipeline's base, and runs/imported/lineage.json where
    each came from; an empty list imports nothing."""
    paths = StagePaths(Path(root))
    settings = params.imports
    ingredients = run_many(params, root, settings.sources, first_member=settings.first_member,
                           strip_prefix=settings.strip_prefix, base_model=pipeline_base(params, root),
                           remote=remote)
    kept = {i.path for i in ingredients}
    for stale in paths.imported_ingredients():  # a source dropped from the list leaves no member behind
        if stale not in kept:
            stale.unlink()
            stale.with_suffix(".json").unlink(missing_ok=True)
    write_json(paths.imported_dir / "lineage.json",
               [{key: i.meta.get(key) for key in ("member", "source_uri", "run_id", "source_sha256", "sha256")}
                for i in ingredients])
    return ingredients
