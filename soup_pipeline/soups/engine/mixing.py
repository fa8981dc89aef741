"""Linear-combination primitives shared by the learned methods.

Stacked tensors hold b ingredients (or directions) of one parameter as one [b, *shape] tensor.
Coefficients arrive per group (b x L) and are gathered once per step into one column per tensor
(`per_tensor`), so each tensor costs one kernel to rebuild and one to project (fused.py batches
tensors of one shape). Everything is computed in the output's / gradient's dtype, so ingredients
may be stored in bf16 while accumulation stays in fp32 or better. The projections work on
whatever ingredients a process holds: sharded across processes, only the b x L results
(`group_rows`) need summing.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from .layers import Grouping


def tensor_columns(grouping: Grouping, keys: Sequence[str], device: torch.device | str) -> torch.Tensor:
    """The group index of each key, as an index tensor on `device`."""
    return torch.tensor([grouping.group_of[key] for key in keys], dtype=torch.long, device=device)


def per_tensor(coeffs: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """From b x L group coefficients to T x b: row i holds the coefficients of tensor i."""
    return coeffs[:, columns].t()


def rows_of(stacked: torch.Tensor) -> torch.Tensor:
    """[b, *shape] as b flat rows (b may be 0: a rank's empty share of a block)."""
    return stacked.reshape(len(stacked), math.prod(stacked.shape[1:]))


def rebuild_(out: torch.Tensor, base: torch.Tensor | None, coeffs: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """out = base + sum_j coeffs[j] * stacked[j] (base None means 0), in out's dtype; returns out."""
    flat_out = out.view(-1)
    rows = rows_of(stacked)
    if rows.dtype == out.dtype:
        if base is None:
            torch.mv(rows.t(), coeffs.to(out.dtype), out=flat_out)
        else:
            torch.addmv(base.view(-1), rows.t(), coeffs.to(out.dtype), out=flat_out)
        return out
    if base is None:
        out.zero_()
    else:
        out.copy_(base)
    for row, coeff in zip(stacked, coeffs.tolist()):
        out.add_(row, alpha=coeff)
    return out


def project(grad: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """<grad, stacked[j]> for every row j, in grad's dtype (none for no rows: a rank's empty share of a block)."""
    flat_grad = grad.reshape(-1)
    if len(stacked) == 0:
        return flat_grad.new_zeros(0)
    if stacked.dtype == grad.dtype:
        return rows_of(stacked) @ flat_grad
    return torch.stack([torch.dot(row.reshape(-1).to(grad.dtype), flat_grad) for row in stacked])


def tensor_rows(grads: Mapping[str, torch.Tensor | None], stacked: Mapping[str, torch.Tensor],
                dtype: torch.dtype) -> torch.Tensor:
    """<grads[t], stacked[t][j]> for every key t of `stacked` (in its order) and row j: a T x b matrix.

    A None gradient counts as zero.
    """
    first = next(iter(stacked.values()))
    zero = torch.zeros(len(first), dtype=dtype, device=first.device)
    return torch.stack([zero if grads[key] is None else project(grads[key], directions).to(dtype)
                        for key, directions in stacked.items()])


def group_rows(rows: torch.Tensor, columns: torch.Tensor, groups: int) -> torch.Tensor:
    """From T x b per-tensor values to b x L per-group sums; `columns[i]` is the group of tensor i."""
    return torch.zeros(groups, rows.shape[1], dtype=rows.dtype, device=rows.device).index_add_(0, columns, rows).t()


def row_norms(stacked: Mapping[str, torch.Tensor], grouping: Grouping) -> torch.Tensor:
    """||stacked_{j, l}|| over each group's tensors, in float64 on the CPU: a b x L matrix."""
    b = len(next(iter(stacked.values())))
    squares = torch.zeros(b, grouping.size, dtype=torch.float64)
    for key, tensor in stacked.items():
        norms = torch.linalg.vector_norm(rows_of(tensor), dim=1, dtype=torch.float64)
        squares[:, grouping.group_of[key]] += norms.cpu() ** 2
    return squares.sqrt()


class MixAll(torch.autograd.Function):
    """For every tensor i: sum_j weights[i, j] * stacked_i[j], with a gradient for the weights only.

    weights is T x K (one row per tensor); stacked are data. Autograd keeps references to the
    stacked ingredients, never copies, so K resident ingredients cost K x D.
    """

    @staticmethod
    def forward(ctx, weights: torch.Tensor, *stacked: torch.Tensor):
        ctx.save_for_backward(*stacked)
        ctx.dtype = weights.dtype
        outs = []
        for row, block in zip(weights.detach(), stacked):
            outs.append(rebuild_(torch.empty(block.shape[1:], dtype=weights.dtype, device=block.device), None, row,
                                 block))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outs: torch.Tensor):
        stacked = ctx.saved_tensors
        rows = [project(g, block) if g is not None else torch.zeros(len(block), dtype=ctx.dtype, device=block.device)
                for g, block in zip(grad_outs, stacked)]
        return (torch.stack(rows), *([None] * len(stacked)))
