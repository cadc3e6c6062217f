"""One registry of pruning methods: adding a method is one module plus one `@register` line."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from streamprune.errors import ConfigError
from streamprune.pruning.base import PruningMethod

_METHODS: dict[str, type[PruningMethod]] = {}

# Modules under streamprune.pruning whose import registers a method. Add one line per method.
_BUILTIN_MODULES = [
    "baselines",
    "stc_pruner", "divprune", "fastvid",
    "fastvid_qwen",
    "holitom", "vla_pruner", "fastv", "framefusion", "visionzip",
]


def register(cls: type[PruningMethod]) -> type[PruningMethod]:
    if cls.name in _METHODS:
        raise ValueError(f"pruning method {cls.name!r} registered twice")
    _METHODS[cls.name] = cls
    return cls


def _load_builtin() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(f"streamprune.pruning.{module}")


def available() -> dict[str, type[PruningMethod]]:
    _load_builtin()
    return dict(sorted(_METHODS.items()))


def make_method(name: str, **overrides: Any) -> PruningMethod:
    """Instantiate method `name` with its paper defaults, overridden by `overrides`."""
    methods = available()
    if name not in methods:
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(methods)}")
    cls = methods[name]
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = set(overrides) - fields
    if unknown:
        raise ConfigError(f"method {name!r} has no option(s) {sorted(unknown)}; options: {sorted(fields)}")
    return cls(cls.Config(**overrides))


def describe(name: str) -> str:
    """`name: summary (defaults)` in one line."""
    cls = available()[name]
    defaults = ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(cls.Config))
    return f"{name}: {cls.summary}" + (f" [{defaults}]" if defaults else "")
