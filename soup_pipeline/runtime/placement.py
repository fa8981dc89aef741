"""Where each job of the pipeline runs: on CUDA, a sweep's members and the soups dealt round robin over the visible
GPUs (at most `per_device` fine-tunes on one GPU at a time), a torchrun rank on its own GPU; on the CPU, as before.

The assignment is a pure function of the device setting, the number of visible GPUs, the job's slot (a member id, a
soup's place in `soup.built`, a model's place in the evaluation) and the torchrun local rank, so the flow and a
`dvc repro` stage put a job on the same GPU. On Dask each fine-tune asks for one `GPU` worker resource and runs on
that worker's GPU."""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence, TypeVar

import torch

from .errors import SoupError

CPU = "cpu"
T = TypeVar("T")


def visible_gpus() -> int:
    """How many CUDA GPUs this process sees."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def spread_devices(setting: str, cuda_count: int, key: str = "sweep.device") -> list[str]:
    """The devices jobs spread over: every visible GPU for "cuda" (and for "auto" where there is one), the one named
    for "cuda:i" or "cpu". `key` names the setting in errors."""
    if setting == "auto":
        setting = "cuda" if cuda_count else CPU
    if setting.startswith("cuda") and not cuda_count:
        raise SoupError(f"{key} {setting!r} asked for but no CUDA GPU is visible; use auto or cpu")
    if setting == "cuda":
        return [f"cuda:{index}" for index in range(cuda_count)]
    if setting.startswith("cuda:") and int(setting.split(":")[1]) >= cuda_count:
        raise SoupError(f"{key} {setting!r}: only {cuda_count} GPU(s) are visible "
                        f"(cuda:0 to cuda:{cuda_count - 1})")
    return [setting]


def dealt_device(slot: int, devices: Sequence[str]) -> str:
    """The device of job `slot`: dealt round robin (a member by its id, so growing the sweep moves no member)."""
    return devices[slot % len(devices)]


def placed_device(setting: str, slot: int, cuda_count: int, *, local_rank: int | None = None,
                  key: str = "sweep.device") -> str:
    """The device of job `slot` under `setting`: a torchrun rank's own GPU (`local_rank`) where the setting names no
    GPU index, else dealt round robin over `spread_devices`."""
    devices = spread_devices(setting, cuda_count, key)
    if local_rank is not None and setting in ("auto", "cuda") and devices[0] != CPU:
        if local_rank >= cuda_count:
            raise SoupError(f"{key} {setting!r}: local rank {local_rank} has no GPU of its own ({cuda_count} visible); "
                            f"run at most {cuda_count} processes per node")
        return f"cuda:{local_rank}"
    return dealt_device(slot, devices)


def device_for(setting: str, slot: int, key: str) -> torch.device:
    """`placed_device` for this process: the GPUs it sees, and its local rank when torchrun started it."""
    local_rank = int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else None
    return torch.device(placed_device(setting, slot, visible_gpus(), local_rank=local_rank, key=key))


def rank_devices(setting: str, nproc: int, key: str) -> list[str]:
    """The devices of local ranks 0 to nproc - 1 of a job torchrun launches on this node (`placed_device` of each)."""
    return [placed_device(setting, 0, visible_gpus(), local_rank=rank, key=key) for rank in range(nproc)]


@functools.lru_cache(maxsize=None)
def device_slots(per_device: int) -> "DeviceSlots":
    """The process's slots for `per_device` (one set shared by every thread of the sweep)."""
    return DeviceSlots(per_device)


class DeviceSlots:
    """At most `per_device` holders of one device at a time among the threads of a process: of each GPU (the thread
    task runner's fine-tunes), and of the CPU too with `cpu` (else the runner's workers limit it)."""

    def __init__(self, per_device: int, *, cpu: bool = False):
        self.per_device = per_device
        self.cpu = cpu
        self._slots: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def hold(self, device: str) -> Iterator[None]:
        """Wait for a free slot of `device`, hold it for the block."""
        if device == CPU and not self.cpu:
            yield
            return
        with self._lock:
            slot = self._slots.setdefault(device, threading.BoundedSemaphore(self.per_device))
        with slot:
            yield

    @contextlib.contextmanager
    def hold_all(self, devices: Sequence[str]) -> Iterator[None]:
        """Hold a slot of each of `devices` for the block, taken in one order by every holder (so two holders of
        overlapping sets never wait on each other)."""
        with contextlib.ExitStack() as held:
            for device in sorted(set(devices)):
                held.enter_context(self.hold(device))
            yield


def on_devices(jobs: Sequence[Callable[[torch.device], T]], devices: Sequence[torch.device]) -> list[T]:
    """Run job i on devices[i] and return their results in order: the jobs of one device one after another, those of
    different devices side by side (a thread per device); all in this thread where there is one device."""
    queues: dict[torch.device, list[int]] = {}
    for index, device in enumerate(devices):
        queues.setdefault(device, []).append(index)
    results: dict[int, T] = {}

    def run_queue(device: torch.device) -> None:
        for index in queues[device]:
            results[index] = jobs[index](device)

    if len(queues) == 1:
        run_queue(next(iter(queues)))
    else:
        with ThreadPoolExecutor(max_workers=len(queues), thread_name_prefix="device") as pool:
            for done in [pool.submit(run_queue, device) for device in queues]:
                done.result()
    return [results[index] for index in range(len(jobs))]
