"""Typed configs: one dataclass per command, owning its defaults and help text, loaded from YAML.

configs/models/*.yaml     which model and how to run it (`--model NAME`)
configs/methods/*.yaml    a pruning recipe: stages (method + options) and a default retain
configs/pipelines/*.yaml  overrides of a command's defaults (ask, batch, ...)

fields.py: value checks and `option`; schema.py: recipes, models, memory; commands.py: one config
per command. A field declared with `option(...)` is also a command-line flag: `streamprune.cliargs` builds the
parser from these fields and fills the dataclass back from the parsed flags, so a default or a
help text is written once, here. This module imports no torch (`streamprune --help` reads it).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, TypeVar

import yaml

from streamprune.config.commands import (AskConfig, BatchConfig, BenchAccuracyConfig, BenchDecodeConfig,
                                         BenchRobotConfig, BenchSpeedConfig, DemoConfig, LiveConfig, MethodsConfig,
                                         PublishConfig, RobotConfig, ServePolicyConfig, VizConfig)
from streamprune.config.fields import (CONFIG_DIR, DEFAULT_ENV, DEFAULT_VIDEO_MODEL, DEFAULT_VLA_MODEL, option, positive_int,
                                      retain_ratio)
from streamprune.config.schema import DeviceConfig, MemoryConfig, MethodConfig, ModelConfig, StageConfig
from streamprune.errors import ConfigError

T = TypeVar("T")
__all__ = ["AskConfig", "BatchConfig", "BenchAccuracyConfig", "BenchDecodeConfig", "BenchRobotConfig",
           "BenchSpeedConfig", "CONFIG_DIR", "DEFAULT_ENV", "DEFAULT_VIDEO_MODEL", "DEFAULT_VLA_MODEL", "DemoConfig",
           "DeviceConfig", "LiveConfig", "MemoryConfig", "MethodConfig", "MethodsConfig", "ModelConfig",
           "PublishConfig", "RobotConfig", "ServePolicyConfig", "StageConfig", "VizConfig", "from_dict",
           "load_command_defaults", "load_yaml", "method_config", "option", "recipe_file", "resolve_model"]


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "", field: str = "") -> T:
    """Build dataclass `cls` from a dict, recursing into nested dataclasses; a value is checked by
    its option's `parse`, else against its field's type (`float | None`, `list[str]`, ...).
    Unknown keys, missing required keys and wrong types are one ConfigError naming `where` (the
    file) and the field path (`field` is where `data` sits in that file)."""
    def path(name: str = "") -> str:
        return ".".join(p for p in (field, name) if p)

    def label(name: str = "") -> str:
        return ": ".join(p for p in (where, path(name)) if p) or cls.__name__

    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{label()}: expected a mapping, got {_kind(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(map(str, data)) - set(fields)
    if unknown:
        raise ConfigError(f"{label()}: unknown key(s) {sorted(unknown)}; known: {sorted(fields)}")
    missing = [f.name for f in fields.values() if f.name not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{label(missing[0])}: missing")
    kwargs = {}
    for name, value in data.items():
        annotation = _annotation(fields[name].type)
        nested = _NESTED.get(annotation)
        parse = fields[name].metadata.get("cli", {}).get("parse")
        if nested is not None:
            value = from_dict(nested, value, where, path(name))
        elif annotation == "list[StageConfig]":
            if not isinstance(value, list):
                raise ConfigError(f"{label(name)}: expected a list of stages, got {_kind(value)}")
            value = [from_dict(StageConfig, s, where, f"{path(name)}[{i}]") for i, s in enumerate(value)]
        elif parse is not None and value is not None:
            try:
                value = parse(value)
            except ConfigError as err:
                raise ConfigError(f"{label(name)}: {err}") from None
        else:
            value = _typed(value, annotation, label(name))
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError as err:  # the dataclass's own range checks (__post_init__)
        raise ConfigError(f"{label()}: {err}") from None


def _annotation(declared: Any) -> str:
    """A field's type as written in its annotation ('float | None'), whether or not it was a string."""
    if isinstance(declared, str):
        return declared
    return declared.__name__ if isinstance(declared, type) else str(declared).replace("typing.", "")


def _kind(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r:.40}"


def _split(annotation: str, sep: str) -> list[str]:
    """Split at `sep` outside brackets: 'dict[str, Any] | None' -> ['dict[str, Any]', 'None']."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(annotation):
        depth += (ch == "[") - (ch == "]")
        if ch == sep and depth == 0:
            parts.append(annotation[start:i].strip())
            start = i + 1
    return parts + [annotation[start:].strip()]


def _typed(value: Any, annotation: str, where: str) -> Any:
    """`value` if it has the type `annotation` names (an int is also a float), else a ConfigError.
    Types this does not know (a class name) are left to the dataclass."""
    for choice in _split(annotation, "|"):
        base, _, args = choice.partition("[")
        args = _split(args[:-1], ",") if args else []
        if choice == "None" and value is None or choice == "Any":
            return value
        if value is None:
            continue
        if base == "bool" and isinstance(value, bool) or base == "str" and isinstance(value, str):
            return value
        if base == "int" and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{where}: expected a finite number, got {value}")
            return float(value)
        if base == "list" and isinstance(value, list):
            return [_typed(v, args[0] if args else "Any", f"{where}[{i}]") for i, v in enumerate(value)]
        if base == "dict" and isinstance(value, dict):
            if not all(isinstance(k, str) for k in value):
                raise ConfigError(f"{where}: keys must be strings")
            return {k: _typed(v, args[1] if len(args) > 1 else "Any", f"{where}.{k}") for k, v in value.items()}
        if base not in ("None", "bool", "str", "int", "float", "list", "dict"):
            return value
    names = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
             "list": "a list", "dict": "a mapping", "None": "null"}
    wanted = " or ".join(names.get(o.partition("[")[0], o) for o in _split(annotation, "|"))
    raise ConfigError(f"{where}: expected {wanted}, got {_kind(value)}")


_NESTED = {"ModelConfig": ModelConfig, "MemoryConfig": MemoryConfig, "DeviceConfig": DeviceConfig}


def load_yaml(path: Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (empty: {}); anything else is a one-line ConfigError."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read: {err.strerror or err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {str(err).splitlines()[0]}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {_kind(data)}")
    return data


def load_command_defaults(cls: type[T], name: str) -> T:
    """A command's config: its dataclass defaults, overridden by configs/pipelines/NAME.yaml if present."""
    path = CONFIG_DIR / "pipelines" / f"{name}.yaml"
    return from_dict(cls, load_yaml(path), str(path)) if path.is_file() else cls()


def resolve_model(spec: str | None) -> ModelConfig:
    """`--model` as given: None or "default" (the embedded Video-LLM), a directory, or the name of a
    configs/models/NAME.yaml file. Relative paths in those files are relative to the repository."""
    if spec is None:
        spec = DEFAULT_VIDEO_MODEL
    named = CONFIG_DIR / "models" / f"{spec}.yaml"
    if not Path(spec).exists() and named.is_file():
        cfg = from_dict(ModelConfig, load_yaml(named), str(named))
        if cfg.path is not None and not Path(cfg.path).is_absolute():
            cfg.path = str(CONFIG_DIR.parent / cfg.path)
        return cfg
    return ModelConfig(path=spec)


def recipe_file(name: str) -> Path | None:
    """The YAML file of recipe `name`: NAME.yaml / NAME.yml as given (a recipe of your own), else
    configs/methods/NAME.yaml if present, else None (a registered method)."""
    if name.endswith((".yaml", ".yml")):
        if not Path(name).is_file():
            raise ConfigError(f"recipe file not found: {name}")
        return Path(name)
    path = CONFIG_DIR / "methods" / f"{name}.yaml"
    return path if path.is_file() else None


def method_config(name: str) -> MethodConfig:
    """The pruning recipe called `name`: a recipe file (see `recipe_file`), or the registered
    method of that name as a single stage with its paper defaults."""
    from streamprune.pruning.registry import available

    path = recipe_file(name)
    if path is not None:
        cfg = from_dict(MethodConfig, load_yaml(path), str(path))
        for key, parse in (("retain", retain_ratio), ("max_tokens", positive_int)):
            if getattr(cfg, key) is not None:
                try:
                    setattr(cfg, key, parse(getattr(cfg, key)))
                except ConfigError as err:
                    raise ConfigError(f"{path}: {key}: {err}") from None
        if not cfg.stages:
            cfg.stages = [StageConfig(method=cfg.name)]
        return cfg
    if name in available():
        return MethodConfig(name=name, retain=None, stages=[StageConfig(method=name)])
    known = sorted(set(available()) | {p.stem for p in (CONFIG_DIR / "methods").glob("*.yaml")})
    raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(known)} (or a FILE.yaml recipe)")
