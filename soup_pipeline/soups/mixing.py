"""Linear-combination primitives shared by the learned methods.

Stacked tensors hold b ingredients (or directions) of one parameter as one [b, *shape] tensor.
`combine_` adds a weighted sum of the rows into a tensor; `project` takes the inner product of a
gradient with each row. Both compute in the output's / gradient's dtype, so ingredients may be
stored in bf16 while accumulation stays in fp32 or better. `project_block` works on whatever
ingredients a process holds: sharded across processes, only the b x L results need summing.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .layers import Grouping


def combine_(out: torch.Tensor, coeffs: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """out += sum_j coeffs[j] * stacked[j], in out's dtype; returns out."""
    if stacked.dtype == out.dtype:
        out.view(-1).addmv_(stacked.reshape(len(stacked), -1).t(), coeffs.to(out.dtype))
    else:
        for row, coeff in zip(stacked, coeffs.tolist()):
            out.add_(row, alpha=coeff)
    return out


def project(grad: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """<grad, stacked[j]> for every row j, in grad's dtype."""
    flat_grad = grad.reshape(-1)
    if stacked.dtype == grad.dtype:
        return stacked.reshape(len(stacked), -1) @ flat_grad
    return torch.stack([torch.dot(row.reshape(-1).to(grad.dtype), flat_grad) for row in stacked])


def project_block(grads: Mapping[str, torch.Tensor], stacked: Mapping[str, torch.Tensor], grouping: Grouping,
                  dtype: torch.dtype) -> torch.Tensor:
    """G[j, l] = sum over tensors t in group l of <grads[t], stacked[t][j]>: a b x L matrix."""
    b = len(next(iter(stacked.values())))
    out = torch.zeros(b, grouping.size, dtype=dtype, device=next(iter(grads.values())).device)
    for key, grad in grads.items():
        out[:, grouping.group_of[key]] += project(grad, stacked[key]).to(dtype)
    return out


def row_norms(stacked: Mapping[str, torch.Tensor], grouping: Grouping) -> torch.Tensor:
    """||stacked_{j, l}|| over each group's tensors, in float64: a b x L matrix."""
    b = len(next(iter(stacked.values())))
    squares = torch.zeros(b, grouping.size, dtype=torch.float64)
    for key, tensor in stacked.items():
        norms = torch.linalg.vector_norm(tensor.reshape(b, -1), dim=1, dtype=torch.float64)
        squares[:, grouping.group_of[key]] += norms.cpu() ** 2
    return squares.sqrt()


class Mix(torch.autograd.Function):
    """sum_j weights[j] * stacked[j] with a gradient for the weights only (stacked is data).

    Autograd keeps a reference to `stacked`, never a copy, so K resident ingredients cost K x D.
    """

    @staticmethod
    def forward(ctx, weights: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(stacked)
        out = torch.zeros(stacked.shape[1:], dtype=weights.dtype, device=stacked.device)
        return combine_(out, weights.detach(), stacked)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (stacked,) = ctx.saved_tensors
        return project(grad_out, stacked).to(grad_out.dtype), None
