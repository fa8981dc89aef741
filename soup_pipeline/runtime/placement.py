"""Where each fine-tune of a sweep runs: on CUDA, the sweep's members dealt round robin over the visible GPUs, at
most `per_device` of them on one GPU at a time; on the CPU, as before (one fine-tune per core).

The assignment is a pure function of the device setting, the number of visible GPUs and the member id, so the flow
and a `dvc repro` stage put member k on the same GPU. On Dask each fine-tune asks for one `GPU` worker resource and
runs on that worker's GPU."""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Iterator, Sequence

import torch

from .errors import SoupError

CPU = "cpu"


def visible_gpus() -> int:
    """How many CUDA GPUs this process sees."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def sweep_devices(setting: str, cuda_count: int) -> list[str]:
    """The devices a sweep spreads over: every visible GPU for "cuda" (and for "auto" where there is one), the one
    named for "cuda:i" or "cpu"."""
    if setting == "auto":
        setting = "cuda" if cuda_count else CPU
    if setting.startswith("cuda") and not cuda_count:
        raise SoupError(f"sweep.device {setting!r} asked for but no CUDA GPU is visible; use auto or cpu")
    if setting == "cuda":
        return [f"cuda:{index}" for index in range(cuda_count)]
    if setting.startswith("cuda:") and int(setting.split(":")[1]) >= cuda_count:
        raise SoupError(f"sweep.device {setting!r}: only {cuda_count} GPU(s) are visible "
                        f"(cuda:0 to cuda:{cuda_count - 1})")
    return [setting]


def member_device(member: int, devices: Sequence[str]) -> str:
    """The device of member `member`: dealt round robin by member id (so growing the sweep moves no member)."""
    return devices[member % len(devices)]


@functools.lru_cache(maxsize=None)
def device_slots(per_device: int) -> "DeviceSlots":
    """The process's slots for `per_device` (one set shared by every thread of the sweep)."""
    return DeviceSlots(per_device)


class DeviceSlots:
    """At most `per_device` holders of one GPU at a time among the threads of a process (the thread task runner's
    fine-tunes); the CPU is not limited here (the runner's workers are)."""

    def __init__(self, per_device: int):
        self.per_device = per_device
        self._slots: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def hold(self, device: str) -> Iterator[None]:
        """Wait for a free slot of `device`, hold it for the block."""
        if device == CPU:
            yield
            return
        with self._lock:
            slot = self._slots.setdefault(device, threading.BoundedSemaphore(self.per_device))
        with slot:
            yield
