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
from pathlib import Path
from typing import Any, TypeVar

import yaml

from streamprune.config.commands import (AskConfig, BatchConfig, BenchAccuracyConfig, BenchDecodeConfig,
                                         BenchRobotConfig, BenchSpeedConfig, DemoConfig, LiveConfig, MethodsConfig, PublishConfig,
                                         RobotConfig, ServePolicyConfig, VizConfig)
from streamprune.config.fields import DEFAULT_ENV, DEFAULT_VIDEO_MODEL, DEFAULT_VLA_MODEL, option
from streamprune.config.schema import DeviceConfig, MemoryConfig, MethodConfig, ModelConfig, StageConfig
from streamprune.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent.parent / "configs"
T = TypeVar("T")
__all__ = ["AskConfig", "BatchConfig", "BenchAccuracyConfig", "BenchDecodeConfig", "BenchRobotConfig", "BenchSpeedConfig", "CONFIG_DIR",
           "DEFAULT_ENV", "DEFAULT_VIDEO_MODEL", "DEFAULT_VLA_MODEL", "DemoConfig", "DeviceConfig", "LiveConfig",
           "MemoryConfig",
           "MethodConfig", "MethodsConfig", "ModelConfig", "PublishConfig", "RobotConfig", "ServePolicyConfig",
           "StageConfig", "VizConfig", "from_dict", "load_command_defaults", "load_yaml", "method_config", "option",
           "resolve_model"]


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass `cls` from a dict, recursing into nested dataclasses and checking values
    with each option's `parse`; unknown keys are errors."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {sorted(unknown)}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        here = f"{where}.{name}" if where else name
        nested = _NESTED.get(fields[name].type if isinstance(fields[name].type, str) else "")
        parse = fields[name].metadata.get("cli", {}).get("parse")
        if nested is not None:
            value = from_dict(nested, value, here)
        elif name == "stages":
            if not isinstance(value, list):
                raise ConfigError(f"{here}: expected a list of stages, got {type(value).__name__}")
            value = [from_dict(StageConfig, s, here) for s in value]
        elif parse is not None and value is not None:
            try:
                value = parse(value)
            except ConfigError as err:
                raise ConfigError(f"{here}: {err}") from None
        kwargs[name] = value
    return cls(**kwargs)


_NESTED = {"ModelConfig": ModelConfig, "MemoryConfig": MemoryConfig, "DeviceConfig": DeviceConfig}


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {str(err).splitlines()[0]}") from None


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


def method_config(name: str) -> MethodConfig:
    """The pruning recipe called `name`: configs/methods/NAME.yaml if present, else the
    registered method of that name as a single stage with its paper defaults."""
    from streamprune.pruning.registry import available

    path = CONFIG_DIR / "methods" / f"{name}.yaml"
    if path.is_file():
        cfg = from_dict(MethodConfig, load_yaml(path), str(path))
        if not cfg.stages:
            cfg.stages = [StageConfig(method=cfg.name)]
        return cfg
    if name in available():
        return MethodConfig(name=name, retain=None, stages=[StageConfig(method=name)])
    known = sorted(set(available()) | {p.stem for p in (CONFIG_DIR / "methods").glob("*.yaml")})
    raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(known)}")
