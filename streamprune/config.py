"""Typed configs loaded from YAML under configs/; command-line flags override them.

configs/models/*.yaml     which model and how to run it
configs/methods/*.yaml    a pruning pipeline: stages (method + options) and a default retain
configs/pipelines/*.yaml  defaults for a command (ask, live, batch, robot)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from streamprune.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
T = TypeVar("T")


@dataclass
class StageConfig:
    """One stage of a pruning pipeline: a registered method and its option overrides."""

    method: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodConfig:
    """A named pruning pipeline. `retain`/`max_tokens` form the budget of the final selection."""

    name: str = "none"
    retain: float | None = 1.0
    max_tokens: int | None = None
    stages: list[StageConfig] = field(default_factory=list)
    description: str = ""


@dataclass
class ModelConfig:
    path: str | None = None  # None: the embedded default model
    attn_implementation: str = "sdpa"


@dataclass
class DecodeConfig:
    fps: float = 1.0
    max_frames: int = 16


@dataclass
class AskConfig:
    """Defaults of `streamprune ask` (configs/pipelines/ask.yaml)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    method: str = "none"
    retain: float | None = None  # None: the method file's default retain
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    max_new_tokens: int = 16
    seed: int = 0


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass `cls` from a dict, recursing into nested dataclasses; unknown keys are errors."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {sorted(unknown)}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        ftype = fields[name].type
        nested = _dataclass_type(ftype)
        if nested is not None and isinstance(value, dict):
            value = from_dict(nested, value, f"{where}.{name}" if where else name)
        elif name == "stages":
            value = [from_dict(StageConfig, s, f"{where}.stages") for s in value]
        kwargs[name] = value
    return cls(**kwargs)


def _dataclass_type(annotation: Any) -> type | None:
    candidates = {"ModelConfig": ModelConfig, "DecodeConfig": DecodeConfig}
    return candidates.get(annotation if isinstance(annotation, str) else getattr(annotation, "__name__", ""))


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {str(err).splitlines()[0]}") from None


def load_pipeline_defaults(cls: type[T], name: str) -> T:
    """Defaults for a command from configs/pipelines/NAME.yaml (dataclass defaults if absent)."""
    path = CONFIG_DIR / "pipelines" / f"{name}.yaml"
    return from_dict(cls, load_yaml(path), str(path)) if path.is_file() else cls()


def resolve_model(spec: str | None) -> ModelConfig:
    """`--model` as given: None (the embedded default), a directory, or the name of a
    configs/models/NAME.yaml file. Relative paths in those files are relative to the repository."""
    if spec is None:
        return ModelConfig()
    named = CONFIG_DIR / "models" / f"{spec}.yaml"
    if not Path(spec).exists() and named.is_file():
        cfg = from_dict(ModelConfig, load_yaml(named), str(named))
        if cfg.path is not None and not Path(cfg.path).is_absolute():
            cfg.path = str(CONFIG_DIR.parent / cfg.path)
        return cfg
    return ModelConfig(path=spec)


def method_config(name: str) -> MethodConfig:
    """The pruning pipeline called `name`: configs/methods/NAME.yaml if present, else the
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
