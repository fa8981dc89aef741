"""The ingredient store: fine-tuned state dicts on disk, checked as a set, loaded a block at a time.

An ingredient is `NAME.safetensors` (the state dict) plus `NAME.json` (hyperparameters, held-out
accuracy, base model id, content hash). The store checks keys, shapes and dtypes of the whole set
from the file headers and each file against its recorded hash before any tensor is read (a file
changed after it was written is refused), loads one ingredient, some of its tensors or a stacked
block lazily, builds the centre tensor by tensor (float64 accumulation), and prefetches the next
block on a background thread. It counts the ingredients it has handed out that are still alive,
so tests can assert the memory contract. Nothing here unpickles: external checkpoints go through `import_checkpoint`.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import math
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..runtime.atomic import atomic_path, write_json
from ..runtime.errors import IngredientError
from .portable_classifier import file_sha256

SUFFIX = ".safetensors"


@dataclass(frozen=True)
class Ingredient:
    """One fine-tuned model on disk: its weights file and its sidecar metadata."""

    path: Path
    meta: Mapping = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name[: -len(SUFFIX)] if self.path.name.endswith(SUFFIX) else self.path.stem

    @property
    def fit_acc(self) -> float | None:
        """Accuracy on the held-out fit role, as recorded when the ingredient was made."""
        value = self.meta.get("fit_acc")
        return None if value is None else float(value)


def sidecar_path(path: str | Path) -> Path:
    """The JSON sidecar that belongs to a weights file."""
    path = Path(path)
    return (path.with_name(path.name[: -len(SUFFIX)] + ".json") if path.name.endswith(SUFFIX)
            else path.with_suffix(".json"))


# A file changed less than this long before it is hashed is hashed again at every call: its next rewrite may fall in
# the same timestamp tick as this version (filesystem timestamps are coarse: a kernel tick, a second or two on some
# filesystems), so no stat could tell the two apart. Git's "racy" rule, with the wall clock for the index's mtime.
SETTLED_S = 2.0
_now = time.time  # the moment a file is hashed; a module reference, so a test can make a file look old


@functools.lru_cache(maxsize=4096)
def _hash_of_version(path: Path, version: tuple[int, ...]) -> str:  # `version`: what a rewrite of the file changes
    return file_sha256(path)


def unchanged_file_sha256(path: str | Path) -> str:
    """`file_sha256`, hashed once per version of the file in this process, so stores opened again on the same files
    (the ablation opens many) do not read them again. The version is the device, inode, size, mtime and ctime: a
    rewrite that keeps the size and puts the mtime back (os.utime) still moves the ctime, which no caller can set.

    Only a settled version is cached: one whose mtime and ctime are more than SETTLED_S seconds before the moment it
    is hashed. A rewrite comes after that moment, so its ctime lies in a later timestamp tick than the cached
    version's and the stat tells them apart; a file changed more recently is hashed at every call, so no rewrite
    within one tick is taken for the version hashed before it. (A file server whose clock runs more than SETTLED_S
    behind this machine's would defeat that; its files would only look settled sooner.)"""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    changed_ns = max(stat.st_mtime_ns, stat.st_ctime_ns)
    if _now() - changed_ns / 1e9 <= SETTLED_S:
        return file_sha256(resolved)
    return _hash_of_version(resolved, (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns))


def verify_sha256(path: str | Path, expected: str, *, recorded_in: str, fix: str) -> None:
    """Raise IngredientError unless the file's SHA-256 is `expected`, the hash recorded when it was written."""
    actual = unchanged_file_sha256(path)
    if actual != expected:
        raise IngredientError(
            f"{path}: sha256 {actual} does not match {expected} recorded in {recorded_in} when it was written; "
            f"the file was changed after it was written: {fix}"
        )


def verify_ingredient(ingredient: Ingredient) -> None:
    """Check an ingredient's file against the SHA-256 in its sidecar (an ingredient without one is not checked)."""
    expected = ingredient.meta.get("sha256")
    if expected is not None:
        verify_sha256(ingredient.path, expected, recorded_in=str(sidecar_path(ingredient.path)),
                      fix="re-run the stage that writes it (`dvc repro` / `dvc checkout`) or restore it")


def check_finite(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise if a floating tensor holds NaN or Inf, naming the source and the key."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise IngredientError(
                f"{source}: tensor '{key}' contains NaN or Inf; re-export this checkpoint or drop it from the set"
            )


def save_ingredient(state_dict: Mapping[str, torch.Tensor], path: str | Path, *,
                    meta: Mapping | None = None) -> Ingredient:
    """Write a state dict and its sidecar atomically; the sidecar records the file's SHA-256."""
    path = Path(path)
    if not path.name.endswith(SUFFIX):
        raise IngredientError(f"ingredient path {path} must end with {SUFFIX}")
    state = {key: tensor.detach().cpu().contiguous() for key, tensor in state_dict.items()}
    check_finite(state, str(path))
    with atomic_path(path) as tmp:  # the weights replace the old ones only once their sidecar is written
        save_file(state, str(tmp))
        full_meta = {**dict(meta or {}), "sha256": file_sha256(tmp)}
        write_json(sidecar_path(path), full_meta)
    return Ingredient(path=path, meta=full_meta)


def read_ingredient(path: str | Path) -> Ingredient:
    """Open an ingredient's sidecar (an absent sidecar gives empty metadata)."""
    path = Path(path)
    if not path.is_file():
        raise IngredientError(f"ingredient file {path} does not exist; run the sweep or check the path")
    side = sidecar_path(path)
    meta = json.loads(side.read_text()) if side.is_file() else {}
    return Ingredient(path=path, meta=meta)


def _header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Keys, shapes and dtypes from a safetensors header, without reading tensor data."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            result = {}
            for key in handle.keys():
                sl = handle.get_slice(key)
                result[key] = (tuple(sl.get_shape()), sl.get_dtype())
            return result
    except Exception as exc:  # safetensors raises its own error types
        raise IngredientError(
            f"{path} is not a readable safetensors file ({exc}); it may be truncated or in another format. "
            "Re-export it, or import external checkpoints with soup_pipeline.core.ingredients.import_checkpoint"
        ) from exc


class _Resident(dict):
    """A dict of tensors handed out by the store; the store counts it while it is alive."""


@dataclass
class BlockMemory:
    """The one allocation a block's tensors are views of: a byte buffer and each key's (offset, shape, dtype)."""

    buffer: torch.Tensor
    slots: dict[str, tuple[int, tuple[int, ...], torch.dtype]]

    def views(self) -> dict[str, torch.Tensor]:
        return {key: self.buffer[start : start + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
                for key, (start, shape, dtype) in self.slots.items()}

    def to(self, device: torch.device) -> "BlockMemory":
        """The same block on `device`, copied in one transfer (from pinned memory, without a host-side copy)."""
        moved = self.buffer.to(device, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()  # the pinned staging buffer may be let go after this
        return BlockMemory(moved, self.slots)


class IngredientStore:
    """A checked set of K ingredients, loaded lazily and counted while resident.

    Construction reads every header and hashes every file once against its sidecar's SHA-256,
    so a file changed after it was written is refused before any tensor is used.

    storage_dtype: hold loaded floating tensors in this dtype (e.g. torch.bfloat16); None keeps
    the file's dtype. Accumulations done by callers should be in float32 or better.
    """

    def __init__(self, ingredients: Sequence[Ingredient | str | Path], *, storage_dtype: torch.dtype | None = None):
        self.ingredients = [i if isinstance(i, Ingredient) else read_ingredient(i) for i in ingredients]
        if not self.ingredients:
            raise IngredientError("no ingredients given (K = 0); a soup needs at least one fine-tuned model")
        self.storage_dtype = storage_dtype
        self.header = self._check_compatible()
        for ingredient in self.ingredients:
            verify_ingredient(ingredient)
        self._lock = threading.Lock()
        self.resident_count = 0
        self.resident_bytes = 0
        self.peak_resident_count = 0
        self.peak_resident_bytes = 0

    def __len__(self) -> int:
        return len(self.ingredients)

    @property
    def keys(self) -> list[str]:
        return list(self.header)

    def _check_compatible(self) -> dict[str, tuple[tuple[int, ...], str]]:
        first = self.ingredients[0]
        reference = _header(first.path)
        bases = {i.meta.get("base_model") for i in self.ingredients} - {None}
        if len(bases) > 1:
            raise IngredientError(
                f"ingredients come from different base models {sorted(bases)}; "
                "soup only fine-tunes of one pre-trained model"
            )
        for ingredient in self.ingredients[1:]:
            header = _header(ingredient.path)
            missing, extra = sorted(set(reference) - set(header)), sorted(set(header) - set(reference))
            if missing or extra:
                raise IngredientError(
                    f"{ingredient.path} does not match {first.path}: missing keys {missing[:5]}, "
                    f"extra keys {extra[:5]}; all ingredients must be fine-tunes of the same architecture"
                )
            for key, (shape, dtype) in reference.items():
                if header[key] != (shape, dtype):
                    raise IngredientError(
                        f"{ingredient.path}: tensor '{key}' is {header[key][1]} {list(header[key][0])} but "
                        f"{first.path} has {dtype} {list(shape)}; "
                        "export all ingredients with the same architecture and dtype"
                    )
        return reference

    # -- residency accounting -------------------------------------------------------------
    def _track(self, tensors: dict[str, torch.Tensor], count: int) -> _Resident:
        resident = _Resident(tensors)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        with self._lock:
            self.resident_count += count
            self.resident_bytes += nbytes
            self.peak_resident_count = max(self.peak_resident_count, self.resident_count)
            self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)
        weakref.finalize(resident, self._release, count, nbytes)
        return resident

    def _release(self, count: int, nbytes: int) -> None:
        with self._lock:
            self.resident_count -= count
            self.resident_bytes -= nbytes

    def ingredient_bytes(self, keys: Iterable[str] | None = None) -> int:
        """Bytes one ingredient occupies once loaded (in the storage dtype)."""
        total = 0
        for key in self.keys if keys is None else keys:
            shape, _ = self.header[key]
            total += torch.Size(shape).numel() * self._loaded_dtype(key).itemsize
        return total

    def _loaded_dtype(self, key: str) -> torch.dtype:
        file_dtype = _SAFETENSORS_DTYPES[self.header[key][1]]
        if self.storage_dtype is not None and file_dtype.is_floating_point:
            return self.storage_dtype
        return file_dtype

    # -- loading -----------------------------------------------------------------------------
    def _read(self, index: int, keys: Sequence[str]) -> Iterable[tuple[str, torch.Tensor]]:
        ingredient = self.ingredients[index]
        try:
            handle_ctx = safe_open(str(ingredient.path), framework="pt")
        except Exception as exc:
            raise IngredientError(f"{ingredient.path} cannot be opened ({exc}); re-export it") from exc
        with handle_ctx as handle:
            for key in keys:
                try:
                    tensor = handle.get_tensor(key)
                except Exception as exc:
                    raise IngredientError(f"{ingredient.path}: tensor '{key}' cannot be read ({exc}); "
                                          "the file may be truncated, re-export it") from exc
                check_finite({key: tensor}, str(ingredient.path))
                if self.storage_dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(self.storage_dtype)
                yield key, tensor

    def load(self, index: int, keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Load one ingredient (all keys or the chosen ones) on the CPU; counted while alive."""
        keys = self.keys if keys is None else keys
        return self._track(dict(self._read(index, keys)), count=1)

    def load_stacked(self, indices: Sequence[int], keys: Sequence[str], *,
                     pin_memory: bool = False) -> dict[str, torch.Tensor]:
        """Load a block of ingredients as one [b, *shape] tensor per key; counted as b while alive.

        The block's tensors are views of one allocation (`BlockMemory`), so freeing a block hands its
        memory back whole: per-tensor allocations that come and go with every block would fragment
        the CPU heap, and the process's RSS would then grow with the number of blocks (with K).
        Consecutive keys of one shape and dtype are placed back to back, so that each such stack is one
        strided tensor (soups/engine/fused.py); other tensors start on an ALIGN-byte boundary.
        """
        slots, size, previous = {}, 0, None
        for key in keys:
            shape, _ = self.header[key]
            dtype = self._loaded_dtype(key)
            if (shape, dtype) != previous:
                size = -(-size // ALIGN) * ALIGN
            previous = (shape, dtype)
            slots[key] = (size, (len(indices), *shape), dtype)
            size += torch.Size((len(indices), *shape)).numel() * dtype.itemsize
        memory = BlockMemory(torch.empty(size, dtype=torch.uint8, pin_memory=pin_memory), slots)
        stacked = memory.views()
        for row, index in enumerate(indices):
            for key, tensor in self._read(index, keys):
                stacked[key][row].copy_(tensor)
        resident = self._track(stacked, count=len(indices))
        resident.memory = memory
        return resident

    def centre(self, keys: Sequence[str] | None = None, *,
               dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The uniform average of all ingredients, tensor by tensor (each key read from every ingredient in turn,
        accumulated in float64), so besides the result one tensor's sum and one ingredient's tensor are held.

        Non-floating entries must be identical across ingredients; a difference names the key.
        Floating results are returned in `dtype` (the files' dtype when None).
        """
        out = {}
        for key in self.keys if keys is None else keys:
            total = None
            for index in range(len(self)):
                tensor = self.load(index, [key])[key]
                if not tensor.is_floating_point():
                    if total is None:
                        total = tensor
                    elif not torch.equal(total, tensor):
                        raise IngredientError(
                            f"non-floating entry '{key}' differs between {self.ingredients[0].path} and "
                            f"{self.ingredients[index].path}; such entries must be identical across ingredients"
                        )
                elif total is None:
                    total = tensor.to(torch.float64, copy=True)
                else:
                    total += tensor.to(torch.float64)
            if total.is_floating_point():
                total = (total / len(self)).to(dtype or _SAFETENSORS_DTYPES[self.header[key][1]])
            out[key] = total
        return out


ALIGN = 64  # byte alignment of each tensor inside a block's single allocation

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class BlockPrefetcher:
    """Loads the next block on a background thread while the current one trains.

    `blocks` is the sequence of index lists in the order they will be requested. On a CUDA
    device the next block is staged in pinned host memory in the background and copied to the
    device only when it is asked for, after the previous block was let go: the device holds one
    block at a time (b ingredients), the host the staged one. With `enabled=False` each block is
    loaded when asked for, so at most one block is resident anywhere.
    """

    def __init__(self, store: IngredientStore, blocks: Sequence[Sequence[int]], keys: Sequence[str], *,
                 enabled: bool = True, device: torch.device | str = "cpu"):
        self.store, self.blocks, self.keys = store, [list(b) for b in blocks], list(keys)
        self.device = torch.device(device)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1) if enabled else None
        self._pending: dict[int, concurrent.futures.Future] = {}

    def _stage(self, position: int) -> dict[str, torch.Tensor]:
        return self.store.load_stacked(self.blocks[position], self.keys, pin_memory=self.device.type == "cuda")

    def get(self, position: int) -> dict[str, torch.Tensor]:
        """The block at `position` (on the device); starts staging the one after it in the background."""
        future = self._pending.pop(position, None)
        block = future.result() if future is not None else self._stage(position)
        if self.device.type == "cuda":  # one copy of the whole allocation, so the tensors keep their layout
            block.memory = block.memory.to(self.device)
            block.update(block.memory.views())  # replaced in place, so the store keeps counting the block
        if self._pool is not None and position + 1 < len(self.blocks):
            self._pending[position + 1] = self._pool.submit(self._stage, position + 1)
        return block

    def close(self) -> None:
        """Stop the background thread and drop any block it loaded ahead."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()

    def __enter__(self) -> "BlockPrefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_state_file(path: str | Path, *, strip_prefix: str = "") -> dict[str, torch.Tensor]:
    """A state dict from safetensors or `torch.load(weights_only=True)`: never plain pickle.

    A `{"state_dict": ...}` wrapper is unwrapped and `strip_prefix` removed from the keys.
    Pickles that carry code are refused by the restricted loader without running it.
    """
    path = Path(path)
    if not path.is_file():
        raise IngredientError(f"checkpoint {path} does not exist")
    try:
        if path.name.endswith(SUFFIX):
            with safe_open(str(path), framework="pt") as handle:
                state = {key: handle.get_tensor(key) for key in handle.keys()}
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise IngredientError(
            f"{path} was refused by the restricted loader (safetensors or torch.load(weights_only=True)): {exc}. "
            "It may carry code or be damaged; re-save it with safetensors or as a plain state dict of tensors"
        ) from exc
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise IngredientError(f"{path} does not hold a state dict of tensors; export model.state_dict() and retry")
    return {str(key).removeprefix(strip_prefix): tensor for key, tensor in state.items()}


def import_checkpoint(source: str | Path, destination: str | Path, *, meta: Mapping | None = None,
                      strip_prefix: str = "") -> Ingredient:
    """Turn an external checkpoint (e.g. one of the public model-soups fine-tunes) into an ingredient."""
    state = read_state_file(source, strip_prefix=strip_prefix)
    return save_ingredient(state, destination, meta={"imported_from": str(source), **dict(meta or {})})
