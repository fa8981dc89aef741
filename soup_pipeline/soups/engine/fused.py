"""The inner step of the hyperplane methods, chosen once per block: fused (one batched product per shape) or per tensor.

The per-tensor step (`PerTensorStep`, over `mixing.py`) launches two small kernels per parameter
tensor and step (a projection and a rebuild): about 300 for a ViT-B/32, each launched from Python.
The fused step (`FusedStep`) lays the soup's parameters, their gradients, the block's base and its
directions out so that the tensors of one shape are adjacent (`ShapeOrder`): shape by shape, the
projection is one `bmm` and the rebuild one `baddbmm`, a few dozen kernels per step whatever the
model's depth, over the same memory as before (no copy of a direction is made). The arithmetic is
the per-tensor step's (the same dot products and multiply-adds), so the two agree to rounding.

The batched products need the directions in the soup's dtype: with `storage_dtype: bfloat16` on a
float32 soup the per-tensor step runs (it converts tensor by tensor, keeping fp32 accumulation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol

import torch

from .mixing import rebuild_, tensor_rows


@dataclass(frozen=True)
class ShapeOrder:
    """The mixable keys in an order that puts tensors of one shape side by side (first appearance order)."""

    keys: list[str]  # every key, shape after shape
    stacks: list[list[str]]  # the keys of each shape, side by side
    shapes: list[torch.Size]  # the shape of each stack

    @classmethod
    def of(cls, shapes: Mapping[str, torch.Size]) -> "ShapeOrder":
        by_shape: dict[torch.Size, list[str]] = {}
        for key, shape in shapes.items():
            by_shape.setdefault(torch.Size(shape), []).append(key)
        stacks = list(by_shape.values())
        return cls([key for stack in stacks for key in stack], stacks, list(by_shape))

    @property
    def sizes(self) -> list[int]:
        """The number of values of each stack."""
        return [len(stack) * shape.numel() for stack, shape in zip(self.stacks, self.shapes)]


class FlatTensors:
    """Tensors in `ShapeOrder` in one flat buffer, seen per key (`views`) and per shape ([t, s], `stacks`)."""

    def __init__(self, order: ShapeOrder, flat: torch.Tensor):
        self.flat = flat
        self.stacks = [chunk.view(len(stack), shape.numel())
                       for chunk, stack, shape in zip(flat.split(order.sizes), order.stacks, order.shapes)]
        self.views = {key: row.view(shape) for stack, shape, rows in zip(order.stacks, order.shapes, self.stacks)
                      for key, row in zip(stack, rows)}

    @classmethod
    def empty(cls, order: ShapeOrder, like: torch.Tensor) -> "FlatTensors":
        return cls(order, torch.empty(sum(order.sizes), dtype=like.dtype, device=like.device))


def bind_parameters(model: torch.nn.Module, soup: FlatTensors, grads: FlatTensors) -> None:
    """Make the model's parameters views of `soup` and their gradients views of `grads`.

    A backward pass then accumulates into `grads` in place: zero `grads.flat` before each one.
    """
    for key, view in soup.views.items():
        parameter = model.get_parameter(key)
        view.copy_(parameter.detach())
        parameter.data = view
        parameter.grad = grads.views[key]


def direction_stacks(order: ShapeOrder, directions: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """Each shape's directions of a block as one [t, b, s] view of its memory (no copy). The block must have been
    loaded with its keys in `order`: `IngredientStore.load_stacked` places same-shape neighbours back to back."""
    views = []
    for stack, shape in zip(order.stacks, order.shapes):
        first = directions[stack[0]]
        b, s = len(first), shape.numel()
        step = b * s * first.element_size()
        if any(directions[key].data_ptr() != first.data_ptr() + i * step or directions[key].dtype != first.dtype
               for i, key in enumerate(stack)) or not first.is_contiguous():
            raise RuntimeError(f"the block's tensors {stack} are not back to back; load the block with its keys in "
                               "ShapeOrder")
        views.append(first.as_strided((len(stack), b, s), (b * s, s, 1)))
    return views


def stack_projections(grads: FlatTensors, stacks: list[torch.Tensor]) -> torch.Tensor:
    """<grad_i, d_{j,i}> for every tensor i (`ShapeOrder`) and direction j: a T x b matrix, one `bmm` per shape.

    Each product is [1, s] x [s, b] (the gradient row against the transposed directions): on a CPU
    this form is a fast matrix product, where [b, s] x [s, 1] runs five times slower.
    """
    return torch.cat([torch.bmm(grad.unsqueeze(1), stacked.transpose(1, 2)).squeeze(1)
                      for grad, stacked in zip(grads.stacks, stacks)])


def stack_rebuild(out: FlatTensors, base: FlatTensors | None, coeffs: torch.Tensor, stacks: list[torch.Tensor]) -> None:
    """out_i = base_i + sum_j coeffs[i, j] d_{j,i} for every tensor i (base None means 0): one `baddbmm` per shape."""
    start = 0
    for index, (target, stacked) in enumerate(zip(out.stacks, stacks)):
        rows = coeffs[start : start + len(target)].to(target.dtype).unsqueeze(1)  # [t, 1, b]
        start += len(target)
        if base is None:
            torch.bmm(rows, stacked, out=target.unsqueeze(1))
        else:
            torch.baddbmm(base.stacks[index].unsqueeze(1), rows, stacked, out=target.unsqueeze(1))


class BlockStep(Protocol):
    """A block's two operations on its directions d_{j,i}: the projection and the rebuild."""

    def project(self, grads: FlatTensors, dtype: torch.dtype) -> torch.Tensor:
        """<grad_i, d_{j,i}> for every tensor i (`ShapeOrder`) and direction j, T x b, in `dtype`."""

    def rebuild(self, out: FlatTensors, base: FlatTensors | None, coeffs: torch.Tensor) -> None:
        """out_i = base_i + sum_j coeffs[i, j] d_{j,i} (base None means 0)."""


class PerTensorStep:
    """A block's projection and rebuild tensor by tensor (`mixing.py`): any storage dtype."""

    def __init__(self, directions: Mapping[str, torch.Tensor]):
        self.directions = directions

    def project(self, grads: FlatTensors, dtype: torch.dtype) -> torch.Tensor:
        return tensor_rows(grads.views, {key: self.directions[key] for key in grads.views}, dtype)

    def rebuild(self, out: FlatTensors, base: FlatTensors | None, coeffs: torch.Tensor) -> None:
        for i, (key, target) in enumerate(out.views.items()):
            rebuild_(target, None if base is None else base.views[key], coeffs[i], self.directions[key])


class FusedStep:
    """A block's projection and rebuild as one batched product per shape: directions in the soup's dtype."""

    def __init__(self, directions: Mapping[str, torch.Tensor], order: ShapeOrder):
        self.stacks = direction_stacks(order, directions)

    def project(self, grads: FlatTensors, dtype: torch.dtype) -> torch.Tensor:
        return stack_projections(grads, self.stacks).to(dtype)

    def rebuild(self, out: FlatTensors, base: FlatTensors | None, coeffs: torch.Tensor) -> None:
        stack_rebuild(out, base, coeffs, self.stacks)


def block_step(directions: Mapping[str, torch.Tensor], order: ShapeOrder, dtype: torch.dtype, *,
               fused: bool) -> BlockStep:
    """The step a block runs: fused when asked and its directions are in the soup's `dtype` (not with bf16 storage
    of a float32 soup), else per tensor."""
    if fused and all(direction.dtype == dtype for direction in directions.values()):
        return FusedStep(directions, order)
    return PerTensorStep(directions)
