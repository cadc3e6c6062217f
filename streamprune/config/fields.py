"""Value checks shared by flags and YAML, and `option(...)`: a config field that is also a flag."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field
from typing import Any, Callable

from streamprune.errors import ConfigError

DEFAULT_VIDEO_MODEL = "default"  # configs/models/default.yaml: the embedded Video-LLM
DEFAULT_VLA_MODEL = "default_vla"  # configs/models/default_vla.yaml: the embedded VLA policy
DEFAULT_ENV = "streamprune/PickColor-v0"


def positive_int(text: Any) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise ConfigError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise ConfigError(f"expected a positive integer, got {text}")
    return value


def positive_float(text: Any) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ConfigError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise ConfigError(f"expected a positive finite number, got {text}")
    return value


def retain_ratio(text: Any) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ConfigError(f"--retain must be a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"--retain must be in (0, 1], got {text}")
    return value


def retain_list(text: Any) -> list[float]:
    """'1,0.5,0.25' -> [1.0, 0.5, 0.25], each in (0, 1]."""
    if isinstance(text, (list, tuple)):
        return [retain_ratio(v) for v in text]
    values = [v.strip() for v in str(text).split(",") if v.strip()]
    if not values:
        raise ConfigError(f"--retain must be comma-separated numbers in (0, 1], got {text!r}")
    return [retain_ratio(v) for v in values]


def name_list(text: Any) -> list[str]:
    """'a,b' -> ['a', 'b'] ('all' stays ['all'])."""
    if isinstance(text, (list, tuple)):
        return [str(v) for v in text]
    return [v.strip() for v in str(text).split(",") if v.strip()]


def option(default: Any = dataclasses.MISSING, help: str = "", *, flags: tuple[str, ...] = (),
           parse: Callable[[Any], Any] | None = None, metavar: str | None = None, positional: bool = False,
           required: bool = False, nargs: str | None = None, group: str | None = None,
           default_factory: Any = dataclasses.MISSING) -> Any:
    """A config field that is also a flag. `flags` default to `--field-name`; `parse` checks a
    value (a flag's text or a YAML value); `group` makes options mutually exclusive, one required."""
    meta = {"help": help, "flags": flags, "parse": parse, "metavar": metavar, "positional": positional,
            "required": required, "nargs": nargs, "group": group}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata={"cli": meta})
    return field(default=default, metadata={"cli": meta})


def model_option(default: str = DEFAULT_VIDEO_MODEL, what: str = "Video-LLM") -> Any:
    return option(default, f"model directory (save_pretrained layout) or a configs/models name "
                           f"(default: {default}, the embedded {what})", metavar="NAME|PATH")


def method_option(default: str = "none", required: bool = False) -> Any:
    return option(default, "pruning method or recipe (see `streamprune methods`)"
                  + ("" if required else f"; default {default}"), metavar="NAME", required=required)


def retain_option() -> Any:
    return option(None, "share of visual tokens kept, in (0, 1]; default: the method's own (1.0 for none)",
                  parse=retain_ratio, metavar="R")


def max_tokens_option() -> Any:
    return option(None, "absolute cap on kept visual tokens (with --retain the smaller wins)",
                  parse=positive_int, metavar="N")


def seed_option(default: int = 0, help: str = "seed for randomised methods") -> Any:
    return option(default, f"{help} (default {default})", parse=int)


def policy_option() -> Any:
    return option(DEFAULT_VLA_MODEL, f"VLA policy: a directory or a configs/models name (default "
                                     f"{DEFAULT_VLA_MODEL}: the embedded trained policy)",
                  flags=("--model", "--policy"), metavar="NAME|PATH")


DTYPES = ("auto", "bfloat16", "float16", "float32")
ATTENTION_BACKENDS = ("auto", "sdpa", "eager", "flash_attention_2")


def device_name(text: Any) -> str:
    """'auto', 'cpu', 'cuda' or 'cuda:N' (checked against the machine when the model loads)."""
    value = str(text).strip().lower()
    if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {text!r}")


def dtype_name(text: Any) -> str:
    value = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}.get(
        str(text).strip().lower(), str(text).strip().lower())
    if value not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {text!r}")
    return value


def attention_name(text: Any) -> str:
    value = str(text).strip().lower()
    if value not in ATTENTION_BACKENDS:
        raise ConfigError(f"--attn must be one of {', '.join(ATTENTION_BACKENDS)}, got {text!r}")
    return value
