"""Timing and peak-memory meters: wall time, CPU RSS by sampling, CUDA by the allocator."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import psutil
import torch


@dataclass
class Measurement:
    """Wall time and peak memory above the baseline at the start of a measured block."""

    seconds: float = 0.0
    peak_bytes: dict[str, int] = field(default_factory=dict)


class _RssSampler(threading.Thread):
    """Polls this process's resident set size and keeps the maximum."""

    def __init__(self, interval_s: float):
        super().__init__(daemon=True)
        self.process = psutil.Process()
        self.interval_s = interval_s
        self.peak = self.process.memory_info().rss
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop_event.wait(self.interval_s)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, self.process.memory_info().rss)


@contextlib.contextmanager
def measure(device: torch.device | str = "cpu", *, interval_s: float = 0.005) -> Iterator[Measurement]:
    """Measure wall time, CPU RSS peak above the starting RSS, and the CUDA allocator peak."""
    device = torch.device(device)
    result = Measurement()
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        cuda_base = torch.cuda.memory_allocated(device)
    sampler = _RssSampler(interval_s)
    rss_base = sampler.peak
    sampler.start()
    start = time.perf_counter()
    try:
        yield result
    finally:
        if on_cuda:
            torch.cuda.synchronize(device)
        result.seconds = time.perf_counter() - start
        result.peak_bytes["cpu_rss"] = max(0, sampler.stop() - rss_base)
        if on_cuda:
            result.peak_bytes["cuda"] = max(0, torch.cuda.max_memory_allocated(device) - cuda_base)
