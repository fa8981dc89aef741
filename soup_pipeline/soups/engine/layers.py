"""Layer grouping: which mixable tensors share one mixing coefficient."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import model_validator

from ...core.settings import Strict
from ...runtime.errors import SoupError

GroupingName = Literal["tensor", "block", "model"] | list[str]  # a named grouping, or regex patterns (group_layers)

# A transformer block index in common naming schemes: resblocks.3., layers.3., blocks.3., h.3., layer.3.
_BLOCK = re.compile(r"^(.*?\b(?:resblocks|layers|blocks|h|layer)\.\d+)\.")


@dataclass(frozen=True)
class Grouping:
    """L groups over the mixable keys: `names[l]` and, per key, its group index."""

    names: list[str]
    group_of: dict[str, int]

    @property
    def size(self) -> int:
        return len(self.names)


def _from_labels(keys: list[str], labels: list[str]) -> Grouping:
    names: list[str] = []
    index: dict[str, int] = {}
    group_of = {}
    for key, label in zip(keys, labels):
        if label not in index:
            index[label] = len(names)
            names.append(label)
        group_of[key] = index[label]
    return Grouping(names=names, group_of=group_of)


def group_layers(keys: list[str], grouping: str | list[str]) -> Grouping:
    """Group mixable keys.

    "tensor": one group per tensor (weight and bias separate; the default for the "+" methods).
    "model": one group for the whole model (the non-layer-wise methods).
    "block": one group per transformer block; tensors outside blocks keep their own group.
    [patterns]: a key joins the first regex that matches it (by re.search); unmatched keys keep
    their own group.
    """
    if not keys:
        raise SoupError("the model has no floating-point parameters to mix")
    if grouping == "tensor":
        return _from_labels(keys, keys)
    if grouping == "model":
        return _from_labels(keys, ["model"] * len(keys))
    if grouping == "block":
        labels = []
        for key in keys:
            match = _BLOCK.match(key)
            labels.append(match.group(1) if match else key)
        return _from_labels(keys, labels)
    if isinstance(grouping, (list, tuple)):
        try:
            patterns = [re.compile(p) for p in grouping]
        except re.error as exc:
            raise SoupError(f"grouping: bad regex pattern ({exc}); give valid Python regular expressions") from None
        labels = [next((p.pattern for p in patterns if p.search(key)), key) for key in keys]
        return _from_labels(keys, labels)
    raise SoupError(f"grouping: unknown value {grouping!r}; use 'tensor', 'block', 'model' or a list of regex patterns")


class LayerwiseParams(Strict):
    """The layer grouping of a "+" method (one coefficient per group and ingredient)."""

    grouping: GroupingName = "tensor"  # "tensor" (the paper's "+"), "block", "model", or regex patterns

    @model_validator(mode="after")
    def _patterns(self) -> "LayerwiseParams":
        if isinstance(self.grouping, list) and not self.grouping:
            raise ValueError("grouping: an empty pattern list; give regex patterns or 'tensor', 'block', 'model'")
        return self


class Grid(Strict):
    """Candidate settings of a method: one list per parameter, every combination a candidate, each fitted on fit
    data; the lowest select loss is kept (soups/methods/search.py). `SETS` names the parameter each list sets."""

    SETS: ClassVar[dict[str, str]] = {}

    @model_validator(mode="after")
    def _not_empty(self) -> "Grid":
        for name in self.SETS:
            if not getattr(self, name):
                raise ValueError(f"search.{name}: empty; list at least one candidate")
        return self


class SearchParams(Grid):
    """The grid of a hyperplane soup: layer groupings x coefficient learning rates x weight decays."""

    SETS: ClassVar[dict[str, str]] = {"groupings": "grouping", "lrs": "lr", "weight_decays": "weight_decay"}
    groupings: list[GroupingName] = ["tensor", "block", "model"]  # candidate layer groupings
    lrs: list[float] = [0.05, 0.1]  # candidate coefficient learning rates
    weight_decays: list[float] = [0.0]  # candidate coefficient weight decays (towards the uniform soup)

    @model_validator(mode="after")
    def _positive(self) -> "SearchParams":
        if any(lr <= 0 for lr in self.lrs) or any(decay < 0 for decay in self.weight_decays):
            raise ValueError(f"search: lrs {self.lrs} must be > 0 and weight_decays {self.weight_decays} >= 0")
        return self


class SearchableParams(LayerwiseParams):
    """A "+" method that may choose its grouping, lr and weight decay on select data (grouping: auto)."""

    grouping: GroupingName | Literal["auto"] = "tensor"  # auto: the candidate of `search` with the lowest select loss
    search: SearchParams = SearchParams()  # the candidates of grouping: auto
