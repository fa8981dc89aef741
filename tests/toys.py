"""Tiny models and ingredient sets for the soup-engine tests."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from soup_pipeline.core.ingredients import IngredientStore, save_ingredient
from soup_pipeline.soups import Objective, params_from

DEVICE = os.environ.get("SOUP_TEST_DEVICE", "cpu")  # set to "cuda" to run the engine tests on a GPU


class Toy(nn.Module):
    """A few Linear / LayerNorm layers, with a float buffer and an integer buffer."""

    def __init__(self, dtype: torch.dtype = torch.float64, inputs: int = 6, classes: int = 3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(inputs, 12), nn.LayerNorm(12), nn.Tanh(), nn.Linear(12, classes))
        self.register_buffer("shift", torch.zeros(inputs))
        self.register_buffer("steps", torch.tensor(7))
        self.to(dtype)

    def forward(self, x):
        return self.net(x - self.shift)


class Blocks(nn.Module):
    """A stem, two residual blocks of one shape and a head: runs of same-shape tensors that cross block groups."""

    def __init__(self, dtype: torch.dtype = torch.float64, inputs: int = 6, classes: int = 3, width: int = 8):
        super().__init__()
        self.stem = nn.Linear(inputs, width)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width)) for _ in range(2)])
        self.head = nn.Linear(width, classes)
        self.to(dtype)

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return self.head(h)


class Deep(nn.Module):
    """A stem, `depth` residual layers of one width and a head: many tensors, none of them a large share of the model
    (the memory a method holds per tensor stays small beside the model's size)."""

    def __init__(self, dtype: torch.dtype = torch.float64, inputs: int = 6, classes: int = 3, width: int = 32,
                 depth: int = 32):
        super().__init__()
        self.stem = nn.Linear(inputs, width)
        self.blocks = nn.ModuleList([nn.Linear(width, width) for _ in range(depth)])
        self.head = nn.Linear(width, classes)
        self.to(dtype)

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return self.head(h)


def toy_data(n: int = 120, inputs: int = 6, seed: int = 0, dtype=torch.float64) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, inputs, generator=g, dtype=dtype)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x, y)


def toy_ingredients(folder: Path, K: int, *, dtype=torch.float64, spread: float = 0.3, seed: int = 0,
                    model: type[nn.Module] = Toy) -> IngredientStore:
    """K perturbations of the parameters of one random `model` (Toy), saved as ingredients with sidecar accuracies."""
    torch.manual_seed(seed)
    base = model(dtype)
    parameters = dict(base.named_parameters())
    paths = []
    for k in range(K):
        state = {key: (v + spread * torch.randn_like(v)) if key in parameters else v.clone()
                 for key, v in base.state_dict().items()}
        if "shift" in state:
            state["shift"] = state["shift"] + 0.01 * k  # a float buffer: averaged uniformly
        paths.append(save_ingredient(state, folder / f"toy{k:02d}.safetensors",
                                     meta={"fit_acc": 0.5 + 0.01 * k, "base_model": "toy"}))
    return IngredientStore(paths)


def toy_objective(dtype=torch.float64, batch_size: int = 32, n: int = 120) -> Objective:
    return Objective(model_factory=lambda: Toy(dtype), fit=toy_data(n, dtype=dtype), batch_size=batch_size)


def params_for(name: str, **settings):
    """Method `name`'s typed parameters from shared test settings; keys it does not declare are left out."""
    return params_from(name, settings)
