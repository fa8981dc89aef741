"""Which params keys a stage really reads: every field read of the `Params` tree is recorded, by dotted key,
while the stage runs (a `model_dump` reads every field under it; a method's settings record a key it takes
from its own section as `soup.methods.<method>.<key>` (`soup.refine.<method>.<key>`), one it inherits as
`soup.<key>`)."""

from __future__ import annotations

import contextlib
from typing import Iterator

from pydantic import BaseModel

from soup_pipeline.config import Params, SoupParams
from soup_pipeline.core.settings import SoupSettings, Strict


class ReadRecorder:
    """Dotted keys read from one `Params` (and the copies and method settings made from it)."""

    def __init__(self, params: Params):
        self.reads: set[str] = set()
        self._paths: dict[int, object] = {}  # id(model) -> its dotted prefix, or a resolver for method settings
        self._alive: list[BaseModel] = []  # keeps mapped models alive, so their ids are not reused
        self._muted = 0
        self.map(params, "")

    def map(self, model: BaseModel, prefix) -> None:
        self._paths[id(model)] = prefix
        self._alive.append(model)
        if isinstance(prefix, str):
            for name in type(model).model_fields:
                value = model.__dict__.get(name)
                if isinstance(value, BaseModel):
                    self.map(value, f"{prefix}{name}.")

    def key(self, model: BaseModel, name: str) -> str | None:
        prefix = self._paths.get(id(model))
        return prefix(name) if callable(prefix) else None if prefix is None else prefix + name

    def record(self, model: BaseModel, name: str) -> None:
        if self._muted or name not in type(model).model_fields:
            return
        value = model.__dict__.get(name)
        if isinstance(value, BaseModel):
            return
        key = self.key(model, name)
        if key is not None:
            self.reads.add(key)

    @contextlib.contextmanager
    def muted(self) -> Iterator[None]:
        self._muted += 1
        try:
            yield
        finally:
            self._muted -= 1


@contextlib.contextmanager
def recording(params: Params) -> Iterator[ReadRecorder]:
    """Record the keys read from `params` inside the block."""
    recorder = ReadRecorder(params)
    original = {"getattribute": Strict.__getattribute__, "dump": BaseModel.model_dump, "copy": BaseModel.model_copy,
                "method": SoupParams.method}

    def getattribute(self, name):
        value = original["getattribute"](self, name)
        if not name.startswith("_"):
            recorder.record(self, name)
        return value

    def model_dump(self, *args, **kwargs):
        with recorder.muted():
            dumped = original["dump"](self, *args, **kwargs)
            fields = [name for name in type(self).model_fields if name in dumped]
        for name in fields:
            if isinstance(self.__dict__.get(name), BaseModel):
                model_dump(self.__dict__[name])
            else:
                recorder.record(self, name)
        return dumped

    def model_copy(self, *args, **kwargs):
        copy = original["copy"](self, *args, **kwargs)
        prefix = recorder._paths.get(id(self))
        if prefix is not None:
            recorder.map(copy, prefix)
        return copy

    def method(self, name):
        with recorder.muted():
            settings = original["method"](self, name)
            section = "refine" if name in self.refine else "methods"
            own = set(getattr(self, section).get(name) or {})
        shared = set(SoupSettings.model_fields)
        prefix = recorder._paths.get(id(self))
        if isinstance(prefix, str):
            recorder.map(settings, lambda key: f"{prefix}{key}" if key in shared and key not in own
                         else f"{prefix}{section}.{name}.{key}")
        return settings

    had_own = "__getattribute__" in Strict.__dict__
    Strict.__getattribute__ = getattribute
    BaseModel.model_dump = model_dump
    BaseModel.model_copy = model_copy
    SoupParams.method = method
    try:
        yield recorder
    finally:
        if had_own:
            Strict.__getattribute__ = original["getattribute"]
        else:
            del Strict.__getattribute__
        BaseModel.model_dump = original["dump"]
        BaseModel.model_copy = original["copy"]
        SoupParams.method = original["method"]
