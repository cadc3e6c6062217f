"""Value checks shared by flags and YAML, and `option(...)`: a config field that is also a flag."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from dataclasses import field
from typing import Any, Callable

from streamprune.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent.parent / "configs"  # models, methods, pipelines, shapes
DEFAULT_VIDEO_MODEL = "default"  # configs/models/default.yaml: the embedded Video-LLM
DEFAULT_VLA_MODEL = "default_vla"  # configs/models/default_vla.yaml: the embedded VLA policy
DEFAULT_ENV = "streamprune/PickColor-v0"


# Counts beyond int32 are never meant and overflow torch and FFmpeg arguments; rates and durations
# beyond a million (fps, seconds) are typos, and FFmpeg's rationals overflow on them.
MAX_COUNT = 2**31 - 1
MAX_AMOUNT = 1e6
MAX_SEED = 2**32 - 1  # what every seeded library here (torch, numpy, gymnasium) takes
MAX_QUESTION_CHARS = 4000  # a question, not a document: longer text would only slow the prefill


def _number(text: Any, kind: type) -> int | float:
    """`text` (a flag's text or a YAML value) as `kind`, or ValueError; bools and fractional
    floats are not integers."""
    if isinstance(text, bool) or kind is int and isinstance(text, float) and not text.is_integer():
        raise ValueError(text)
    try:
        return kind(text.strip() if isinstance(text, str) else text)
    except (TypeError, OverflowError) as err:
        raise ValueError(text) from err


def _shown(text: Any) -> str:
    shown = repr(text) if isinstance(text, str) else str(text)
    return shown if len(shown) <= 40 else f"{shown[:37]}..."


def positive_int(text: Any) -> int:
    try:
        value = _number(text, int)
    except ValueError:
        raise ConfigError(f"expected a positive integer, got {_shown(text)}") from None
    if not 0 < value <= MAX_COUNT:
        raise ConfigError(f"expected a positive integer up to {MAX_COUNT}, got {_shown(text)}")
    return int(value)


def positive_float(text: Any) -> float:
    try:
        value = _number(text, float)
    except ValueError:
        raise ConfigError(f"expected a positive number, got {_shown(text)}") from None
    if not 0 < value <= MAX_AMOUNT:  # also false for nan
        raise ConfigError(f"expected a positive number up to {MAX_AMOUNT:.0f}, got {_shown(text)}")
    return float(value)


def seed_value(text: Any) -> int:
    try:
        value = _number(text, int)
    except ValueError:
        raise ConfigError(f"expected an integer seed, got {_shown(text)}") from None
    if not 0 <= value <= MAX_SEED:
        raise ConfigError(f"expected a seed in [0, {MAX_SEED}], got {_shown(text)}")
    return int(value)


def question_text(text: Any, what: str = "the question") -> str:
    """A question as the tokenizer can take it: UTF-8 text (argv that was not arrives with lone
    surrogates), not empty, at most MAX_QUESTION_CHARS long. Stripped."""
    value = str(text).strip()
    bad = next((i for i, ch in enumerate(value) if "\ud800" <= ch <= "\udfff"), None)
    if bad is not None:
        raise ConfigError(f"{what} is not valid UTF-8 text (at character {bad})")
    if not value:
        raise ConfigError(f"{what} is empty")
    if len(value) > MAX_QUESTION_CHARS:
        raise ConfigError(f"{what} is {len(value)} characters long; at most {MAX_QUESTION_CHARS}")
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
    return option(default, "pruning method or recipe (see `streamprune methods`), or FILE.yaml: a recipe of "
                           "your own" + ("" if required else f"; default {default}"), metavar="NAME",
                  required=required)


def retain_option() -> Any:
    return option(None, "share of visual tokens kept, in (0, 1]; default: the method's own (1.0 for none)",
                  parse=retain_ratio, metavar="R")


def max_tokens_option() -> Any:
    return option(None, "absolute cap on kept visual tokens (with --retain the smaller wins)",
                  parse=positive_int, metavar="N")


def seed_option(default: int = 0, help: str = "seed for randomised methods") -> Any:
    return option(default, f"{help}, in [0, {MAX_SEED}] (default {default})", parse=seed_value, metavar="N")


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


def non_negative_int(text: Any) -> int:
    """0 or a positive integer (counts of optional runs, such as warm-ups)."""
    if str(text).strip() == "0":
        return 0
    return positive_int(text)
