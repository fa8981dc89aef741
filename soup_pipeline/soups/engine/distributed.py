"""MEHL-Soup(+) across processes with torch.distributed: each rank holds its share of a block's directions.

The b ingredients of a block are cut into contiguous shares of ceil(b / world size), one per rank;
a rank loads, holds and projects onto its share only, and steps the coefficients of its share
(AdamW is elementwise, so that is exactly the single-process update). What crosses ranks:

- per step, one parameter-sized sum: each rank's part of sum_k alpha_k d_k, all-reduced, so the
  soup theta = base + sum is the same on every rank (`Combiner`);
- per block, the K x L coefficients and direction norms of the block (`Ranks.assemble`);
- once, whether every rank starts from the same soup (`Ranks.same`): nodes souping in roots of their own must have
  restored the same saved progress.

Every rank runs the same forward and backward pass on the same fit mini-batch: the batch is not
split across ranks, which would add a second parameter-sized all-reduce per step (the gradient)
to save compute the method does not need to save; the point of the ranks is memory. torchrun
describes the group in the environment, on one node or several; `process_group` joins it (gloo on CPUs, NCCL on GPUs).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

from ...runtime.errors import SoupError
from .fused import BlockStep, FlatTensors, ShapeOrder

TIMEOUT = datetime.timedelta(minutes=10)  # a collective waiting longer than this fails the run
BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # an integer type of each element size


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes souping together (rank 0 of 1 when alone)."""

    rank: int = 0
    world: int = 1
    comm_device: torch.device = torch.device("cpu")  # where collectives run: the GPU under NCCL
    local_rank: int = 0  # its rank among the processes of its node (torchrun's LOCAL_RANK)

    @classmethod
    def current(cls) -> "Ranks":
        if dist.is_available() and dist.is_initialized():
            nccl = dist.get_backend() == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
            rank = dist.get_rank()
            return cls(rank, dist.get_world_size(), device, int(os.environ.get("LOCAL_RANK", rank)))
        return cls()

    @property
    def leader(self) -> bool:
        """The first rank of each node writes files and logs for its node: every rank holds the same soup, coefficients
        and progress, so each node's root gets them all (the same bytes, renamed into place, where nodes share one)."""
        return self.local_rank == 0

    def share(self, block: Sequence[int]) -> list[int]:
        """This rank's contiguous part of a block: at most ceil(b / world) ingredients (possibly none)."""
        size = -(-len(block) // self.world)
        return list(block[self.rank * size : (self.rank + 1) * size])

    def assemble(self, rows: torch.Tensor, block: Sequence[int]) -> torch.Tensor:
        """The block's rows from every rank's share (`rows` holds this rank's), on every rank."""
        if self.world == 1:
            return rows
        size = -(-len(block) // self.world)
        full = torch.zeros(len(block), *rows.shape[1:], dtype=rows.dtype, device=self.comm_device)
        start = min(self.rank * size, len(block))
        full[start : start + len(rows)] = rows
        # Each rank's rows sit at its share's offset among zeros, so the sum over ranks is the whole block: one
        # all-reduce gathers shares of unequal (even empty) size, where all_gather needs equal ones.
        dist.all_reduce(full)
        return full.to(rows.device)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def same(self, values: torch.Tensor) -> bool:
        """Whether every rank holds the same bits in `values` (compared by their sum as integers: in any order)."""
        if self.world == 1:
            return True
        bits = values.reshape(-1).view(BITS[values.element_size()]).sum(dtype=torch.int64)
        bounds = torch.stack([bits, -bits]).to(self.comm_device)
        dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
        return bool(bounds[0] == -bounds[1])


class Combiner:
    """out = base + sum over every rank's share of alpha_k d_k, through the block's step (`fused.block_step`).

    Alone, the sum is added to the base directly. With several ranks, each rank's partial sum goes
    into one flat parameter-sized buffer that is all-reduced in a single call, then added to the base.
    """

    def __init__(self, ranks: Ranks, like: FlatTensors, order: ShapeOrder):
        """like: the soup the descent starts from, which every rank must hold alike."""
        if not ranks.same(like.flat):
            raise SoupError("the ranks start from different soups: their nodes restored different saved progress (the "
                            "resume folder, runs/resume/METHOD in a pipeline root). Give every node the same copy of "
                            "that folder, or remove it on every node, and rerun")
        self.partial = FlatTensors.empty(order, like.flat) if ranks.world > 1 else None

    def __call__(self, out: FlatTensors, base: FlatTensors, alpha: torch.Tensor, step: BlockStep) -> None:
        """alpha: one row per tensor (T x this rank's share), as `mixing.per_tensor` gives it."""
        if self.partial is None:
            step.rebuild(out, base, alpha)
            return
        step.rebuild(self.partial, None, alpha)
        dist.all_reduce(self.partial.flat)
        torch.add(base.flat, self.partial.flat, out=out.flat)


def launched_world() -> int:
    """The number of processes torchrun started this one among (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[Ranks]:
    """Join the group torchrun describes (gloo on a CPU, NCCL on a GPU) for the block; alone outside torchrun."""
    if launched_world() <= 1 or dist.is_initialized():
        yield Ranks.current()
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    try:
        yield Ranks.current()
    finally:
        dist.destroy_process_group()
