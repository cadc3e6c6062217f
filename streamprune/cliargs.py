"""Command-line flags generated from a command's config dataclass (see `streamprune.config.option`).

The parser's defaults are the config's own (after configs/pipelines/NAME.yaml), so `--help` shows
what a run uses, and `config_from_args` fills the same dataclass back; nothing is declared twice.
Text that is not UTF-8 (argv bytes that do not decode arrive as lone surrogates, PEP 383) is
refused there, naming the flag: the tokenizer, PyAV and zmq would each fail on it differently.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, TypeVar

from streamprune.config import _NESTED
from streamprune.errors import EXIT_USAGE, ConfigError

T = TypeVar("T")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"streamprune: error: {message} (see --help)\n")
        sys.exit(EXIT_USAGE)


def _argparse_type(parse: Any) -> Any:
    """A config `parse` check as an argparse type (a ConfigError becomes argparse's one-line error)."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def _fields(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    """(dest, field) of every option of `cls`, nested config dataclasses flattened (dest 'a.b')."""
    out = []
    for f in dataclasses.fields(cls):
        nested = _NESTED.get(f.type) if isinstance(f.type, str) else None
        if nested is not None:
            out += _fields(nested, f"{prefix}{f.name}.")
        elif "cli" in f.metadata:
            out.append((prefix + f.name, f))
    return out


def add_config_arguments(parser: argparse.ArgumentParser, defaults: Any) -> None:
    """One flag per option of the config instance `defaults` (its values are the flag defaults)."""
    groups: dict[str, Any] = {}
    for dest, f in _fields(type(defaults)):
        meta = f.metadata["cli"]
        default = _get(defaults, dest)
        kwargs: dict[str, Any] = {"help": meta["help"]}
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]
        if f.type == "bool":
            kwargs["action"] = "store_true"
        elif meta["nargs"] == "append":
            kwargs["action"] = "append"
        elif meta["nargs"]:
            kwargs["nargs"] = meta["nargs"]
        if meta["parse"] is not None and f.type != "bool":
            kwargs["type"] = _argparse_type(meta["parse"])
        if meta["positional"]:
            if meta["nargs"] == "?":
                kwargs["default"] = default
            parser.add_argument(dest.replace(".", "__"), **kwargs)
            continue
        flags = meta["flags"] or (f"--{f.name.replace('_', '-')}",)
        kwargs["dest"] = dest.replace(".", "__")
        kwargs["default"] = [] if meta["nargs"] == "append" else default
        target = parser
        if meta["group"]:
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_mutually_exclusive_group(required=True)
            target = groups[meta["group"]]
        elif meta["required"]:
            kwargs["required"] = True
        target.add_argument(*flags, **kwargs)


def config_from_args(defaults: T, args: argparse.Namespace) -> T:
    """`defaults` with every option replaced by its parsed flag value."""
    config = _copy(defaults)
    for dest, f in _fields(type(defaults)):
        key = dest.replace(".", "__")
        if hasattr(args, key):
            _set(config, dest, _utf8(getattr(args, key), f))
    _revalidate(config)
    return config


def _utf8(value: Any, f: dataclasses.Field) -> Any:
    """`value`, unless a text in it is not valid UTF-8 (a one-line ConfigError naming the flag)."""
    for text in value if isinstance(value, list) else [value]:
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                meta = f.metadata["cli"]
                flag = meta["metavar"] if meta["positional"] else (meta["flags"] or (f"--{f.name.replace('_', '-')}",))[0]
                raise ConfigError(f"{flag}: not valid UTF-8 text (at character {err.start})") from None
    return value


def parse_config(defaults: T, argv: list[str], prog: str = "streamprune") -> T:
    """Parse `argv` against the flags of `defaults`' config (for `python -m` entry points and tests)."""
    parser = OneLineParser(prog=prog, description=(type(defaults).__doc__ or "").split("\n")[0])
    add_config_arguments(parser, defaults)
    return config_from_args(defaults, parser.parse_args(argv))


def _get(obj: Any, dest: str) -> Any:
    for part in dest.split("."):
        obj = getattr(obj, part)
    return obj


def _set(obj: Any, dest: str, value: Any) -> None:
    *path, last = dest.split(".")
    for part in path:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def _copy(config: Any) -> Any:
    changes = {f.name: _copy(getattr(config, f.name)) for f in dataclasses.fields(config)
               if dataclasses.is_dataclass(getattr(config, f.name))}
    return dataclasses.replace(config, **changes)


def _revalidate(config: Any) -> None:
    """Re-run nested configs' own checks (`__post_init__`) on the values the flags set."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            _revalidate(value)
            post = getattr(value, "__post_init__", None)
            if post is not None:
                post()
