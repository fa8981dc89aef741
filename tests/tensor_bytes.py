"""A meter of the tensor memory a piece of code holds: the bytes of the tensors it creates that are still alive."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    """While on, counts each storage that a torch operation creates (not one it was given: a view, an in-place
    result, a tensor from before) as long as a tensor on it is alive, and keeps the peak of their sum, in bytes.
    Tensors made outside torch's dispatcher (read from a file by safetensors) are not counted."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage address -> [its bytes, tensors on it alive]
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {leaf.untyped_storage().data_ptr() for leaf in tree_leaves((args, kwargs))
                 if isinstance(leaf, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._count(tensor, given)
        return out

    def _count(self, tensor: torch.Tensor, given: set[int]) -> None:
        storage = tensor.untyped_storage()
        address, nbytes = storage.data_ptr(), storage.nbytes()
        if address in self.live:
            self.live[address][1] += 1
        elif address in given or nbytes == 0:
            return
        else:
            self.live[address] = [nbytes, 1]
            self.now += nbytes
            self.peak = max(self.peak, self.now)
        weakref.finalize(tensor, self._release, address)

    def _release(self, address: int) -> None:
        entry = self.live[address]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[address]
