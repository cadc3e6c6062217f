"""`streamprune bench accuracy | decode | robot`: measurements in one run, as tables, JSON and plots."""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from pathlib import Path

from streamprune.config import CONFIG_DIR, BenchAccuracyConfig, BenchDecodeConfig, BenchRobotConfig, method_config
from streamprune.errors import ConfigError, InputError


def _checked_methods(names: list[str]) -> list[str]:
    for name in names:
        method_config(name)  # raises a one-line error for unknown names
    return names


def run_accuracy(config: BenchAccuracyConfig) -> int:
    import torch

    from streamprune.bench.accuracy import format_table, plot, run_accuracy_bench, write_json
    from streamprune.models import load_model
    from streamprune.pruning.registry import available

    registered = available()
    if list(config.methods) == ["all"]:  # every registered method and every recipe file of another name (stc)
        files = sorted(p.stem for p in (CONFIG_DIR / "methods").glob("*.yaml"))
        methods = [m for m in registered if m != "none"] + [f for f in files if f not in registered]
    else:
        methods = _checked_methods(list(config.methods))
    adapter = load_model(config.model, config.placement)
    rows = run_accuracy_bench(adapter, methods, list(config.retain), config.n, seed=config.seed,
                              progress=sys.stderr.isatty())
    print(format_table(rows))
    meta = {"model": str(adapter.model_dir), "family": adapter.family, "n": config.n, "retains": list(config.retain),
            "machine": f"{platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()}",
            "torch_threads": torch.get_num_threads()}
    if config.json:
        write_json(rows, config.json, meta)
    if config.plot:
        plot(rows, config.plot)
    return 0


def run_decode(config: BenchDecodeConfig) -> int:
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
        Path(config.json).write_text(text)
    return 0


def run_robot(config: BenchRobotConfig) -> int:
    from streamprune.bench.robot import compare_methods, format_robot_table, plot_robot
    from streamprune.runtime.robot import load_policy

    methods = _checked_methods(list(config.methods))
    policy = load_policy(config.model, config.placement)
    rows = compare_methods(policy, config.env, methods, list(config.retain), config.episodes,
                           progress=sys.stderr.isatty())
    print(format_robot_table(rows))
    if config.json:
        Path(config.json).write_text(json.dumps({"policy": str(policy.adapter.model_dir), "env": config.env,
                                                 "rows": rows}, indent=1))
    if config.plot:
        plot_robot(rows, config.plot)
    return 0
