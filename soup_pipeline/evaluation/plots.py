"""PNG plots (matplotlib's Agg canvas; pyplot is never touched): they render offline, unlike DVC's HTML."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def plot_mixing_weights(beta: np.ndarray, ingredients: Sequence[str], layers: Sequence[str], path: str | Path) -> None:
    """Heatmap of beta (rows ingredients, columns layers), diverging around the uniform 1/K (the paper's Fig. 1)."""
    from matplotlib.colors import Normalize

    beta = np.asarray(beta, dtype=np.float64)
    k, n_layers = beta.shape
    centre = 1.0 / k
    half = max(float(np.abs(beta - centre).max()), 1e-12)
    figure = _figure(max(6.0, 0.15 * n_layers + 3), max(3.0, 0.35 * k + 1.5))
    axes = figure.add_subplot()
    image = axes.imshow(beta, aspect="auto", cmap="RdBu_r", norm=Normalize(centre - half, centre + half))
    axes.set_yticks(range(k), list(ingredients), fontsize=7)
    axes.set_xticks(range(n_layers), list(layers), rotation=90, fontsize=5)
    axes.set_xlabel("layer")
    axes.set_ylabel("ingredient")
    figure.colorbar(image, ax=axes, label="mixing weight beta")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def plot_methods(rows: Sequence[Mapping], path: str | Path,
                 columns: Sequence[str] = ("fit_acc", "select_acc", "test_acc", "shifted_test_acc")) -> None:
    """Grouped bars: one group per method, one bar per accuracy column."""
    methods = [row["method"] for row in rows]
    present = [c for c in columns if any(row.get(c) is not None for row in rows)]
    figure = _figure(max(6.0, 0.8 * len(methods) + 2), 4.0)
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(present))
    for i, column in enumerate(present):
        values = [row.get(column) or 0.0 for row in rows]
        axes.bar(np.arange(len(methods)) + i * width, values, width, label=column)
    low = min((row[c] for row in rows for c in present if row.get(c)), default=0.0)
    axes.set_ylim(max(0.0, low - 0.05), 1.0)
    axes.set_xticks(np.arange(len(methods)) + width * (len(present) - 1) / 2, methods, rotation=30, ha="right")
    axes.set_ylabel("accuracy")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def plot_curves(curves: Mapping[str, Sequence[tuple[float, float]]], path: str | Path, *, xlabel: str,
                ylabel: str) -> None:
    """One line per name through (x, y) points, e.g. test accuracy against the number of ingredients (Fig. 2)."""
    figure = _figure(6.0, 4.0)
    axes = figure.add_subplot()
    for name, points in curves.items():
        xs, ys = zip(*points) if points else ((), ())
        axes.plot(xs, ys, marker="o", label=name)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
