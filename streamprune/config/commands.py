"""One config per command: its fields are its flags, with their defaults and help text (the CLI is
generated from these classes by streamprune.cliargs; YAML in configs/pipelines may override defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field

from streamprune.config.fields import (CONFIG_DIR, DEFAULT_ENV, max_tokens_option, method_option, model_option,
                                       name_list, non_negative_int, option, policy_option, positive_float,
                                       positive_int, retain_list, retain_option, retain_ratio, seed_option)
from streamprune.config.schema import DeviceConfig, MemoryConfig
from streamprune.errors import ConfigError


@dataclass
class ClipQAConfig:
    """What answering a question about a clip needs: model, recipe and budget, sampling, answer length."""

    model: str = model_option()
    method: str = method_option()
    retain: float | None = retain_option()
    max_tokens: int | None = max_tokens_option()
    fps: float = option(1.0, "frames sampled per second (default 1)", parse=positive_float)
    max_frames: int = option(16, "at most N frames, evenly spaced over the clip (default 16)",
                             parse=positive_int, metavar="N")
    max_new_tokens: int = option(16, "answer length cap (default 16)", parse=positive_int, metavar="K")
    seed: int = seed_option()
    placement: DeviceConfig = field(default_factory=DeviceConfig)


@dataclass
class AskConfig(ClipQAConfig):
    """`streamprune ask`: decode VIDEO with PyAV, encode the frames, prune the visual tokens to the
    budget, prefill and generate the answer (defaults: configs/pipelines/ask.yaml)."""

    video: str = option("", "video file (any container/codec FFmpeg reads)", positional=True, metavar="VIDEO")
    question: str = option("", "the question to answer", flags=("--question", "-q"), required=True)
    json: bool = option(False, "print one JSON object instead of the answer")


@dataclass
class DemoConfig:
    """`streamprune demo`: answer held-out synthetic video questions with the default model; print
    each question, the answer, the truth and the tokens kept, then the accuracy."""

    model: str = model_option()
    method: str = method_option()
    retain: float | None = retain_option()
    max_tokens: int | None = max_tokens_option()
    n: int = option(8, "number of questions (default 8)", parse=positive_int)
    placement: DeviceConfig = field(default_factory=DeviceConfig)


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
    placement: DeviceConfig = field(default_factory=DeviceConfig)


@dataclass
class BatchConfig(ClipQAConfig):
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
    max_frames: int = option(16, "at most N frames per input, evenly spaced over the whole clip (default 16)",
                             parse=positive_int, metavar="N")
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


@dataclass
class LiveConfig:
    """`streamprune live`: stream frames from a camera, URL, file or zmq publisher through the pruning
    recipe into a bounded visual memory; answer each stdin line as a question about the recent stream.

    queue_frames: frames waiting for the encoder before the oldest is dropped.  batch_frames: frames
    encoded per call.  drop_oldest: False makes the reader wait instead (offline replay, tests).
    incremental_kv: keep the memory's KV cache between questions (see `IncrementalKV`).
    """

    source: str = option("", "file:PATH, camera:N, rtsp://..., http(s)://..., zmq://HOST:PORT, "
                             "synthetic:[k=v,...] or gym:ENV_ID (an env's camera under its scripted expert)",
                         required=True, metavar="SOURCE")
    model: str = model_option()
    method: str = method_option()
    retain: float | None = retain_option()
    max_tokens: int | None = max_tokens_option()
    fps: float | None = option(2.0, "frames per second of stream taken into memory (default 2)",
                               parse=positive_float)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    placement: DeviceConfig = field(default_factory=DeviceConfig)
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
    max_segment_units: int = option(8, "longest temporal segment (FastVID/HoliTom) before it is closed and "
                                       "pruned; its frames reach the memory then (default 8 units)",
                                    flags=("--max-segment",), parse=positive_int, metavar="UNITS")
    target_latency_ms: float | None = option(None, "answer deadline: each answer keeps the share of memory "
                                                   "tokens (highest A2SF score) that measured answer times say "
                                                   "fits in T ms; the choice is in the answer line",
                                             parse=positive_float, metavar="T")
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
    placement: DeviceConfig = field(default_factory=DeviceConfig)
    num_envs: int = option(1, "envs stepped together; one policy call per control step answers all of them "
                              "(default 1)", parse=positive_int, metavar="N")
    ray: bool = option(False, "run each env and the policy as Ray actors (a local Ray instance unless "
                              "--ray-address)")
    ray_address: str | None = option(None, "Ray cluster for the env and policy actors (implies --ray)",
                                     metavar="auto|HOST:PORT")
    target_latency_ms: float | None = option(None, "choose the retain ratio per step so a control step takes "
                                                   "about T ms (measured; the choice is in the output)",
                                             parse=positive_float, metavar="T")
    threads: int = option(1, "torch threads of the policy actor under --ray (default 1)", parse=positive_int)


# serve-policy's wire protocols and where each listens unless --bind says otherwise
POLICY_PROTOCOLS = {"zmq": "tcp://127.0.0.1:5555", "openpi": "ws://127.0.0.1:8000"}  # 8000: openpi's own port


def policy_protocol(text: object) -> str:
    value = str(text).strip().lower()
    if value not in POLICY_PROTOCOLS:
        raise ConfigError(f"--protocol must be one of {', '.join(POLICY_PROTOCOLS)}, got {text!r}")
    return value


@dataclass
class ServePolicyConfig:
    """`streamprune serve-policy`: answer observation -> action requests from robot clients, in our
    zmq protocol (msgpack header + raw image buffer; robots/client.py) or in openpi's websocket +
    msgpack-numpy protocol (openpi-client's WebsocketClientPolicy; robots/openpi_client.py)."""

    model: str = policy_option()
    protocol: str = option("zmq", "zmq (ours, default) or openpi (openpi's websocket protocol, for "
                                  "openpi-client)", parse=policy_protocol, metavar="zmq|openpi")
    bind: str | None = option(None, "where to listen: tcp://HOST:PORT for zmq (default tcp://127.0.0.1:5555), "
                                    "ws://HOST:PORT for openpi (default ws://127.0.0.1:8000; GET /healthz "
                                    "answers OK)", metavar="ADDRESS")
    method: str = option("none", "pruning method (e.g. vla_pruner)", metavar="NAME")
    retain: float | None = option(None, "share of visual tokens kept, in (0, 1]", parse=retain_ratio, metavar="R")
    allow_remote: bool = option(False, "allow binding a non-loopback address")
    placement: DeviceConfig = field(default_factory=DeviceConfig)


def serve_policy_bind(config: ServePolicyConfig) -> str:
    """--bind, or the protocol's default; an address of the other protocol's kind is a ConfigError."""
    bind = (config.bind or POLICY_PROTOCOLS[config.protocol]).strip()
    scheme = bind.partition("://")[0] if "://" in bind else ""
    if config.protocol == "openpi" and scheme != "ws":
        raise ConfigError(f"--protocol openpi listens on ws://HOST:PORT (default {POLICY_PROTOCOLS['openpi']}), "
                          f"got --bind {bind!r}")
    if config.protocol == "zmq" and scheme in ("ws", "wss", "http", "https"):
        raise ConfigError(f"--bind {bind!r} is a websocket address: add --protocol openpi, or give a zmq endpoint "
                          f"such as {POLICY_PROTOCOLS['zmq']}")
    return bind


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
    data_version: str | None = option(None, "synthetic QA data version: 3 (64 px on black) or 4 (video-like); "
                                            "default: the one the model was trained on", metavar="V")
    seed: int = seed_option()
    placement: DeviceConfig = field(default_factory=DeviceConfig)
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
    methods: list[str] = option(("vla_pruner", "stc_vla_pruner", "fastv", "uniform", "random"),
                                "comma-separated methods (default vla_pruner,stc_vla_pruner,fastv,uniform,random; "
                                "stc_vla_pruner = STC-Cacher on the camera + VLA-Pruner)", parse=name_list)
    retain: list[float] = option((0.5, 0.25, 0.1), "comma-separated budgets (default 0.5,0.25,0.1)",
                                 parse=retain_list)
    episodes: int = option(100, "episodes per row (default 100)", parse=positive_int)
    num_envs: int = option(1, "envs stepped together, one policy call per control step (default 1)",
                           parse=positive_int, metavar="N")
    placement: DeviceConfig = field(default_factory=DeviceConfig)
    json: str | None = option(None, "write the rows as JSON", metavar="FILE")
    plot: str | None = option(None, "plot success and control steps/s against retain", metavar="FILE.png")


def _seconds_or_zero(text: object) -> float:
    """0 (none) or a positive number of seconds."""
    try:
        if float(str(text).strip()) == 0.0:
            return 0.0
    except ValueError:
        pass
    return positive_float(text)


@dataclass
class BenchLiveConfig:
    """`streamprune bench live`: one stream played in real time for a fixed span per method, one
    method after another in one run: sustained fps into memory, answer latency p50/p99 of questions
    asked at a fixed interval, frames dropped, tokens and KV bytes of the memory, and every other
    counter the live runner keeps (STC-Cacher hit rate, ...); fps and p50 also relative to none."""

    source: str = option("synthetic:width=320,height=240,fps=30,scene_every=90",
                         "file:PATH (played in real time, looped), synthetic:[k=v,...], camera:N, rtsp://..., "
                         "zmq://HOST:PORT (default synthetic:width=320,height=240,fps=30,scene_every=90)",
                         metavar="SOURCE")
    seconds: float = option(20.0, "measured seconds of stream per method (default 20)", parse=positive_float,
                            metavar="S")
    warmup: float = option(2.0, "seconds per method after the first frame reaches the memory and before the "
                                "measured span (default 2; 0 for none)", parse=_seconds_or_zero, metavar="S")
    methods: list[str] = option(("none", "stc", "fastvid", "visionzip"), "comma-separated methods or 'all' "
                                "(default none,stc,fastvid,visionzip; ratios are against none when it runs)",
                                parse=name_list)
    retain: float | None = retain_option()
    question: str = option("which shape appeared last ?", "the question asked again and again",
                           flags=("--question", "-q"))
    question_every: float = option(2.0, "seconds between questions (asked one at a time from a thread; a "
                                        "slow answer delays the next) (default 2)", parse=positive_float,
                                   metavar="S")
    fps: float = option(2.0, "frames per second of stream taken into memory (default 2)", parse=positive_float)
    model: str = model_option()
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    max_new_tokens: int = option(16, "answer length cap (default 16)", parse=positive_int, metavar="K")
    threads: int = option(1, "torch threads per stage (default 1)", parse=positive_int)
    seed: int = seed_option()
    ray: bool = option(False, "run the stages as Ray actors (default: threads in this process, like "
                              "`live --no-ray`)")
    ray_address: str | None = option(None, "Ray cluster for the stage actors (implies --ray)",
                                     metavar="auto|HOST:PORT")
    placement: DeviceConfig = field(default_factory=DeviceConfig)
    json: str | None = option(None, "write the rows and run metadata as JSON", metavar="FILE")
    plot: str | None = option(None, "bar charts per method: fps, answer p50/p99, frames dropped, tokens",
                              metavar="FILE.png")


def speed_shapes() -> list[str]:
    """The public checkpoint shapes in configs/shapes (one folder each)."""
    return sorted(p.name for p in (CONFIG_DIR / "shapes").iterdir() if (p / "config.json").is_file())


def shape_name(text: object) -> str:
    value = str(text).strip().lower()
    if value not in speed_shapes():
        raise ConfigError(f"--shape must be one of {', '.join(speed_shapes())}, got {text!r}")
    return value


@dataclass
class BenchSpeedConfig:
    """`streamprune bench speed`: encode, prune, prefill, TTFT and decode time, KV bytes and peak
    memory per method x retain on a randomly initialised model with a public checkpoint's exact
    shapes, each speed-up printed beside its FLOPs ratio, measured in one run."""

    shape: str = option("llava-ov-0.5b", f"public checkpoint shape in configs/shapes: {', '.join(speed_shapes())} "
                                         "(default llava-ov-0.5b)", parse=shape_name, metavar="NAME")
    layers: int | None = option(None, "decoder layers to build (default: the checkpoint's; fewer on small "
                                      "machines)", parse=positive_int, metavar="N")
    frames: int = option(16, "frames of the synthetic clip (default 16)", parse=positive_int, metavar="N")
    methods: list[str] = option(("all",), "comma-separated names, or 'all' (default)", parse=name_list)
    retain: list[float] = option((1.0, 0.5, 0.25, 0.1), "comma-separated budgets (default 1,0.5,0.25,0.1)",
                                 parse=retain_list)
    repeats: int = option(3, "timed repeats per row after the warm-up; the median is kept (default 3)",
                          parse=positive_int)
    warmup: int = option(1, "untimed runs before the timed ones (default 1; 0 for a smoke test)",
                         parse=non_negative_int, metavar="N")
    decode_tokens: int = option(16, "greedy tokens decoded per run (default 16)", parse=positive_int, metavar="K")
    placement: DeviceConfig = field(default_factory=DeviceConfig)
    json: str | None = option(None, "write rows and run metadata as JSON", metavar="FILE")
    plot: str | None = option(None, "plot speed-up vs tokens kept with the FLOPs ratio", metavar="FILE.png")
