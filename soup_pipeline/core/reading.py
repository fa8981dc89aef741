"""How batches are read: in the calling thread, or by DataLoader worker processes with pinned memory for a GPU.

Workers only read (decode files, apply the data set's own deterministic transform, collate): the caller draws the
order and every random number, so the batches hold the same bytes whatever the number of workers. Data sets held in
memory as tensors are read in the calling thread by default (a worker would only copy them); data sets read from
files get half the cores, at most four, on machines of four cores or more.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .batches import Inputs
from .data import TokenizedDataset, fetch_batch

MAX_AUTO_WORKERS = 4
MIN_CORES_FOR_WORKERS = 4


def held_in_memory(dataset: Dataset) -> bool:
    """Whether the data set (or the data set a subset selects from) holds its examples as tensors."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return isinstance(dataset, (TensorDataset, TokenizedDataset))


def resolve_workers(setting: int | None, dataset: Dataset) -> int:
    """The worker processes for reading `dataset`: the setting, or for None 0 for data held in memory, and for data
    read from files half the cores, at most four, where there are four or more (on fewer, workers take the cores
    the training needs: `benchmarks/throughput.py`)."""
    if setting is not None:
        return setting
    cores = os.cpu_count() or 1
    return 0 if held_in_memory(dataset) or cores < MIN_CORES_FOR_WORKERS else min(MAX_AUTO_WORKERS, cores // 2)


class _WholeBatches(Dataset):
    """A data set whose item is a whole batch: the examples of an index tensor, fetched together."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __getitem__(self, indices: torch.Tensor) -> tuple[Inputs, torch.Tensor]:
        return fetch_batch(self.dataset, indices)


def read_batches(dataset: Dataset, batches: Iterable[torch.Tensor], *, workers: int | None = 0,
                 device: torch.device | str = "cpu") -> Iterator[tuple[Inputs, torch.Tensor]]:
    """(inputs, targets) of each batch of example indices, in the order given; read by `workers` processes (None:
    `resolve_workers`), in pinned memory when `device` is a GPU."""
    workers = resolve_workers(workers, dataset)
    if workers == 0:
        return (fetch_batch(dataset, indices) for indices in batches)
    loader = DataLoader(_WholeBatches(dataset), sampler=list(batches), batch_size=None, num_workers=workers,
                        pin_memory=torch.device(device).type == "cuda")
    return iter(loader)


def sequential_batches(dataset: Dataset, batch_size: int, *, workers: int | None = 0,
                       device: torch.device | str = "cpu") -> Iterator[tuple[Inputs, torch.Tensor]]:
    """Batches in data set order, for evaluation."""
    return read_batches(dataset, torch.arange(len(dataset)).split(batch_size), workers=workers, device=device)
