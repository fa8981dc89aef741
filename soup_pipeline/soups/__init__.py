"""Souping methods behind a small registry: a method is one module plus one line here."""

from __future__ import annotations

import functools
from typing import Callable

from ..config import AUTO_GROUPING_REFUSED, SoupParams
from ..errors import SoupError
from ..ingredients import IngredientStore
from ..meters import measure
from .base import Objective, SoupResult, resolve_device
from .ensemble import ensemble
from .greedy import greedy_soup
from .hyperplane import hl_soup, hyperplane_soup
from .learned import learned_soup
from .search import with_search
from .uniform import uniform_soup

Method = Callable[..., SoupResult]

METHODS: dict[str, Method] = {
    "uniform": uniform_soup,
    "greedy": greedy_soup,
    "ensemble": ensemble,
    "learned_soup": functools.partial(learned_soup, layerwise=False),
    "learned_soup_plus": functools.partial(learned_soup, layerwise=True),
    "hl_soup": functools.partial(hl_soup, layerwise=False),
    "hl_soup_plus": functools.partial(hl_soup, layerwise=True),
    "mehl_soup": functools.partial(hyperplane_soup, layerwise=False),
    "mehl_soup_plus": functools.partial(hyperplane_soup, layerwise=True),
    "mehl_soup_plus_matched": functools.partial(hyperplane_soup, layerwise=True, compute_matched=True),
    "mehl_soup_auto": with_search(functools.partial(hyperplane_soup, layerwise=True)),  # grouping, lr, wd chosen on select data
}
SEARCHABLE = ("hl_soup_plus", "mehl_soup_plus", "mehl_soup_plus_matched")  # run the `soup.search` grid under grouping: auto


def get_method(name: str, params: SoupParams | None = None) -> Method:
    """The method registered under `name` (searching the grid when `params.grouping` is auto); an unknown name lists the known ones."""
    if name not in METHODS:
        raise SoupError(f"unknown soup method {name!r}; choose one of {sorted(METHODS)}")
    if params is not None and params.grouping == "auto":
        if name in AUTO_GROUPING_REFUSED:
            raise SoupError(f"soup.grouping: auto is not available for {name}; give it a fixed grouping "
                            f"('tensor', 'block', 'model') or use one of {sorted(SEARCHABLE)} or mehl_soup_auto")
        if name in SEARCHABLE:
            return with_search(METHODS[name])
    return METHODS[name]


def run_method(name: str, store: IngredientStore, objective: Objective, params: SoupParams, **options) -> SoupResult:
    """Run one method, timing it and measuring its peak memory (CPU RSS; CUDA allocator on a GPU)."""
    method = get_method(name, params)
    with measure(resolve_device(params.device)) as meter:
        result = method(store, objective, params, name=name, **options)
    result.seconds, result.peak_bytes = meter.seconds, meter.peak_bytes
    return result


__all__ = ["METHODS", "Objective", "SoupResult", "get_method", "run_method"]
