"""`streamprune bench accuracy | decode | live | robot | speed`: measurements in one run, as tables, JSON and plots."""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from pathlib import Path

from streamprune.config import BenchAccuracyConfig, BenchDecodeConfig, BenchRobotConfig, BenchSpeedConfig
from streamprune.config.commands import BenchLiveConfig
from streamprune.config.data import BenchRedundancyConfig
from streamprune.config.serve import BenchServeConfig
from streamprune.errors import ConfigError, InputError
from streamprune.outputs import check_output, write_text
from streamprune.pruning.names import checked_method_names, method_names


def _check_outputs(config: object) -> None:
    """--json / --plot are checked before the bench runs, not after."""
    for flag in ("json", "plot"):
        if getattr(config, flag, None):
            check_output(getattr(config, flag), f"--{flag}")


def _machine() -> str:
    return f"{platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()}"


def _host(placement) -> dict[str, str | None]:
    """Where a bench ran: the machine, the GPU (on CUDA) and torch's version."""
    import torch

    return {"machine": _machine(), "gpu": torch.cuda.get_device_name(placement.device) if placement.is_cuda else None,
            "torch": torch.__version__}


def run_accuracy(config: BenchAccuracyConfig) -> int:
    _check_outputs(config)
    import torch

    from streamprune.bench.accuracy import format_table, plot, run_accuracy_bench, write_json
    from streamprune.data.synthetic_qa import data_version
    from streamprune.models import load_model
    from streamprune.models.default import trained_data_version

    methods = method_names(config.methods)
    if config.data_version is not None:
        data_version(config.data_version)  # an unknown version fails before the model loads
    adapter = load_model(config.model, config.placement)
    version = config.data_version or trained_data_version(adapter.model_dir)
    rows = run_accuracy_bench(adapter, methods, list(config.retain), config.n, seed=config.seed,
                              progress=sys.stderr.isatty(), data_version=version)
    print(f"synthetic QA data version {version}, {config.n} held-out test questions")
    print(format_table(rows))
    meta = {"model": str(adapter.model_dir), "family": adapter.family, "n": config.n, "retains": list(config.retain),
            "data_version": version, "machine": _machine(),
            "torch_threads": torch.get_num_threads()}
    if config.json:
        write_json(rows, config.json, meta)
    if config.plot:
        plot(rows, config.plot)
    return 0


def run_decode(config: BenchDecodeConfig) -> int:
    _check_outputs(config)
    from streamprune.bench.decode_bench import generate_clip, run_decode_bench

    if config.file is None and config.generate is None:
        raise ConfigError("bench decode needs a FILE or --generate SECONDS")
    if config.file is not None and not Path(config.file).is_file():
        raise InputError(f"video file not found: {config.file}")
    with tempfile.TemporaryDirectory() as tmp:
        path = config.file or generate_clip(Path(tmp) / "bench.mp4", config.generate)
        result = run_decode_bench(path, config.repeats)
    text = json.dumps(result, indent=2)
    print(text)
    if config.json:
        write_text(config.json, text, "--json")
    return 0


def run_robot(config: BenchRobotConfig) -> int:
    _check_outputs(config)
    from streamprune.bench.robot import compare_methods, format_robot_table, plot_robot
    from streamprune.runtime.robot import load_policy

    methods = checked_method_names(list(config.methods))
    policy = load_policy(config.model, config.placement)
    rows = compare_methods(policy, config.env, methods, list(config.retain), config.episodes,
                           progress=sys.stderr.isatty(), num_envs=config.num_envs)
    print(format_robot_table(rows))
    if config.json:
        write_text(config.json, json.dumps({"policy": str(policy.adapter.model_dir), "env": config.env,
                                            "rows": rows}, indent=1), "--json")
    if config.plot:
        plot_robot(rows, config.plot)
    return 0


def run_speed(config: BenchSpeedConfig) -> int:
    _check_outputs(config)
    import torch

    from streamprune.bench.speed import (build_shape_adapter, format_speed_table, plot_speed, run_speed_bench,
                                         synthetic_clip, time_video_decode, write_speed_json)
    from streamprune.models import resolve_placement

    methods = method_names(config.methods)
    placement = resolve_placement(config.placement)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = build_shape_adapter(config.shape, config.layers, placement, Path(tmp), config.frames)
        clip = synthetic_clip(config.frames)
        decode_ms = time_video_decode(clip, config.repeats, Path(tmp))
        rows = run_speed_bench(adapter, clip, methods, list(config.retain), config.repeats, config.decode_tokens,
                               config.warmup, progress=sys.stderr.isatty())
    depth = len(adapter.language_model.layers)
    decoded = f"{decode_ms:.1f} ms" if decode_ms is not None else "not timed (no PyAV)"
    dtype = str(adapter.dtype).removeprefix("torch.")
    print(f"{config.shape} ({depth} decoder layers), {config.frames} frames {clip.shape[2]}x{clip.shape[1]}, "
          f"{placement.device} {dtype} {placement.attn}; video decode {decoded}")
    print(format_speed_table(rows))
    meta = {"shape": config.shape, "layers": depth, "frames": config.frames, "device": str(placement.device),
            "dtype": dtype, "attn": placement.attn, "repeats": config.repeats, "warmup": config.warmup,
            "decode_tokens": config.decode_tokens, "video_decode_ms": decode_ms, **_host(placement),
            "torch_threads": torch.get_num_threads()}
    if config.json:
        write_speed_json(rows, config.json, meta)
    if config.plot:
        plot_speed(rows, config.plot, f"bench speed: {config.shape}, {config.frames} frames, {placement.device} "
                                      f"{dtype} {placement.attn}")
    return 0


def run_live(config: BenchLiveConfig) -> int:
    _check_outputs(config)

    from streamprune.bench.live import check_source, format_live_table, plot_live, run_live_bench, write_live_json
    from streamprune.config.fields import question_text
    from streamprune.models import resolve_placement

    config.question = question_text(config.question, "--question")
    methods = list(dict.fromkeys(method_names(config.methods)))
    if list(config.methods) == ["all"]:
        methods = ["none", *methods]
    check_source(config.source)
    placement = resolve_placement(config.placement)
    ray, started_ray = bool(config.ray or config.ray_address), False
    if ray:
        from streamprune.runtime.ray_connect import init_ray

        started_ray = init_ray(config.ray_address, include_dashboard=False, log_to_driver=False)
    try:
        rows = run_live_bench(config, methods, ray=ray, progress=sys.stderr.isatty())
    finally:
        if started_ray:
            import ray as ray_module

            ray_module.shutdown()
    dtype = str(placement.dtype).removeprefix("torch.") if placement.dtype is not None else "checkpoint"
    print(f"{config.source}: {config.seconds:g} s per method after {config.warmup:g} s warm-up, target "
          f"{config.fps:g} fps, a question every {config.question_every:g} s, kv budget "
          f"{config.memory.kv_budget}, {placement.describe()}{', Ray actors' if ray else ''}")
    print(format_live_table(rows))
    meta = {"source": config.source, "seconds": config.seconds, "warmup": config.warmup, "fps": config.fps,
            "question": config.question, "question_every": config.question_every,
            "kv_budget": config.memory.kv_budget, "window": config.memory.recent_frames, "model": config.model,
            "retain": config.retain, "max_new_tokens": config.max_new_tokens, "threads": config.threads,
            "ray": ray, "device": str(placement.device), "dtype": dtype, "attn": config.placement.attn,
            **_host(placement)}
    if config.json:
        write_live_json(rows, config.json, meta)
    if config.plot:
        plot_live(rows, config.plot, f"bench live: {config.source}, {config.seconds:g} s per method, "
                                     f"{placement.describe()}")
    return 0


def run_serve(config: BenchServeConfig) -> int:
    _check_outputs(config)
    import torch

    from streamprune.bench.serve import format_serve_table, plot_serve, run_serve_bench, write_serve_json
    from streamprune.models import resolve_placement

    if config.video and not Path(config.video).is_file():
        raise InputError(f"video file not found: {config.video}")
    torch.set_num_threads(config.threads)
    placement = resolve_placement(config.placement)
    result = run_serve_bench(config)
    print(f"bench serve: {config.requests} requests, method {config.method}, {config.num_frames} frames, "
          f"server --max-concurrency {config.max_concurrency}, {placement.describe()}")
    print(format_serve_table(result))
    meta = {"model": config.model, "method": config.method, "retain": config.retain, "num_frames": config.num_frames,
            "max_new_tokens": config.max_new_tokens, "max_concurrency": config.max_concurrency,
            "threads": config.threads, "device": str(placement.device), **_host(placement)}
    if config.json:
        write_serve_json(result, config.json, meta)
    if config.plot:
        plot_serve(result, config.plot, f"bench serve: {config.method}, {config.requests} requests, "
                                        f"{placement.describe()}")
    return 0


def run_redundancy(config: BenchRedundancyConfig) -> int:
    _check_outputs(config)
    from streamprune.bench.redundancy import (format_redundancy_table, measure, synthetic_source, video_source,
                                              write_redundancy_json)
    from streamprune.data.synthetic_qa import data_version
    from streamprune.models import load_model, resolve_placement

    for version in config.versions:
        data_version(version)  # an unknown version fails before the model loads
    for video in config.videos:
        if not Path(video).is_file():
            raise InputError(f"video file not found: {video}")
    adapter = load_model(config.model, config.placement)
    sources = [synthetic_source(v, config.clips) for v in config.versions]
    for video in config.videos:
        try:
            sources.append(video_source(video, config.fps, config.frames, config.windows))
        except ValueError as err:
            raise InputError(str(err)) from None
    rows = measure(adapter, sources, config.threshold, config.level)
    grid = adapter.encode(sources[0].clips[0][:2]).tokens.grid if sources else None
    print(f"encoder: {config.model} ({adapter.family}, {grid[1]}x{grid[2]} tokens a frame); token unchanged at "
          f"cosine >= {config.threshold:g}; cell unchanged below {config.level:g} grey levels")
    print(format_redundancy_table(rows))
    if config.json:
        write_redundancy_json(rows, config.json, {"model": config.model, "threshold": config.threshold,
                                                  "level": config.level, "fps": config.fps,
                                                  **_host(resolve_placement(config.placement))})
    return 0
