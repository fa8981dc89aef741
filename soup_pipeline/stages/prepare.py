"""Stage `prepare`: build and check the splits, and record what they hold.

The splits are deterministic functions of params (and, for real data, of the files), so later
stages rebuild them; the manifest written here holds a SHA-256 of each split, so that DVC reruns
everything downstream when the data change, and nothing when they do not.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from ..config import Params
from ..core.data import dataset_labels
from ..runtime.atomic import write_json
from ..workspace.loading import load_splits
from ..workspace.paths import StagePaths

SPLITS = ("pretrain", "train", "fit", "select", "test", "test_shift")


def dataset_sha256(dataset: Dataset) -> str:
    """A content hash: tensor bytes for tensor data sets, file names, sizes and labels for image folders."""
    digest = hashlib.sha256()
    if isinstance(dataset, TensorDataset):
        for tensor in dataset.tensors:
            digest.update(tensor.contiguous().numpy().tobytes())
    elif isinstance(dataset, Subset):
        digest.update(dataset_sha256(dataset.dataset).encode())
        digest.update(torch.as_tensor(dataset.indices).numpy().tobytes())
    else:
        for path, label in getattr(dataset, "samples", []):
            digest.update(f"{path}:{Path(path).stat().st_size}:{label}".encode())
        digest.update(str(len(dataset)).encode())
    return digest.hexdigest()


def run(params: Params, root: str | Path) -> dict:
    """Write runs/data/manifest.json: sizes, class counts, class names, templates and a SHA-256 per
    split (and, for the embedded default, how many distinct source images each split holds)."""
    splits = load_splits(params)
    manifest = {
        "source": params.data.source,
        "classnames": list(splits.classnames),
        "templates": list(splits.templates),
        "splits": {name: {"size": len(ds), "class_counts": torch.bincount(dataset_labels(ds)).tolist(),
                          "sha256": dataset_sha256(ds)}
                   for name in SPLITS if (ds := getattr(splits, name)) is not None},
    }
    for name, sources in (splits.sources or {}).items():
        manifest["splits"][name]["source_images"] = len(sources.unique())
    write_json(StagePaths(Path(root)).data_manifest, manifest)
    return manifest
