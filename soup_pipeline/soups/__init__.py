"""Souping methods behind a small registry: a method is one module of `methods/` declaring its spec plus one line here.

`methods/` holds the methods, `engine/` the machinery they share, `comparators/` what soups are compared with or
checked against (the output ensemble, the basin diagnostic)."""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import ValidationError

from ..core.ingredients import IngredientStore
from ..core.settings import SoupSettings, format_validation_error
from ..runtime.allocator import map_large_allocations
from ..runtime.errors import SoupError
from ..runtime.meters import measure
from ..runtime.placement import device_for
from .comparators import ensemble
from .engine.base import Method, MethodSpec, Objective, SoupResult
from .engine.layers import SearchableParams
from .methods import dare, greedy, hyperplane, learned, model_stock, search, task_arithmetic, ties, uniform, wise_ft

SPECS: dict[str, MethodSpec] = {spec.name: spec for module in (uniform, greedy, learned, hyperplane, search,
                                                              task_arithmetic, ties, dare, model_stock, wise_ft,
                                                              ensemble)
                                for spec in module.SPECS}
SOUPS = [name for name, spec in SPECS.items() if spec.kind == "soup"]  # what can be built (one stage each)


def get_spec(name: str) -> MethodSpec:
    """The spec registered under `name`; an unknown name lists the known ones."""
    if name not in SPECS:
        raise SoupError(f"unknown soup method {name!r}; choose one of {sorted(SPECS)}")
    return SPECS[name]


def method_params(name: str, **values) -> SoupSettings:
    """The typed parameters of method `name` (its declared defaults where not given); a bad key is one SoupError."""
    try:
        return get_spec(name).params.model_validate(values)
    except ValidationError as exc:
        section = "refine" if get_spec(name).refines else "methods"
        raise SoupError(format_validation_error(exc, f"soup.{section}.{name}")) from None


def params_from(name: str, settings: Mapping[str, Any]) -> SoupSettings:
    """Method `name`'s typed parameters from settings shared by several methods: the keys it declares
    are used, the others ignored (for comparing methods under one set of settings)."""
    declared = get_spec(name).params.model_fields
    return method_params(name, **{key: value for key, value in settings.items() if key in declared})


def get_method(name: str, params: SoupSettings) -> Method:
    """The method registered under `name`, made to search its grid when it always does or its grouping is auto."""
    spec = get_spec(name)
    if not isinstance(params, spec.params):
        raise SoupError(f"{name} takes {spec.params.__name__}, not {type(params).__name__}; "
                        f"build them with method_params({name!r}, ...)")
    if spec.searched or (isinstance(params, SearchableParams) and params.grouping == "auto"):
        return search.with_search(spec.run)
    return spec.run


def run_method(name: str, store: IngredientStore, objective: Objective, params: SoupSettings, **options) -> SoupResult:
    """Run one method, timing it and measuring its peak memory (CPU RSS; CUDA allocator on a GPU).

    Large CPU buffers are mapped from here on (`allocator.map_large_allocations`), so the peak RSS
    of a blockwise method does not grow with K.
    """
    map_large_allocations()
    method = get_method(name, params)
    with measure(device_for(params.device, 0, "soup.device")) as meter:
        result = method(store, objective, params, name=name, **options)
    result.seconds, result.peak_bytes = meter.seconds, meter.peak_bytes
    return result


__all__ = ["SOUPS", "SPECS", "MethodSpec", "Objective", "SoupResult", "get_method", "get_spec", "method_params",
           "params_from", "run_method"]
