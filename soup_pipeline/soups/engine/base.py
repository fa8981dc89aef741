"""What every souping method shares: the objective, the result, the held-out stream, the model setup."""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ...core.batches import Inputs, to_device
from ...core.data import fetch_batch
from ...core.ingredients import IngredientStore
from ...core.settings import SoupSettings
from ...evaluation.scoring import loss_and_accuracy
from ...runtime.errors import SoupError
from ...runtime.precision import autocast

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Method = Callable[..., "SoupResult"]


@dataclass
class Objective:
    """What a soup is fitted to: a model to hold the weights, held-out data and a loss.

    model_factory: returns a fresh module whose state_dict has the ingredients' keys.
    fit: held-out (input, target) pairs that greedy soup's inclusion test and every learned
      coefficient see; disjoint from fine-tuning and test data.
    select: held-out pairs disjoint from `fit`, read only to choose among candidate settings
      (`grouping: auto`); never trained on. None when no choice is to be made.
    """

    model_factory: Callable[[], nn.Module]
    fit: Dataset
    select: Dataset | None = None
    batch_size: int = 128
    loss_fn: LossFn = F.cross_entropy


@dataclass
class SoupResult:
    """A method's output. `state_dict` is None for the ensemble, which is not a soup."""

    method: str
    state_dict: dict[str, torch.Tensor] | None
    beta: torch.Tensor  # K x L mixing weights, columns sum to 1
    layer_names: list[str]
    ingredient_names: list[str]
    seconds: float = 0.0
    peak_bytes: dict[str, int] = field(default_factory=dict)
    history: list[float] = field(default_factory=list)  # held-out loss per step, where learned
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MethodSpec:
    """What the registry, the params checks, the stages and the CLI know of a method; each method module declares
    its own."""

    name: str
    run: Method  # run(store, objective, params, *, name, **options) -> SoupResult
    params: type[SoupSettings] = SoupSettings  # its typed parameters: params.yaml's soup.methods.NAME on the shared
    # soup keys
    kind: str = "soup"  # "soup" (a state dict) or "ensemble" (predictions only: evaluated, never built as a stage)
    resumable: bool = False  # takes resume_dir= and continues after its last finished block
    distributed: bool = False  # runs across torch.distributed ranks, each holding its share of a block (soup.nproc)
    anchored: bool = False  # takes anchor= (the pre-trained model theta_0 its task vectors are measured from)
    searched: bool = False  # always chooses its setting from its grid `search` on select data (soups/methods/search.py)
    refines: bool = False  # takes soup= (the built soup its `soup` parameter names); listed under soup.refine


class HeldOutStream:
    """Seeded mini-batches of held-out indices, reshuffled every pass, running on across blocks.

    With `batches` given, that explicit sequence is used instead (for step-by-step comparisons).
    """

    def __init__(self, size: int, batch_size: int, seed: int, batches: Sequence[Sequence[int]] | None = None):
        if size <= 0:
            raise SoupError("held-out data set is empty; souping needs held-out examples")
        self.size, self.batch_size = size, min(batch_size, size)
        self.generator = torch.Generator().manual_seed(seed)
        self.explicit = [list(b) for b in batches] if batches is not None else None
        self.order = torch.empty(0, dtype=torch.long)
        self.position = 0

    @property
    def batches_per_pass(self) -> int:
        return -(-self.size // self.batch_size)

    def next(self) -> list[int]:
        """The next mini-batch of indices."""
        if self.explicit is not None:
            if self.position >= len(self.explicit):
                raise SoupError(f"the explicit batch sequence ran out after {self.position} steps; give more batches")
            self.position += 1
            return self.explicit[self.position - 1]
        if self.position >= len(self.order):
            self.order = torch.randperm(self.size, generator=self.generator)
            self.position = 0
        batch = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return batch.tolist()

    def state(self) -> dict[str, torch.Tensor]:
        """Everything needed to continue the stream exactly."""
        return {"generator": self.generator.get_state(), "order": self.order.clone(),
                "position": torch.tensor([self.position], dtype=torch.long)}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
        self.order = state["order"].clone()
        self.position = int(state["position"][0])


def check_ingredient_count(store: IngredientStore) -> None:
    """Warn for K = 1 (the soup is that model)."""
    if len(store) == 1:
        warnings.warn("only one ingredient (K = 1): the soup is that model", stacklevel=3)


def best_individual(store: IngredientStore) -> int:
    """The ingredient with the highest fit accuracy in its sidecar (first on ties): chosen on fit data, judged on the
    rest."""
    return max(range(len(store)), key=lambda k: store.ingredients[k].fit_acc or 0.0)


def mixable_keys(model: nn.Module, store: IngredientStore) -> tuple[list[str], list[str]]:
    """Split the state dict: (floating parameters, floating buffers), checked against the store.

    Every other entry must be identical across ingredients (checked when the centre is streamed).
    """
    state_keys = set(model.state_dict())
    missing, extra = sorted(state_keys - set(store.keys)), sorted(set(store.keys) - state_keys)
    if missing or extra:
        raise SoupError(
            f"the model and the ingredients disagree: keys missing from the ingredients {missing[:5]}, "
            f"keys the model lacks {extra[:5]}; build the objective's model with the ingredients' architecture"
        )
    params = [name for name, p in model.named_parameters() if p.is_floating_point()]
    param_set = set(params)
    buffers = [k for k in model.state_dict() if k not in param_set and model.state_dict()[k].is_floating_point()]
    return params, buffers


def model_at(objective: Objective, state: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """A fresh model from the factory holding `state`, on `device`, in eval mode."""
    model = objective.model_factory()
    model.load_state_dict(state)
    return model.to(device).eval()


def role_metrics(model: nn.Module, objective: Objective, device: torch.device) -> dict[str, float]:
    """{"fit_loss", "fit_acc", "select_loss", "select_acc"}: a model judged on both held-out roles."""
    out = {}
    for role in ("fit", "select"):
        out[f"{role}_loss"], out[f"{role}_acc"] = loss_and_accuracy(model, getattr(objective, role),
                                                                    objective.batch_size, device, objective.loss_fn)
    return out


def step_loss(logits_of: Callable[[Inputs], torch.Tensor], objective: Objective, stream: HeldOutStream,
              device: torch.device, precision: str = "float32") -> torch.Tensor:
    """Forward one held-out mini-batch (`logits_of(inputs)`, inputs on `device`, under `precision`'s autocast) and
    return its loss (bfloat16 logits promoted to float32 first)."""
    inputs, targets = fetch_batch(objective.fit, stream.next())
    with autocast(precision, device):
        logits = logits_of(to_device(inputs, device))
    return objective.loss_fn(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets.to(device))


class LossLog:
    """Per-step held-out losses, kept on the device and checked in one synchronisation per flush.

    Reading each loss at once would stall a GPU every step; a non-finite loss is still reported
    with the block and step where it happened, and the run stops there.
    """

    def __init__(self, values: list[float] | None = None):
        self.values: list[float] = list(values or [])
        self._pending: list[tuple[torch.Tensor, str]] = []

    def add(self, loss: torch.Tensor, where: str) -> None:
        self._pending.append((loss.detach(), where))

    def flush(self) -> None:
        """Move pending losses to `values`; raise SoupError at the first non-finite one."""
        if not self._pending:
            return
        losses = torch.stack([loss for loss, _ in self._pending]).double().cpu().tolist()
        places = [where for _, where in self._pending]
        self._pending = []
        for value, where in zip(losses, places):
            if not math.isfinite(value):
                raise SoupError(f"non-finite held-out loss ({value}) at {where}; "
                                "lower the learning rate or check the ingredients")
            self.values.append(value)


def uniform_beta(K: int, L: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Mixing weights of the uniform soup."""
    return torch.full((K, L), 1.0 / K, dtype=dtype)


@dataclass(frozen=True)
class Overfit:
    """A soup whose K x L learned coefficients outnumber its fit examples."""

    method: str
    K: int
    L: int
    fit_size: int

    def __str__(self) -> str:
        return (f"{self.method}: {self.K * self.L} learned coefficients (K={self.K} x L={self.L}) exceed the "
                f"{self.fit_size} fit examples")


class OverfittingWarning(UserWarning):
    """The overfitting guard's warning, naming each soup it concerns (`soups`)."""

    def __init__(self, soups: Sequence[Overfit] | str):
        if isinstance(soups, str):  # rebuilt from its text (as pytest-xdist passes warnings between processes)
            self.soups = ()
            super().__init__(soups)
            return
        self.soups = tuple(soups)
        verdict = ("the soup may overfit them" if len(self.soups) == 1
                   else f"these {len(self.soups)} soups may overfit them")
        super().__init__("; ".join(map(str, self.soups)) + f": {verdict}; let select data choose the grouping "
                         "(grouping: auto) or use a coarser one")


def warn_overfitting(method: str, K: int, L: int, fit_size: int) -> None:
    """Warn when the learned coefficients outnumber the fit examples (the overfitting guard)."""
    if K * L > fit_size:
        warnings.warn(OverfittingWarning([Overfit(method, K, L, fit_size)]), stacklevel=3)


@contextlib.contextmanager
def overfitting_said_once() -> Iterator[None]:
    """Hold back the overfitting guard's warnings within the block and give one at its end, naming every soup they
    concerned (a run that builds several soups says it once); other warnings are shown as they come."""
    held: list[Overfit] = []
    with warnings.catch_warnings():  # the filters and warnings.showwarning are restored on leaving
        warnings.simplefilter("always", OverfittingWarning)  # not deduplicated: each soup reaches `held`
        show = warnings.showwarning

        def hold(message, category, filename, lineno, file=None, line=None) -> None:
            if issubclass(category, OverfittingWarning):
                held.extend(soup for soup in message.soups if soup not in held)
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = hold
        yield
    if held:
        warnings.warn(OverfittingWarning(held), stacklevel=3)
