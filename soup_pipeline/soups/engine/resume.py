"""MEHL-Soup(+) checkpoints between blocks: one safetensors file, written atomically, never pickled.

The optimizer is fresh for every block, so at a block boundary the state is: the coefficients X,
the direction norms seen so far, the soup's parameters, the held-out stream (generator, order,
position), the loss history and the index of the next block. The ingredient permutations are
derived from the seed, so they need no saving. The file lives under a folder named by a
key of the inputs, so a run with other inputs never picks up a foreign state.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ...core.ingredients import IngredientStore
from ...runtime.atomic import atomic_path

STATE_FILE = "mehl_state.safetensors"


def resume_key(store: IngredientStore, settings: dict) -> str:
    """Hash of the ingredients' identities (content hash when known) and the run's settings."""
    identities = [i.meta.get("sha256") or f"{i.path.resolve()}:{i.path.stat().st_size}:{i.path.stat().st_mtime_ns}"
                  for i in store.ingredients]
    payload = json.dumps({"ingredients": identities, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def state_path(resume_dir: str | Path, key: str) -> Path:
    """Where the state of the run with resume key `key` is kept."""
    return Path(resume_dir) / key / STATE_FILE


def save_state(path: Path, *, next_block: int, X: torch.Tensor, norms: torch.Tensor, soup: dict[str, torch.Tensor],
               stream: dict[str, torch.Tensor], history: list[float]) -> None:
    """Write the state after a block, atomically."""
    tensors = {"X": X, "norms": norms, "history": torch.tensor(history, dtype=torch.float64)}
    tensors.update({f"soup.{k}": v.detach().cpu().contiguous() for k, v in soup.items()})
    tensors.update({f"stream.{k}": v for k, v in stream.items()})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"next_block": str(next_block)})


def load_state(path: Path) -> dict | None:
    """The saved state, or None when there is none."""
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        next_block = int(handle.metadata()["next_block"])
    tensors = load_file(str(path))
    return {
        "next_block": next_block,
        "X": tensors["X"],
        "norms": tensors["norms"],
        "history": tensors["history"].tolist(),
        "soup": {k[len("soup."):]: v for k, v in tensors.items() if k.startswith("soup.")},
        "stream": {k[len("stream."):]: v for k, v in tensors.items() if k.startswith("stream.")},
    }
