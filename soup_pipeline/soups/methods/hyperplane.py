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
The projections and rebuilds run one batched product per shape (fused.py) where they can.
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

from ...core.batches import forward
from ...core.ingredients import BlockPrefetcher, IngredientStore
from ...core.schedule import warmup_cosine_scheduler
from ...core.settings import Precision, SoupSettings
from ...runtime.errors import SoupError
from ...runtime.placement import device_for
from ..engine.base import (
    HeldOutStream,
    LossLog,
    MethodSpec,
    Objective,
    SoupResult,
    check_ingredient_count,
    mixable_keys,
    step_loss,
    warn_overfitting,
)
from ..engine.distributed import Combiner, Ranks
from ..engine.fused import BlockStep, FlatTensors, ShapeOrder, bind_parameters, block_step
from ..engine.layers import Grouping, SearchableParams, group_layers
from ..engine.mixing import group_rows, per_tensor, row_norms, tensor_columns
from ..engine.resume import load_state, resume_key, save_state, state_path

MASK_RTOL = 1e-6  # a direction with |d_{k,l}| <= MASK_RTOL * |c_l| is masked (its coefficient stays 0)


# How a soup is computed, not what: left out of the resume key, so a run killed on 2 processes (or nodes) resumes on 1
# (or on another device, or with prefetching or the fused step switched), its saved blocks being the same numbers.
EXECUTION_ONLY = ("nproc", "nnodes", "rdzv_endpoint", "join_timeout", "prefetch", "fused_step", "device")


class HLParams(SoupSettings):
    """HL-Soup: AdamW on X with warm-up and cosine decay, all K directions in one block."""

    passes: float = Field(5.0, gt=0)  # S, in passes over the fit data, per block
    lr: float = Field(0.05, gt=0)  # AdamW learning rate on X (raw directions)
    weight_decay: float = Field(0.0, ge=0)  # AdamW weight decay on X (towards the uniform soup)
    warmup_frac: float = Field(0.2, ge=0, lt=1)  # linear warm-up share of each block's steps
    grad_clip: float | None = Field(1.0, gt=0)  # max global norm of grad_theta before projection; None = off
    normalize_directions: bool = False  # use d/|d| (the reference script) instead of raw d
    prefetch: bool = True  # load the next block on a background thread
    fused_step: bool = True  # one batched product per shape (soups/engine/fused.py); False: per tensor
    precision: Precision = "float32"  # the inner steps' forward passes: float32, or bf16 autocast (the soup, its
    # coefficients and their arithmetic stay in their own dtype)


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


@dataclass
class BoundSoup:
    """The model with its mixable parameters bound to one flat buffer (`theta`, the soup) and their gradients to
    another (`grads`), in `ShapeOrder`; the centre c beside them."""

    model: torch.nn.Module
    order: ShapeOrder  # parameters, gradients, centre, base and every block: in this order
    theta: FlatTensors
    grads: FlatTensors
    centre: FlatTensors
    centre_norm: torch.Tensor  # |c_l| per layer group
    grouping: Grouping
    columns: torch.Tensor  # each tensor's layer group
    dtype: torch.dtype
    parameters: list[torch.Tensor]  # the mixable parameters in the model's order (gradient clipping)


def bind(store: IngredientStore, objective: Objective, grouping: str | list[str], device: torch.device,
         name: str) -> BoundSoup:
    """The uniform soup loaded into a fresh model on `device`, its mixable parameters bound to flat buffers."""
    model = objective.model_factory()
    param_keys, _ = mixable_keys(model, store)
    dtype = next(model.parameters()).dtype
    layers = group_layers(param_keys, grouping)
    model.load_state_dict(store.centre(dtype=dtype))
    model.to(device).eval()
    soup = dict(model.named_parameters())
    if len({soup[key].dtype for key in param_keys}) != 1:
        dtypes = sorted({str(soup[key].dtype) for key in param_keys})
        raise SoupError(f"{name} needs one parameter dtype; the model has {dtypes}")
    order = ShapeOrder.of({key: soup[key].shape for key in param_keys})
    theta = FlatTensors.empty(order, soup[param_keys[0]])
    grads = FlatTensors(order, torch.zeros_like(theta.flat))
    bind_parameters(model, theta, grads)
    centre = FlatTensors(order, theta.flat.clone())
    centre_norm = row_norms({key: view.unsqueeze(0) for key, view in centre.views.items()}, layers)[0]
    columns = tensor_columns(layers, order.keys, device)
    parameters = [soup[key] for key in param_keys]
    return BoundSoup(model, order, theta, grads, centre, centre_norm, layers, columns, dtype, parameters)


@dataclass(frozen=True)
class Plan:
    """Which ingredients each block holds and how many AdamW steps each block runs."""

    b: int
    perms: list[list[int]]  # one permutation of the K ingredients per model epoch
    blocks: list[list[int]]  # every block, over all model epochs
    shares: list[list[int]]  # this rank's ingredients of each block
    steps: int  # S


def plan(K: int, params: MEHLParams, ranks: Ranks, stream: HeldOutStream,
         permutations: Sequence[Sequence[int]] | None, compute_matched: bool) -> Plan:
    """The blocks of b over each model epoch's permutation, and S (scaled by b/K when compute-matched)."""
    b = clamp_model_batch(params.model_batch, K)
    perms = model_permutations(K, params.model_epochs, params.seed, permutations)
    blocks = [perm[i : i + b] for perm in perms for i in range(0, K, b)]
    passes = params.passes * b / K if compute_matched else params.passes
    return Plan(b, perms, blocks, [ranks.share(block) for block in blocks],
                max(1, round(passes * stream.batches_per_pass)))


def resume_file(resume_dir: str | Path | None, store: IngredientStore, params: MEHLParams, layerwise: bool,
                blocks: Plan, batches: Sequence[Sequence[int]] | None, dtype: torch.dtype) -> Path | None:
    """Where this run saves its progress (None without `resume_dir`): keyed by what changes the result (the
    ingredients, the method's parameters, the blocks, the held-out batches, the dtype), never by how it runs
    (`EXECUTION_ONLY`)."""
    if resume_dir is None:
        return None
    settings = {**params.model_dump(exclude={"search", *EXECUTION_ONLY}), "layerwise": layerwise, "b": blocks.b,
                "epochs": params.model_epochs, "steps": blocks.steps, "perms": blocks.perms, "batches": batches,
                "dtype": str(dtype)}
    return state_path(resume_dir, resume_key(store, settings))


@dataclass
class Progress:
    """What the blocks before `next_block` learned: saved after each block, restored by a rerun."""

    X: torch.Tensor  # K x L coefficients
    norms: torch.Tensor  # K x L direction norms |d_{k,l}| (NaN until the ingredient's first block)
    losses: LossLog
    next_block: int = 0


def restore(saved_at: Path | None, soup: BoundSoup, stream: HeldOutStream, K: int) -> Progress:
    """The saved progress at `saved_at` (the soup and the held-out stream put back as they were), else a fresh start
    at the uniform soup (X = 0)."""
    state = load_state(saved_at) if saved_at is not None else None
    if state is None:
        return Progress(torch.zeros(K, soup.grouping.size, dtype=soup.dtype),
                        torch.full((K, soup.grouping.size), float("nan"), dtype=torch.float64), LossLog())
    stream.restore(state["stream"])
    for key, value in state["soup"].items():
        soup.theta.views[key].copy_(value)
    return Progress(state["X"], state["norms"], LossLog(state["history"]), state["next_block"])


@dataclass
class BlockDescent:
    """Block coordinate descent on the hyperplane from a bound soup: one block at a time, S AdamW steps each."""

    soup: BoundSoup
    objective: Objective
    params: MEHLParams
    stream: HeldOutStream
    plan: Plan
    ranks: Ranks
    progress: Progress
    on_step: StepHook | None

    def __post_init__(self):
        self.combine = Combiner(self.ranks, self.soup.theta, self.soup.order)
        self.base = FlatTensors.empty(self.soup.order, self.soup.theta.flat)  # each block's base, written in place

    def block(self, position: int, directions: dict[str, torch.Tensor]) -> None:
        """Learn block `position` from its ingredients (`directions`, loaded in `ShapeOrder`, made d = theta_k - c
        here in place) and gather its coefficients from every rank into X."""
        soup, progress, ranks = self.soup, self.progress, self.ranks
        block, mine = self.plan.blocks[position], self.plan.shares[position]
        for key in soup.order.keys:  # in place, so the store keeps counting these ingredients
            directions[key].sub_(soup.centre.views[key])
        step = block_step(directions, soup.order, soup.dtype, fused=self.params.fused_step)
        block_norms = row_norms(directions, soup.grouping)
        progress.norms[block] = ranks.assemble(block_norms, block)
        scale = coefficient_scale(block_norms, soup.centre_norm, self.params.normalize_directions)
        X_block = progress.X[mine].to(soup.theta.flat.device).requires_grad_(True)
        self.steps(step, scale.to(X_block.device, soup.dtype), X_block, position)
        progress.losses.flush()
        progress.X[block] = ranks.assemble(X_block.detach(), block).cpu()
        progress.next_block = position + 1

    def steps(self, step: BlockStep, scale: torch.Tensor, X_block: torch.Tensor, position: int) -> None:
        """S AdamW steps on the block's coefficients X_block, the soup rebuilt from the block's base after each."""
        soup, params, losses = self.soup, self.params, self.progress.losses
        with torch.no_grad():
            # base = theta - sum_{k in block} alpha_k d_k: the soup without this block's terms (theta combined with the
            # negated alphas), so each step rebuilds theta from the block's live coefficients alone.
            self.combine(self.base, soup.theta, per_tensor(-(X_block * scale), soup.columns), step)
        optimizer = torch.optim.AdamW([X_block], lr=params.lr, weight_decay=params.weight_decay)
        schedule = warmup_cosine_scheduler(optimizer, self.plan.steps, params.warmup_frac)
        for index in range(self.plan.steps):
            soup.grads.flat.zero_()
            loss = step_loss(functools.partial(forward, soup.model), self.objective, self.stream, X_block.device,
                             params.precision)
            losses.add(loss, f"block {position} (ingredients {self.plan.blocks[position]}), step {index}")
            loss.backward()
            if params.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(soup.parameters, params.grad_clip)
            # dL/dalpha_{k,l} = sum over group l's tensors of <grad_theta, d_k>; the chain rule through
            # alpha = X * scale multiplies by scale (0 where (k, l) is masked, so its coefficient never moves).
            X_block.grad = group_rows(step.project(soup.grads, soup.dtype), soup.columns, soup.grouping.size) * scale
            optimizer.step()
            schedule.step()
            with torch.no_grad():  # theta = base + sum_{k in block} alpha_k d_k, summed over every rank's share
                self.combine(soup.theta, self.base, per_tensor(X_block * scale, soup.columns), step)
            if self.on_step is not None:
                losses.flush()
                self.report(position, index, X_block)

    def report(self, position: int, index: int, X_block: torch.Tensor) -> None:
        """Call the step hook with every coefficient as it is now (this rank's block's live values included)."""
        now = self.progress.X.clone()
        now[self.plan.shares[position]] = X_block.detach().cpu()
        self.on_step(StepEvent(position, self.plan.blocks[position], index, self.progress.losses.values[-1], now))

    def save(self, saved_at: Path) -> None:
        """Write the progress after a block (the first rank of each node); every rank waits until it is on disk."""
        if self.ranks.leader:
            save_state(saved_at, next_block=self.progress.next_block, X=self.progress.X, norms=self.progress.norms,
                       soup=self.soup.theta.views, stream=self.stream.state(), history=self.progress.losses.values)
        self.ranks.barrier()  # no rank starts the next block before the state of this one is on disk


def hyperplane_soup(store: IngredientStore, objective: Objective, params: MEHLParams, *, layerwise: bool,
                    permutations: Sequence[Sequence[int]] | None = None, batches: Sequence[Sequence[int]] | None = None,
                    resume_dir: str | Path | None = None, on_step: StepHook | None = None,
                    compute_matched: bool = False, name: str = "mehl_soup") -> SoupResult:
    """Learn the soup by block coordinate descent on the hyperplane; see the module docstring.

    Four steps: bind the uniform soup into the model, restore the progress a killed run saved, learn
    block after block (the next block's ingredients loading meanwhile), and report the soup and beta.
    permutations / batches: explicit ingredient order per epoch and held-out index batches, to
    compare implementations step by step. resume_dir: save state after each block and resume.
    compute_matched: S scaled by b/K, so the run takes HL-Soup's number of steps.
    Under torch.distributed each rank holds and steps only its share of every block
    (soups/engine/distributed.py); the result is the same on every rank and equals the run alone.
    """
    K = len(store)
    check_ingredient_count(store)
    device, ranks = device_for(params.device, 0, "soup.device"), Ranks.current()
    soup = bind(store, objective, params.grouping if layerwise else "model", device, name)
    warn_overfitting(name, K, soup.grouping.size, len(objective.fit))
    stream = HeldOutStream(len(objective.fit), params.batch_size, params.seed, batches)
    blocks = plan(K, params, ranks, stream, permutations, compute_matched)
    saved_at = resume_file(resume_dir, store, params, layerwise, blocks, batches, soup.dtype)
    progress = restore(saved_at, soup, stream, K)
    descent = BlockDescent(soup, objective, params, stream, blocks, ranks, progress, on_step)
    first = progress.next_block
    with BlockPrefetcher(store, blocks.shares[first:], soup.order.keys, enabled=params.prefetch,
                         device=device) as prefetcher:
        for position in tqdm(range(first, len(blocks.blocks)), desc=name, unit="block", initial=first,
                             total=len(blocks.blocks), disable=None if ranks.leader else True):
            directions = prefetcher.get(position - first)
            descent.block(position, directions)
            # Let the block's directions go before the next block is taken: resident stay b directions and theta,
            # grads, centre and base, the (b + 4) model sizes of the memory contract (plus the block prefetched).
            del directions
            if saved_at is not None:
                descent.save(saved_at)
    return soup_result(store, soup, params, progress, blocks, name, reused=first)


def soup_result(store: IngredientStore, soup: BoundSoup, params: MEHLParams, progress: Progress, blocks: Plan,
                name: str, *, reused: int) -> SoupResult:
    """The soup's weights and beta = alpha + (1 - sum_k alpha) / K, so theta_l = sum_k beta_{k,l} theta_{k,l}."""
    K = len(store)
    scale = coefficient_scale(progress.norms, soup.centre_norm, params.normalize_directions)
    alpha = progress.X.to(torch.float64) * scale
    beta = alpha + (1.0 - alpha.sum(0, keepdim=True)) / K
    state_dict = {k: v.detach().cpu().clone() for k, v in soup.model.state_dict().items()}
    return SoupResult(method=name, state_dict=state_dict, beta=beta, layer_names=soup.grouping.names,
                      ingredient_names=[i.name for i in store.ingredients], history=progress.losses.values,
                      info={"K": K, "L": soup.grouping.size, "b": blocks.b, "model_epochs": params.model_epochs,
                            "steps_per_block": blocks.steps, "blocks_reused": reused, "coefficients": progress.X,
                            "masked": int((progress.norms <= MASK_RTOL * soup.centre_norm).sum())})


def hl_soup(store: IngredientStore, objective: Objective, params: HLParams, *, layerwise: bool,
            name: str = "hl_soup", **options) -> SoupResult:
    """HL-Soup(+): MEHL-Soup(+) with all K directions in one block (b = K) and one model epoch."""
    as_mehl = (MEHLPlusParams if layerwise else MEHLParams)(**params.model_dump(), model_batch=len(store),
                                                            model_epochs=1)
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
