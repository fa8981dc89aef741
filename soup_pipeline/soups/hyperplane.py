"""HL-Soup(+) and MEHL-Soup(+): coefficients on the hyperplane through the uniform soup (docs/method.md).

Symbols, as in docs/method.md and below:
  c            the centre, the uniform soup (`centre`); d_{k,l} = theta_{k,l} - c_l the directions (`directions`)
  X            the learned coefficients, K x L (`X`; the loaded block's rows `X_block`)
  scale        1, or 1/|d_{k,l}| with normalised directions, 0 where (k, l) is masked
  alpha        X * scale: theta_l(alpha) = c_l + sum_k alpha_{k,l} d_{k,l} (`alpha`, one column per tensor)
  beta         the reported mixing weights: alpha + (1 - sum_k alpha) / K, so theta_l = sum_k beta_{k,l} theta_{k,l}

MEHL walks a seeded permutation of the K ingredients in blocks of b; for each block it holds only
those b directions, runs S AdamW steps (warm-up then cosine) on X[B], and rebuilds the soup
from the block's base after every step. dL/dalpha_{k,l} = <grad_theta_l L, d_{k,l}>: one
forward/backward through the combined model, then the projections. HL-Soup is b = K, one epoch.
The projections and rebuilds run one batched product per run of same-shape tensors (fused.py).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from pydantic import Field
from tqdm.auto import tqdm

from ..core.schedule import warmup_cosine_scheduler
from ..core.settings import SoupSettings
from ..runtime.errors import SoupError
from ..core.ingredients import BlockPrefetcher, IngredientStore
from .base import (HeldOutStream, MethodSpec, Objective, SoupResult, check_ingredient_count, mixable_keys, LossLog, step_loss, warn_overfitting)
from ..runtime.devices import rank_device, resolve_device
from .layers import SearchableParams, group_layers
from .distributed import Combiner, Ranks
from .fused import FlatTensors, ShapeRuns, bind_parameters, projections, stacked_runs
from .mixing import group_rows, per_tensor, row_norms, tensor_columns
from .resume import fingerprint, load_state, save_state, state_path

MASK_RTOL = 1e-6  # a direction with |d_{k,l}| <= MASK_RTOL * |c_l| is masked (its coefficient stays 0)


# How a soup is computed, not what: left out of the resume key, so a run killed on 2 processes resumes on 1 (or
# on another device, or with prefetching or the fused step switched), its saved blocks being the same numbers.
EXECUTION_ONLY = ("nproc", "prefetch", "fused_step", "device")


class HLParams(SoupSettings):
    """HL-Soup: AdamW on X with warm-up and cosine decay, all K directions in one block."""

    passes: float = Field(5.0, gt=0)  # S, in passes over the fit data, per block
    lr: float = Field(0.05, gt=0)  # AdamW learning rate on X (raw directions)
    weight_decay: float = Field(0.0, ge=0)  # AdamW weight decay on X (towards the uniform soup)
    warmup_frac: float = Field(0.2, ge=0, lt=1)  # linear warm-up share of each block's steps
    grad_clip: float | None = Field(1.0, gt=0)  # max global norm of grad_theta before projection; None = off
    normalize_directions: bool = False  # use d/|d| (the reference script) instead of raw d
    prefetch: bool = True  # load the next block on a background thread
    fused_step: bool = True  # one batched product per run of same-shape tensors (soups/fused.py); False: per tensor


class MEHLParams(HLParams):
    """MEHL-Soup: HL-Soup's update on blocks of b ingredients, over several model epochs."""

    model_batch: int = Field(2, gt=0)  # b: ingredients in memory at once (clamped to K)
    model_epochs: int = Field(1, gt=0)  # passes over the K ingredients


class HLPlusParams(HLParams, SearchableParams):
    """HL-Soup+: one coefficient per layer group and ingredient."""


class MEHLPlusParams(MEHLParams, SearchableParams):
    """MEHL-Soup+: one coefficient per layer group and ingredient."""


@dataclass(frozen=True)
class StepEvent:
    """What a step hook sees after each inner step."""

    position: int  # index of the block in the run (over all model epochs)
    block: list[int]  # the ingredients loaded
    step: int  # inner step within the block
    loss: float  # held-out mini-batch loss before the step
    coefficients: torch.Tensor  # K x L coefficients now (the block's live values included)


StepHook = Callable[[StepEvent], None]


def coefficient_scale(norms: torch.Tensor, centre_norm: torch.Tensor, normalized: bool) -> torch.Tensor:
    """alpha = X * scale: 1/|d_{k,l}| with normalised directions, else 1; 0 where (k, l) is masked."""
    mask = norms <= MASK_RTOL * centre_norm
    unit = 1.0 / norms if normalized else torch.ones_like(norms)
    return torch.where(mask, torch.zeros_like(unit), unit)


def clamp_model_batch(model_batch: int, K: int) -> int:
    """b in [1, K]: b <= 0 is an error, b > K is clamped with a warning."""
    if model_batch <= 0:
        raise SoupError(f"model_batch (b) = {model_batch}; it must be a positive number of ingredients")
    if model_batch > K:
        warnings.warn(f"model_batch (b) = {model_batch} exceeds K = {K}; using b = {K}", stacklevel=3)
        return K
    return model_batch


def model_permutations(K: int, epochs: int, seed: int, given: Sequence[Sequence[int]] | None) -> list[list[int]]:
    """One permutation of the K ingredients per model epoch: seeded, or given explicitly."""
    if given is None:
        generator = torch.Generator().manual_seed(seed)
        return [torch.randperm(K, generator=generator).tolist() for _ in range(epochs)]
    perms = [list(p) for p in given]
    if len(perms) != epochs or any(sorted(p) != list(range(K)) for p in perms):
        raise SoupError(f"permutations: give {epochs} permutations of range({K}), one per model epoch")
    return perms


def hyperplane_soup(store: IngredientStore, objective: Objective, params: MEHLParams, *, layerwise: bool,
                    permutations: Sequence[Sequence[int]] | None = None, batches: Sequence[Sequence[int]] | None = None,
                    resume_dir: str | Path | None = None, on_step: StepHook | None = None,
                    compute_matched: bool = False, name: str = "mehl_soup") -> SoupResult:
    """Learn the soup by block coordinate descent on the hyperplane; see the module docstring.

    permutations / batches: explicit ingredient order per epoch and held-out index batches, to
    compare implementations step by step. resume_dir: save state after each block and resume.
    compute_matched: S scaled by b/K, so the run takes HL-Soup's number of steps.
    Under torch.distributed each rank holds and steps only its share of every block
    (soups/distributed.py); the result is the same on every rank and equals the run alone.
    """
    K = len(store)
    check_ingredient_count(store)
    b = clamp_model_batch(params.model_batch, K)
    epochs = params.model_epochs
    device = rank_device(resolve_device(params.device))
    ranks = Ranks.current()

    model = objective.model_factory()
    param_keys, _ = mixable_keys(model, store)
    dtype = next(model.parameters()).dtype
    grouping = group_layers(param_keys, params.grouping if layerwise else "model")
    L = grouping.size
    warn_overfitting(K, L, len(objective.fit))

    model.load_state_dict(store.centre(dtype=dtype))
    model.to(device).eval()
    soup = dict(model.named_parameters())
    soup_tensors = [soup[key] for key in param_keys]
    if len({soup[key].dtype for key in param_keys}) != 1:
        raise SoupError(f"{name} needs one parameter dtype; the model has {sorted({str(t.dtype) for t in soup_tensors})}")
    layout = ShapeRuns.of({key: soup[key].shape for key in param_keys})  # parameters, gradients, blocks: in this order
    theta = FlatTensors.empty(layout, soup_tensors[0])
    grads = FlatTensors(layout, torch.zeros_like(theta.flat))
    bind_parameters(model, theta, grads)
    centre = FlatTensors(layout, theta.flat.clone())
    centre_norm = row_norms({k: v.unsqueeze(0) for k, v in centre.views.items()}, grouping)[0]
    columns = tensor_columns(grouping, layout.keys, device)

    perms = model_permutations(K, epochs, params.seed, permutations)
    blocks = [perm[i : i + b] for perm in perms for i in range(0, K, b)]
    shares = [ranks.share(block) for block in blocks]  # this rank's ingredients of each block
    stream = HeldOutStream(len(objective.fit), params.batch_size, params.seed, batches)
    passes = params.passes * b / K if compute_matched else params.passes
    steps = max(1, round(passes * stream.batches_per_pass))

    X = torch.zeros(K, L, dtype=dtype)
    norms = torch.full((K, L), float("nan"), dtype=torch.float64)
    losses = LossLog()
    start = 0
    saved_at = None
    if resume_dir is not None:
        settings = {**params.model_dump(exclude={"search", *EXECUTION_ONLY}), "layerwise": layerwise, "b": b,
                    "epochs": epochs, "steps": steps, "perms": perms, "batches": batches, "dtype": str(dtype)}
        saved_at = state_path(resume_dir, fingerprint(store, settings))
        state = load_state(saved_at)
        if state is not None:
            start, X, norms, losses = state["next_block"], state["X"], state["norms"], LossLog(state["history"])
            stream.restore(state["stream"])
            for key, value in state["soup"].items():
                theta.views[key].copy_(value)

    combine = Combiner(ranks, theta, layout)
    base = FlatTensors.empty(layout, theta.flat)  # each block's base, written in place
    with BlockPrefetcher(store, shares[start:], layout.keys, enabled=params.prefetch, device=device) as prefetcher:
        for position in tqdm(range(start, len(blocks)), desc=name, unit="block", initial=start, total=len(blocks),
                             disable=None if ranks.leader else True):
            block, mine = blocks[position], shares[position]
            directions = prefetcher.get(position - start)
            for key in layout.keys:  # in place, so the store keeps counting these ingredients
                directions[key].sub_(centre.views[key])
            fused = params.fused_step and all(d.dtype == dtype for d in directions.values())  # not with bf16 storage
            runs = stacked_runs(layout, directions) if fused else None  # None: the per-tensor step
            block_norms = row_norms(directions, grouping)
            norms[block] = ranks.assemble(block_norms, block)
            scale = coefficient_scale(block_norms, centre_norm, params.normalize_directions).to(device, dtype)

            X_block = X[mine].to(device).requires_grad_(True)
            with torch.no_grad():
                combine(base, theta, per_tensor(-(X_block * scale), columns), directions, runs)
            optimizer = torch.optim.AdamW([X_block], lr=params.lr, weight_decay=params.weight_decay)
            schedule = warmup_cosine_scheduler(optimizer, steps, params.warmup_frac)
            for step in range(steps):
                grads.flat.zero_()
                loss = step_loss(model, objective, stream, device)
                losses.add(loss, f"block {position} (ingredients {block}), step {step}")
                loss.backward()
                if params.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(soup_tensors, params.grad_clip)
                X_block.grad = group_rows(projections(grads, directions, runs, dtype), columns, L) * scale
                optimizer.step()
                schedule.step()
                with torch.no_grad():
                    combine(theta, base, per_tensor(X_block * scale, columns), directions, runs)
                if on_step is not None:
                    losses.flush()
                    now = X.clone()
                    now[mine] = X_block.detach().cpu()
                    on_step(StepEvent(position, block, step, losses.values[-1], now))
            losses.flush()
            X[block] = ranks.assemble(X_block.detach(), block).cpu()
            del directions, runs
            if saved_at is not None:
                if ranks.leader:
                    save_state(saved_at, next_block=position + 1, X=X, norms=norms,
                               soup=theta.views, stream=stream.state(), history=losses.values)
                ranks.barrier()  # no rank starts the next block before the state of this one is on disk

    alpha = X.to(torch.float64) * coefficient_scale(norms, centre_norm, params.normalize_directions)
    beta = alpha + (1.0 - alpha.sum(0, keepdim=True)) / K
    state_dict = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return SoupResult(method=name, state_dict=state_dict, beta=beta, layer_names=grouping.names,
                      ingredient_names=[i.name for i in store.ingredients], history=losses.values,
                      info={"K": K, "L": L, "b": b, "model_epochs": epochs, "steps_per_block": steps, "blocks_reused": start,
                            "coefficients": X, "masked": int((norms <= MASK_RTOL * centre_norm).sum())})


def hl_soup(store: IngredientStore, objective: Objective, params: HLParams, *, layerwise: bool,
            name: str = "hl_soup", **options) -> SoupResult:
    """HL-Soup(+): MEHL-Soup(+) with all K directions in one block (b = K) and one model epoch."""
    as_mehl = (MEHLPlusParams if layerwise else MEHLParams)(**params.model_dump(), model_batch=len(store), model_epochs=1)
    return hyperplane_soup(store, objective, as_mehl, layerwise=layerwise, name=name, **options)


BLOCKWISE = {"resumable": True, "distributed": True}  # what every method of this module can do
SPECS = (
    MethodSpec("hl_soup", functools.partial(hl_soup, layerwise=False), HLParams, **BLOCKWISE),
    MethodSpec("hl_soup_plus", functools.partial(hl_soup, layerwise=True), HLPlusParams, **BLOCKWISE),
    MethodSpec("mehl_soup", functools.partial(hyperplane_soup, layerwise=False), MEHLParams, **BLOCKWISE),
    MethodSpec("mehl_soup_plus", functools.partial(hyperplane_soup, layerwise=True), MEHLPlusParams, **BLOCKWISE),
    MethodSpec("mehl_soup_plus_matched", functools.partial(hyperplane_soup, layerwise=True, compute_matched=True),
               MEHLPlusParams, **BLOCKWISE),
)
