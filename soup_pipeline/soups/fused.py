"""The fused inner step of the hyperplane methods: tensors of one shape side by side, one batched product per shape.

The per-tensor step launches two small kernels per parameter tensor and step (a projection and a
rebuild, `mixing.py`): about 300 for a ViT-B/32, each launched from Python. Here the soup's
parameters, their gradients, the block's base and its directions are laid out so that the tensors
of one shape are adjacent (`ShapeRuns`): shape by shape, the projection is one `bmm` and the
rebuild one `baddbmm`, a few dozen kernels per step whatever the model's depth, over the same
memory as before (no copy of a direction is made). The arithmetic is the per-tensor step's (the
same dot products and multiply-adds), so the two agree to rounding.

The batched products need the directions in the soup's dtype: with `storage_dtype: bfloat16` on a
float32 soup the per-tensor step runs (it converts tensor by tensor, keeping fp32 accumulation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from .mixing import rebuild_, tensor_rows


@dataclass(frozen=True)
class ShapeRuns:
    """The mixable keys in an order that puts tensors of one shape side by side (first appearance order)."""

    keys: list[str]  # every key, run after run
    runs: list[list[str]]  # the keys of each run (one shape)
    shapes: list[torch.Size]  # the shape of each run

    @classmethod
    def of(cls, shapes: Mapping[str, torch.Size]) -> "ShapeRuns":
        by_shape: dict[torch.Size, list[str]] = {}
        for key, shape in shapes.items():
            by_shape.setdefault(torch.Size(shape), []).append(key)
        runs = list(by_shape.values())
        return cls([key for run in runs for key in run], runs, list(by_shape))

    @property
    def sizes(self) -> list[int]:
        """The number of values of each run."""
        return [len(run) * shape.numel() for run, shape in zip(self.runs, self.shapes)]


class FlatTensors:
    """Tensors in `layout` order in one flat buffer, seen per key (`views`) and per run ([t, s], `runs`)."""

    def __init__(self, layout: ShapeRuns, flat: torch.Tensor):
        self.flat = flat
        self.runs = [chunk.view(len(run), shape.numel())
                     for chunk, run, shape in zip(flat.split(layout.sizes), layout.runs, layout.shapes)]
        self.views = {key: row.view(shape) for run, shape, rows in zip(layout.runs, layout.shapes, self.runs)
                      for key, row in zip(run, rows)}

    @classmethod
    def empty(cls, layout: ShapeRuns, like: torch.Tensor) -> "FlatTensors":
        return cls(layout, torch.empty(sum(layout.sizes), dtype=like.dtype, device=like.device))


def bind_parameters(model: torch.nn.Module, soup: FlatTensors, grads: FlatTensors) -> None:
    """Make the model's parameters views of `soup` and their gradients views of `grads`.

    A backward pass then accumulates into `grads` in place: zero `grads.flat` before each one.
    """
    for key, view in soup.views.items():
        parameter = model.get_parameter(key)
        view.copy_(parameter.detach())
        parameter.data = view
        parameter.grad = grads.views[key]


def stacked_runs(layout: ShapeRuns, stacked: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """Each run of a block as one [t, b, s] view of its memory (no copy). The block must have been loaded with its
    keys in `layout` order: `IngredientStore.load_stacked` places same-shape neighbours back to back."""
    views = []
    for run, shape in zip(layout.runs, layout.shapes):
        first = stacked[run[0]]
        b, s = len(first), shape.numel()
        step = b * s * first.element_size()
        if any(stacked[key].data_ptr() != first.data_ptr() + i * step or stacked[key].dtype != first.dtype
               for i, key in enumerate(run)) or not first.is_contiguous():
            raise RuntimeError(f"the block's tensors {run} are not back to back; load the block with its keys in ShapeRuns order")
        views.append(first.as_strided((len(run), b, s), (b * s, s, 1)))
    return views


def run_rows(grads: FlatTensors, directions: list[torch.Tensor]) -> torch.Tensor:
    """<grad_i, d_{j,i}> for every tensor i (layout order) and direction j: a T x b matrix, one `bmm` per run.

    Each product is [1, s] x [s, b] (the gradient row against the transposed directions): on a CPU
    this form is a fast matrix product, where [b, s] x [s, 1] runs five times slower.
    """
    return torch.cat([torch.bmm(grad.unsqueeze(1), stacked.transpose(1, 2)).squeeze(1)
                      for grad, stacked in zip(grads.runs, directions)])


def rebuild_runs(out: FlatTensors, base: FlatTensors | None, coeffs: torch.Tensor, directions: list[torch.Tensor]) -> None:
    """out_i = base_i + sum_j coeffs[i, j] d_{j,i} for every tensor i (base None means 0): one `baddbmm` per run."""
    start = 0
    for index, (target, stacked) in enumerate(zip(out.runs, directions)):
        rows = coeffs[start : start + len(target)].to(target.dtype).unsqueeze(1)  # [t, 1, b]
        start += len(target)
        if base is None:
            torch.bmm(rows, stacked, out=target.unsqueeze(1))
        else:
            torch.baddbmm(base.runs[index].unsqueeze(1), rows, stacked, out=target.unsqueeze(1))


def projections(grads: FlatTensors, directions: Mapping[str, torch.Tensor], runs: list[torch.Tensor] | None,
                dtype: torch.dtype) -> torch.Tensor:
    """<grad_i, d_{j,i}> for every tensor i (layout order) and direction j, T x b: fused over `runs` when given,
    else tensor by tensor."""
    if runs is not None:
        return run_rows(grads, runs).to(dtype)
    return tensor_rows(grads.views, {key: directions[key] for key in grads.views}, dtype)


def rebuild(out: FlatTensors, base: FlatTensors | None, coeffs: torch.Tensor, directions: Mapping[str, torch.Tensor],
            runs: list[torch.Tensor] | None) -> None:
    """out_i = base_i + sum_j coeffs[i, j] d_{j,i} (base None means 0): fused over `runs` when given, else
    tensor by tensor."""
    if runs is not None:
        rebuild_runs(out, base, coeffs, runs)
        return
    for i, (key, target) in enumerate(out.views.items()):
        rebuild_(target, None if base is None else base.views[key], coeffs[i], directions[key])
