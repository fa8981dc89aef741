"""A training run's own state of torch's global random generators, safe to use from concurrent threads.

Augmentation and batch order draw from explicit generators. What the model draws itself (dropout,
open_clip's patch dropout, attention dropout) and random initialisation use torch's global
generators, which every thread of a process shares: fine-tunes run in threads would interleave
their draws, and a member's bits would depend on its neighbours. `OwnGlobalRNG.active()` installs
the run's own state as the global one under a process-wide lock and takes it back afterwards, so
a member draws the same numbers in a thread beside others as alone in a process. Only model
construction and forward passes need it (a backward pass reuses the masks its forward drew), so
concurrent members share the lock for their forward passes only.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

_GLOBAL_GENERATORS = threading.Lock()  # one holder at a time may swap torch's global generator states


class OwnGlobalRNG:
    """torch's global CPU (and CUDA, for `device`) generator states of one run, as `torch.manual_seed(seed)` leaves
    them."""

    def __init__(self, seed: int, device: torch.device | str = "cpu"):
        device = torch.device(device)
        self._cuda = device if device.type == "cuda" else None
        self._cpu_state = torch.Generator().manual_seed(seed).get_state()
        self._cuda_state = None
        if self._cuda is not None:
            self._cuda_state = torch.Generator(device=self._cuda).manual_seed(seed).get_state()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Within the block, torch's global generators draw this run's numbers; others' states are kept intact."""
        with _GLOBAL_GENERATORS:
            outer_cpu = torch.get_rng_state()
            outer_cuda = torch.cuda.get_rng_state(self._cuda) if self._cuda is not None else None
            torch.set_rng_state(self._cpu_state)
            if self._cuda is not None:
                torch.cuda.set_rng_state(self._cuda_state, self._cuda)
            try:
                yield
            finally:
                self._cpu_state = torch.get_rng_state()
                torch.set_rng_state(outer_cpu)
                if self._cuda is not None:
                    self._cuda_state = torch.cuda.get_rng_state(self._cuda)
                    torch.cuda.set_rng_state(outer_cuda, self._cuda)
