"""Building blocks for a team's own Prefect flows: souping as tasks and one subflow, with no params file and no
runs/ folder: checkpoints, data sets and methods in, the evaluation table and the registered version out.

    from soup_pipeline.prefect import soup_subflow
    summary = soup_subflow(checkpoints=paths, arch="ViT-B-32", num_classes=10, fit=fit, select=select, test=test,
                           methods={"greedy": {}, "mehl_soup_auto": {}}, register="mehl_soup_auto",
                           registered_model="my-soup", workdir="soup-work")

Checkpoints are state dicts of the classifier the model family builds for `arch` and `num_classes` (`family`:
open_clip's image tower and head by default, or timm, torchvision, "package.module:function"; `model_kwargs` its
constructor's arguments), as safetensors or `torch.load(weights_only=True)` files, never pickle; data sets yield
(image tensor, label). Fit data fit, select data choose (greedy soup's order uses fit accuracy, the registry's
champion moves on select accuracy), test data only report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from prefect import flow, task
from prefect.cache_policies import NONE
from torch.utils.data import Dataset

from ..core.data import DataSplits
from ..core.families import family_of
from ..core.ingredients import Ingredient, IngredientStore, file_sha256, read_ingredient, save_ingredient
from ..core.portable_classifier import make_module
from ..core.settings import ModelParams, Precision
from ..evaluation.scoring import accuracies, predictor, split_correctness
from ..evaluation.selection import BEST_INDIVIDUAL, compared_rows
from ..runtime.devices import resolve_device
from ..soups import Objective, SoupResult, get_spec, method_params, run_method
from ..soups.engine.base import best_individual, model_at
from ..stages.importer import checked_state
from ..tracking.pipeline_registration import register_external_soup


def _splits(fit: Dataset, select: Dataset, test: Dataset | None) -> DataSplits:
    return DataSplits(train=fit, fit=fit, select=select, test=test, classnames=(), templates=())


@task(persist_result=False, cache_policy=NONE)  # inputs are data sets and models: nothing to cache on
def ingredient_task(checkpoint: str, member: int, spec: dict, fit: Dataset, select: Dataset, folder: str,
                    batch_size: int = 256, device: str = "cpu", workers: int | None = 0,
                    precision: Precision = "float32") -> Ingredient:
    """A checkpoint as ingredient `member` under `folder`: read without pickle, keys, shapes and finiteness checked
    as `soup-pipeline import` checks them, fit and select accuracy measured (data read by `workers` processes,
    forward passes in `precision`); its sidecar records the checkpoint's path and SHA-256."""
    state, spec = checked_state(spec, checkpoint)  # the spec gains a head bias where the checkpoint's head has one
    model = make_module(spec)
    model.load_state_dict(state)
    target = resolve_device(device)
    predict = predictor(model.to(target), batch_size, target, workers=workers, precision=precision)
    scores = accuracies(split_correctness(predict, _splits(fit, select, None), roles=("fit", "select")))
    meta = {"hparams": {}, **scores, "member": member, "classifier_spec": spec,
            "source_uri": str(Path(checkpoint).resolve()), "source_sha256": file_sha256(checkpoint)}
    return save_ingredient(state, Path(folder) / f"member-{member}.safetensors", meta=meta)


@task(persist_result=False, cache_policy=NONE)  # inputs are data sets and models: nothing to cache on
def soup_task(method: str, settings: Mapping[str, Any], ingredients: Sequence[str], objective: Objective,
              folder: str, anchor: Mapping[str, torch.Tensor] | None = None,
              built: Mapping[str, SoupResult] | None = None) -> SoupResult:
    """Build one soup (a method of `soup_pipeline.soups` with its own parameters) and write its weights; a merge
    method measures the ingredients from `anchor`, the pre-trained model's state dict, and a refining one
    (wise_ft_soup) takes the soup its `soup` parameter names from `built`."""
    spec, params = get_spec(method), method_params(method, **settings)
    options = {"anchor": anchor} if spec.anchored else {}
    if spec.refines:
        options["soup"] = (built or {}).get(params.soup)
    result = run_method(method, IngredientStore(list(ingredients)), objective, params, **options)
    save_ingredient(result.state_dict, Path(folder) / method / "soup.safetensors", meta={"method": method})
    return result


@task(persist_result=False, cache_policy=NONE)  # inputs are data sets and models: nothing to cache on
def evaluate_task(results: Mapping[str, SoupResult], ingredients: Sequence[str], objective: Objective,
                  splits: DataSplits, batch_size: int = 256, device: str = "cpu", seed: int = 0,
                  resamples: int = 2000, workers: int | None = 0, precision: Precision = "float32") -> list[dict]:
    """Rows: the best individual (by fit accuracy) and each soup, with fit, select and test accuracy and the
    paired comparison against greedy soup on the test set when greedy soup was built (data read by `workers`
    processes, forward passes in `precision`)."""
    target = resolve_device(device)
    store = IngredientStore(list(ingredients))
    best = best_individual(store)
    states = {BEST_INDIVIDUAL: store.load(best), **{m: r.state_dict for m, r in results.items()}}
    correct = {name: split_correctness(predictor(model_at(objective, state, target), batch_size, target,
                                                 workers=workers, precision=precision), splits)
               for name, state in states.items()}
    return compared_rows(correct, seed=seed, resamples=resamples)


@flow(name="soup", validate_parameters=False)
def soup_subflow(checkpoints: Sequence[str], *, arch: str, num_classes: int, fit: Dataset, select: Dataset,
                 test: Dataset, methods: Mapping[str, Mapping[str, Any]] | None = None, workdir: str = "soup-work",
                 register: str | None = None, registered_model: str = "soup", experiment: str = "soup-pipeline",
                 batch_size: int = 128, device: str = "cpu", pretrained: str | None = None,
                 classnames: Sequence[str] | None = None, preprocess: Mapping[str, Any] | None = None,
                 family: str = "open_clip", model_kwargs: Mapping[str, Any] | None = None, workers: int | None = None,
                 precision: Precision = "float32") -> dict:
    """Soup `checkpoints` with each of `methods` (name -> its parameters; default uniform, greedy and
    mehl_soup_auto), evaluate them, and with `register` (a method name) register that soup in the MLflow registry
    (MLFLOW_TRACKING_URI) with its ingredients' sources and hashes; return the rows, the registered version and
    the soups' files. The merge methods (task arithmetic, TIES, DARE, Model Stock, WiSE-FT) measure the
    checkpoints from `pretrained`: a checkpoint of the model they were fine-tuned from, with their keys;
    `wise_ft_soup` interpolates a soup listed before it in `methods` with that model. The registered model answers
    with `classnames` (default the class indices) and preprocesses the images it is sent with `preprocess` (open_clip's
    preprocess config keys; default the family's own for the data's image size): give the one your data sets'
    tensors were made with. `workers` DataLoader processes read the data sets for scoring (None: none for tensors in
    memory, half the cores up to 4 for files on 4+ cores; the same results as without), and `precision: "bf16"` scores
    under bfloat16 autocast (a hyperplane soup's inner steps take `precision` among its own parameters)."""
    methods = dict(methods or {"uniform": {}, "greedy": {}, "mehl_soup_auto": {}})
    if register is not None and register not in methods:
        raise ValueError(f"register={register!r} is not among the methods {list(methods)}; add it to `methods`")
    if register is not None and isinstance(select[0][0], Mapping):
        raise ValueError(f"register={register!r}: the registered model answers images, and these examples are named "
                         f"tensors ({sorted(select[0][0])}); soup and evaluate the text classifier without register=")
    anchored = [method for method in methods if get_spec(method).anchored]
    if anchored and pretrained is None:
        raise ValueError(f"{anchored} measure the checkpoints from the pre-trained model: give pretrained= (a "
                         "checkpoint of the model they were fine-tuned from, with its classification head)")
    model = ModelParams(family=family, arch=arch, kwargs=dict(model_kwargs or {}))
    spec = family_of(model).spec(model, num_classes)
    anchor = checked_state(spec, pretrained)[0] if anchored else None
    work = Path(workdir).resolve()
    ingredients = [ingredient_task(str(c), k, spec, fit, select, str(work / "ingredients"), device=device,
                                   workers=workers, precision=precision).path
                   for k, c in enumerate(checkpoints)]
    # as checked: with a head bias where the checkpoints have one
    spec = read_ingredient(ingredients[0]).meta["classifier_spec"]
    objective = Objective(model_factory=lambda: make_module(spec), fit=fit, select=select, batch_size=batch_size)
    results: dict[str, SoupResult] = {}
    for m, settings in methods.items():  # in order: a refined soup (wise_ft_soup's `soup`) is listed before it
        results[m] = soup_task(m, {"device": device, "batch_size": batch_size, **settings}, ingredients, objective,
                               str(work / "soups"), anchor, results)
    rows = evaluate_task(results, ingredients, objective, _splits(fit, select, test), device=device, workers=workers,
                         precision=precision)
    version = None
    if register is not None:
        row = next(r for r in rows if r["method"] == register)
        version = register_external_soup(results[register], row, spec, work / "soups" / register / "soup.safetensors",
                                         ingredients, name=registered_model, experiment=experiment,
                                         example=torch.as_tensor(select[0][0]),
                                         classnames=classnames or [str(c) for c in range(num_classes)],
                                         preprocess=preprocess or family_of(model).preprocess(
                                             model, int(torch.as_tensor(select[0][0]).shape[-1])))
    return {"rows": rows, "registered_version": version,
            "soups": {m: str(work / "soups" / m / "soup.safetensors") for m in methods}}
