"""Typed configs: one dataclass per command, owning its defaults and help text, loaded from YAML.

configs/models/*.yaml     which model and how to run it (`--model NAME`)
configs/methods/*.yaml    a pruning recipe: stages (method + options) and a default retain
configs/pipelines/*.yaml  overrides of a command's defaults (ask, batch, ...)

A field declared with `option(...)` is also a command-line flag: `streamprune.cliargs` builds the
parser from these fields and fills the dataclass back from the parsed flags, so a default or a
help text is written once, here. This module imports no torch (`streamprune --help` reads it).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml

from streamprune.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
T = TypeVar("T")
DEFAULT_VIDEO_MODEL = "default"  # configs/models/default.yaml: the embedded Video-LLM
DEFAULT_VLA_MODEL = "default_vla"  # configs/models/default_vla.yaml: the embedded VLA policy
DEFAULT_ENV = "streamprune/PickColor-v0"


# -- value checks shared by flags and YAML -----------------------------------------------------------
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


# -- recipes and models --------------------------------------------------------------------------------
@dataclass
class StageConfig:
    """One stage of a pruning recipe: a registered method and its option overrides."""

    method: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodConfig:
    """A named pruning recipe. `retain`/`max_tokens` form the budget of the final selection."""

    name: str = "none"
    retain: float | None = 1.0
    max_tokens: int | None = None
    stages: list[StageConfig] = field(default_factory=list)
    description: str = ""


@dataclass
class ModelConfig:
    """A configs/models entry: a directory, or `embedded` (videoqa | vla) for a model shipped in
    streamprune/assets (a tiny random stand-in is built once if that checkpoint is absent)."""

    path: str | None = None
    embedded: str | None = None
    attn_implementation: str = "sdpa"


@dataclass
class MemoryConfig:
    """Bounds and rules of the streaming memory.

    kv_budget:     most visual tokens ever held.
    recent_frames: newest units kept as they arrived (never compressed or evicted).
    alpha:         A2SF forgetting factor per unit (paper default 0.95).
    segment_tau:   DySeg cut threshold on consecutive frame cosine (FastVID default 0.9).
    static_tau:    HoliTom static threshold for merging tokens at one position (default 0.8).
    """

    kv_budget: int = option(2048, "most visual tokens the memory holds, hence the KV cache of each answer "
                                  "(default 2048)", flags=("--kv-budget",), parse=positive_int, metavar="TOKENS")
    recent_frames: int = option(8, "newest frames kept at full (per-frame pruned) detail (default 8)",
                                flags=("--window",), parse=positive_int, metavar="FRAMES")
    alpha: float = 0.95
    segment_tau: float = 0.9
    static_tau: float = 0.8

    def __post_init__(self) -> None:
        if self.kv_budget < 1:
            raise ConfigError(f"kv budget must be >= 1 token, got {self.kv_budget}")
        if self.recent_frames < 1:
            raise ConfigError(f"recent window must be >= 1 frame, got {self.recent_frames}")
        if not 0.0 < self.alpha <= 1.0:
            raise ConfigError(f"A2SF alpha must be in (0, 1], got {self.alpha}")


# -- commands -------------------------------------------------------------------------------------------
@dataclass
class AskConfig:
    """`streamprune ask`: decode VIDEO with PyAV, encode the frames, prune the visual tokens to the
    budget, prefill and generate the answer (defaults: configs/pipelines/ask.yaml)."""

    video: str = option("", "video file (any container/codec FFmpeg reads)", positional=True, metavar="VIDEO")
    question: str = option("", "the question to answer", flags=("--question", "-q"), required=True)
    model: str = model_option()
    method: str = method_option()
    retain: float | None = retain_option()
    max_tokens: int | None = max_tokens_option()
    fps: float = option(1.0, "frames sampled per second (default 1)", parse=positive_float)
    max_frames: int = option(16, "at most N frames, evenly spaced over the clip (default 16)",
                             parse=positive_int, metavar="N")
    max_new_tokens: int = option(16, "answer length cap (default 16)", parse=positive_int, metavar="K")
    seed: int = seed_option()
    json: bool = option(False, "print one JSON object instead of the answer")
    attn_implementation: str = "sdpa"


@dataclass
class DemoConfig:
    """`streamprune demo`: answer held-out synthetic video questions with the default model; print
    each question, the answer, the truth and the tokens kept, then the accuracy."""

    model: str = model_option()
    method: str = method_option()
    retain: float | None = retain_option()
    max_tokens: int | None = max_tokens_option()
    n: int = option(8, "number of questions (default 8)", parse=positive_int)


@dataclass
class MethodsConfig:
    """`streamprune methods`: one line per registered method and per configs/methods recipe."""


@dataclass
class VizConfig:
    """`streamprune viz`: decode VIDEO, run the pruning method and write the clip (.mp4) or a contact
    sheet (.png) with kept tokens outlined and pruned ones dimmed."""

    video: str = option("", "video file (any container/codec FFmpeg reads)", positional=True, metavar="VIDEO")
    method: str = method_option(required=True)
    retain: float | None = option(None, "share of visual tokens kept, in (0, 1]; default: the method's own",
                                  parse=retain_ratio, metavar="R")
    max_tokens: int | None = max_tokens_option()
    out: str = option("", "annotated clip (.mp4) or contact sheet (.png)", required=True,
                      metavar="FILE.mp4|FILE.png")
    model: str = model_option()
    fps: float = option(1.0, "frames sampled per second (default 1)", parse=positive_float)
    max_frames: int = option(16, "at most N frames, evenly spaced over the clip (default 16)",
                             parse=positive_int, metavar="N")
    question: str = option("Describe the video.", "prompt for inner-LLM stages, whose choice depends on it",
                           flags=("--question", "-q"))
    seed: int = seed_option()


@dataclass
class BatchConfig:
    """`streamprune batch`: decode, prune and answer for every input video, spread over Ray actors;
    one JSON line per input; re-running skips inputs already ok (defaults: configs/pipelines/batch.yaml)."""

    inputs: list[str] = option(help="video files (taken whatever their extension), folders (searched "
                                    "recursively for video extensions) or quoted globs such as 'clips/**/*.mp4'",
                               positional=True, nargs="+", metavar="INPUT", default_factory=list)
    question: str | None = option(None, "the question asked about every input", flags=("--question", "-q"),
                                  group="question")
    prompt_file: str | None = option(None, "read the question from text file F", metavar="F", group="question")
    output: str = option("", "results, one JSON line per input (appended; an existing file is resumed)",
                         flags=("--output", "-o"), required=True, metavar="FILE")
    model: str = model_option()
    method: str = method_option()
    retain: float | None = retain_option()
    max_tokens: int | None = max_tokens_option()
    fps: float = option(1.0, "frames sampled per second (default 1)", parse=positive_float)
    max_frames: int = option(16, "at most N frames per input, evenly spaced over the whole clip (default 16)",
                             parse=positive_int, metavar="N")
    max_new_tokens: int = option(16, "answer length cap (default 16)", parse=positive_int, metavar="K")
    seed: int = seed_option(help="seed for randomised methods, the same for every input")
    ray_address: str | None = option(None, "Ray cluster to run on ('auto': the one this machine belongs to); "
                                           "default: start a local Ray instance", metavar="auto|HOST:PORT")
    num_workers: int = option(1, "model actors in the pool, each holding one copy of the model (default 1)",
                              parse=positive_int, metavar="N")
    actor_resource: list[str] = option(help="Ray resource each model actor requires, e.g. GPU=1 or a custom "
                                            "node label (repeatable); decoding runs as ordinary CPU tasks",
                                       nargs="append", metavar="NAME=AMOUNT", default_factory=list)
    segment_seconds: float = option(60.0, "videos longer than S seconds are decoded as S-second segments in "
                                          "parallel, then joined in time order (default 60)",
                                    parse=positive_float, metavar="S")
    overwrite: bool = option(False, "start the output over instead of skipping inputs already answered in it")
    no_ray: bool = option(False, "run in this process, one input at a time (no Ray needed)")
    attn_implementation: str = "sdpa"


@dataclass
class LiveConfig:
    """`streamprune live`: stream frames from a camera, URL, file or zmq publisher through the pruning
    recipe into a bounded visual memory; answer each stdin line as a question about the recent stream.

    queue_frames: frames waiting for the encoder before the oldest is dropped.  batch_frames: frames
    encoded per call.  drop_oldest: False makes the reader wait instead (offline replay, tests).
    incremental_kv: keep the memory's KV cache between questions (see `IncrementalKV`).
    """

    source: str = option("", "file:PATH, camera:N, rtsp://..., http(s)://..., zmq://HOST:PORT or "
                             "synthetic:[k=v,...]", required=True, metavar="SOURCE")
    model: str = model_option()
    method: str = method_option()
    retain: float | None = retain_option()
    max_tokens: int | None = max_tokens_option()
    fps: float | None = option(2.0, "frames per second of stream taken into memory (default 2)",
                               parse=positive_float)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    incremental_kv: bool = option(False, "keep the memory's KV cache between questions (LLaVA-OneVision) "
                                         "instead of re-prefilling the memory for each question")
    no_ray: bool = option(False, "run the stages as threads in this process")
    ray_address: str | None = option(None, "Ray cluster to run the stage actors on; default: start a local "
                                           "Ray instance", metavar="auto|HOST:PORT")
    stats_json: str | None = option(None, "append a JSON stats line every --stats-interval s", metavar="FILE")
    stats_interval: float = option(1.0, "seconds between stats lines (default 1)", parse=positive_float,
                                   metavar="S")
    loop: bool = option(False, "repeat a file or synthetic source")
    max_frames: int | None = option(None, "stop reading the source after N frames", parse=positive_int,
                                    metavar="N")
    queue_frames: int = option(32, "frames waiting for the encoder before the oldest is dropped (default 32)",
                               flags=("--queue",), parse=positive_int, metavar="FRAMES")
    max_new_tokens: int = option(16, "answer length cap (default 16)", parse=positive_int, metavar="K")
    threads: int = option(1, "torch threads per stage (default 1)", parse=positive_int)
    seed: int = seed_option()
    batch_frames: int = 8
    drop_oldest: bool = True


@dataclass
class PublishConfig:
    """`streamprune publish`: turn a source into a zmq publisher (msgpack header + raw RGB buffer) for
    a remote `streamprune live --source zmq://...`."""

    source: str = option("", "any source `live` accepts except zmq", required=True, metavar="SOURCE")
    bind: str = option("tcp://127.0.0.1:5555", "zmq endpoint to publish on (default tcp://127.0.0.1:5555; "
                                               "port * picks a free one)", metavar="ENDPOINT")
    loop: bool = option(False, "repeat a file or synthetic source")
    allow_remote: bool = option(False, "allow a non-loopback bind (the wire has no authentication)")


def policy_option() -> Any:
    return option(DEFAULT_VLA_MODEL, f"VLA policy: a directory or a configs/models name (default "
                                     f"{DEFAULT_VLA_MODEL}: the embedded trained policy)",
                  flags=("--model", "--policy"), metavar="NAME|PATH")


@dataclass
class RobotConfig:
    """`streamprune robot`: run closed-loop episodes and print success rate, mean episode length,
    policy latency (median, p95), control steps/s and visual tokens kept."""

    env: str = option(DEFAULT_ENV, f"gymnasium env id (default {DEFAULT_ENV}; LIBERO ids like LIBERO-spatial/0)",
                      metavar="ENV_ID")
    model: str = policy_option()
    episodes: int = option(10, "closed-loop episodes (default 10)", parse=positive_int)
    method: str = option("none", "pruning method (default none; e.g. vla_pruner)", metavar="NAME")
    retain: float | None = option(None, "share of visual tokens kept, in (0, 1]", parse=retain_ratio, metavar="R")
    seed: int = seed_option(help="offset of the held-out episode seeds")
    video_out: str | None = option(None, "write each episode as an MP4 into DIR", metavar="DIR")
    json: bool = option(False, "print one JSON object")


@dataclass
class ServePolicyConfig:
    """`streamprune serve-policy`: answer observation -> action requests (msgpack header + raw image
    buffer) from robot clients in robots/."""

    model: str = policy_option()
    bind: str = option("tcp://127.0.0.1:5555", "zmq endpoint (default tcp://127.0.0.1:5555)")
    method: str = option("none", "pruning method (e.g. vla_pruner)", metavar="NAME")
    retain: float | None = option(None, "share of visual tokens kept, in (0, 1]", parse=retain_ratio, metavar="R")
    allow_remote: bool = option(False, "allow binding a non-loopback address")


@dataclass
class BenchAccuracyConfig:
    """`streamprune bench accuracy`: accuracy, accuracy retained, tokens kept, encode/prefill/total
    time, speedups, prefill FLOPs and STC-Cacher savings for each method x retain on held-out
    synthetic QA, measured in one run."""

    model: str = model_option()
    methods: list[str] = option(("all",), "comma-separated names, or 'all' (default)", parse=name_list)
    retain: list[float] = option((1.0, 0.5, 0.25, 0.1), "comma-separated budgets (default 1,0.5,0.25,0.1)",
                                 parse=retain_list)
    n: int = option(300, "held-out questions (default 300)", parse=positive_int)
    seed: int = seed_option()
    json: str | None = option(None, "write rows and run metadata as JSON", metavar="FILE")
    plot: str | None = option(None, "plot accuracy vs tokens kept and vs prefill time", metavar="FILE.png")


@dataclass
class BenchDecodeConfig:
    """`streamprune bench decode`: decoding throughput of streamprune (dense: all frames; sparse: 1 fps,
    keyframe-aware) against the ffmpeg CLI on the same file, in one run."""

    file: str | None = option(None, "video file (or --generate SECONDS)", positional=True, nargs="?")
    generate: float | None = option(None, "bench a generated 640x360 H.264 clip this long",
                                    parse=positive_float, metavar="SECONDS")
    repeats: int = option(3, "interleaved repeats, best kept (default 3)", parse=positive_int)
    json: str | None = option(None, "also write the result to FILE", metavar="FILE")


@dataclass
class BenchRobotConfig:
    """`streamprune bench robot`: closed-loop success rate and control steps/s of the VLA with no
    pruning and each method at each budget, on the same held-out episodes."""

    model: str = policy_option()
    env: str = option(DEFAULT_ENV, f"env id (default {DEFAULT_ENV})")
    methods: list[str] = option(("vla_pruner", "fastv", "uniform", "random"), "comma-separated methods "
                                "(default vla_pruner,fastv,uniform,random)", parse=name_list)
    retain: list[float] = option((0.5, 0.25, 0.1), "comma-separated budgets (default 0.5,0.25,0.1)",
                                 parse=retain_list)
    episodes: int = option(100, "episodes per row (default 100)", parse=positive_int)
    json: str | None = option(None, "write the rows as JSON", metavar="FILE")
    plot: str | None = option(None, "plot success and control steps/s against retain", metavar="FILE.png")


# -- loading ----------------------------------------------------------------------------------------------
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


_NESTED = {"ModelConfig": ModelConfig, "MemoryConfig": MemoryConfig}


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
