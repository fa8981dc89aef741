"""Souping methods behind a small registry: a method is one module declaring its spec plus one line here."""

from __future__ import annotations

from ..config import SoupParams
from ..errors import SoupError
from ..ingredients import IngredientStore
from ..meters import measure
from . import ensemble, greedy, hyperplane, learned, search, uniform
from .base import Method, MethodSpec, Objective, SoupResult, resolve_device

SPECS: dict[str, MethodSpec] = {spec.name: spec for module in (uniform, greedy, learned, hyperplane, search, ensemble)
                                for spec in module.SPECS}
METHODS: dict[str, Method] = {name: spec.run for name, spec in SPECS.items()}
SOUPS = [name for name, spec in SPECS.items() if spec.kind == "soup"]  # what can be built (one stage each)


def get_spec(name: str) -> MethodSpec:
    """The spec registered under `name`; an unknown name lists the known ones."""
    if name not in SPECS:
        raise SoupError(f"unknown soup method {name!r}; choose one of {sorted(SPECS)}")
    return SPECS[name]


def check_auto_grouping(name: str, grouping) -> None:
    """grouping: auto is refused for a layer-wise method that cannot search."""
    spec = get_spec(name)
    if grouping == "auto" and spec.layerwise and spec.search == "no":
        raise SoupError(f"soup.grouping: auto is not available for {name}; give it a fixed grouping "
                        f"('tensor', 'block', 'model') or use one of {sorted(n for n, s in SPECS.items() if s.search != 'no')}")


def get_method(name: str, params: SoupParams | None = None) -> Method:
    """The method registered under `name`, made to search the grid when `params.grouping` is auto."""
    spec = get_spec(name)
    if params is not None and params.grouping == "auto":
        check_auto_grouping(name, params.grouping)
        if spec.search == "auto":
            return search.with_search(spec.run)
    return spec.run


def run_method(name: str, store: IngredientStore, objective: Objective, params: SoupParams, **options) -> SoupResult:
    """Run one method, timing it and measuring its peak memory (CPU RSS; CUDA allocator on a GPU)."""
    method = get_method(name, params)
    with measure(resolve_device(params.device)) as meter:
        result = method(store, objective, params, name=name, **options)
    result.seconds, result.peak_bytes = meter.seconds, meter.peak_bytes
    return result


__all__ = ["METHODS", "SOUPS", "SPECS", "MethodSpec", "Objective", "SoupResult", "check_auto_grouping", "get_method",
           "get_spec", "run_method"]
