"""Checkpoint keys as teams have them, mapped onto the classifier's: ordered rules, keys to drop, known layouts.

A rule renames the keys that start with its `prefix` (or match its `regex` at the start) by replacing that part
with `to`; the first rule that matches a key wins, and a key no rule matches keeps its name. `drop` patterns
(regexes matched at the start of a key) name keys to ignore, such as a text tower. A checkpoint in the layout of
the public model-soups fine-tunes (Wortsman et al., 2022: a CLIP wrapper `model.*` whose image tower is
`model.visual.*`, and `classification_head.weight` / `.bias` on the normalised features, the logit scale folded
into the head) is recognised without configuration: its image tower becomes `visual.*`, its head `head.*` with its
bias, the rest of the CLIP is dropped and the classifier's logit scale is 1, so the logits are the model-soups
forward pass itself. A key that ends up outside the classifier is refused, naming it and a rule that would place it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from ..runtime.errors import IngredientError

HEAD_BIAS = "head.bias"  # present when the classifier's head has a bias (`classifier_spec(..., head_bias=True)`)


@dataclass(frozen=True)
class KeyRule:
    """Rename a key starting with `prefix` (or matching `regex` at its start): that part becomes `to`."""

    to: str
    prefix: str | None = None
    regex: str | None = None

    def __post_init__(self) -> None:
        if (self.prefix is None) == (self.regex is None):
            raise IngredientError(f"key rule to {self.to!r} needs exactly one of prefix and regex")
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise IngredientError(f"key rule regex {self.regex!r} does not compile ({exc}); "
                                  "fix imports.key_map") from exc

    @property
    def pattern(self) -> str:
        return self.regex if self.regex is not None else re.escape(self.prefix)

    def apply(self, key: str) -> str | None:
        """The renamed key, or None when the rule does not match it."""
        match = re.match(self.pattern, key)
        return None if match is None else match.expand(self.to) + key[match.end():]

    def describe(self) -> str:
        return f"{{prefix: {self.prefix!r}, to: {self.to!r}}}" if self.prefix is not None else \
            f"{{regex: {self.regex!r}, to: {self.to!r}}}"


@dataclass(frozen=True)
class KeyMap:
    """Ordered rules, patterns of keys to drop, and tensors the classifier needs that the checkpoint lacks."""

    rules: tuple[KeyRule, ...] = ()
    drop: tuple[str, ...] = ()
    fill: Mapping[str, float] = field(default_factory=dict)
    name: str = "imports.key_map"

    def __bool__(self) -> bool:
        return bool(self.rules or self.drop or self.fill)


MODEL_SOUPS = KeyMap(
    rules=(KeyRule(prefix="model.visual.", to="visual."), KeyRule(prefix="classification_head.", to="head.")),
    drop=(r"model\.(?!visual\.)",),  # the rest of the CLIP wrapper: its text tower, token embedding, logit scale
    fill={"logit_scale": 1.0},  # the model-soups head holds the logit scale already
    name="the model-soups layout",
)


def detect_layout(keys: Sequence[str]) -> KeyMap:
    """The known layout these keys are in (today: the model-soups fine-tunes), else no mapping."""
    names = set(keys)
    if "classification_head.weight" in names and any(key.startswith("model.visual.") for key in names):
        return MODEL_SOUPS
    return KeyMap()


def remap(state: Mapping[str, torch.Tensor], key_map: KeyMap, expected: Sequence[str], *, source: str) -> dict:
    """`state` with `key_map` applied: dropped keys gone, renamed keys, the fills added; every key left must be one of
    `expected` (the classifier's keys; with `head.bias` where its head may take a bias) and named once, else an error
    names the key and a rule that would place it."""
    renamed = [(key, new_name(key, key_map)) for key in state if not any(re.match(p, key) for p in key_map.drop)]
    allowed = set(expected)
    unplaced = [(original, new) for original, new in renamed if new not in allowed]
    if unplaced:
        original, new = unplaced[0]
        raise IngredientError(
            f"{source}: key {original!r} (after {key_map.name or 'no mapping'}: {new!r}) is not a key of the "
            f"classifier ({len(unplaced)} such keys); {suggest_rule(original, expected)}, or drop it with imports.drop")
    targets = [new for _, new in renamed]
    twice = sorted({new for new in targets if targets.count(new) > 1})
    if twice:
        raise IngredientError(f"{source}: several keys become {twice[:3]} under {key_map.name}; "
                              "make the rules tell them apart")
    mapped = {new: state[original] for original, new in renamed}
    for key, value in key_map.fill.items():
        mapped.setdefault(key, torch.tensor(float(value)))
    return mapped


def new_name(key: str, key_map: KeyMap) -> str:
    """The key after the first rule that matches it (unchanged when none does)."""
    return next((renamed for rule in key_map.rules if (renamed := rule.apply(key)) is not None), key)


def suggest_rule(key: str, expected: Sequence[str]) -> str:
    """A rule that would place `key`: the one classifier key ending in the longest dotted suffix of `key` that no
    other classifier key ends in gives the prefix to swap."""
    parts = key.split(".")
    for start in range(1, len(parts)):
        suffix = ".".join(parts[start:])
        matches = [name for name in expected if name == suffix or name.endswith("." + suffix)]
        if len(matches) == 1:
            target = matches[0]
            prefix, to = ".".join(parts[:start]) + ".", target[: len(target) - len(suffix)]
            return (f"a rule such as {KeyRule(prefix=prefix, to=to).describe()} in imports.key_map "
                    f"would place it at {target!r}")
    return "no classifier key ends like it: check model.arch"
