"""Closed-loop robot control: a VLA policy (with any pruning pipeline) drives a gymnasium env.

`streamprune robot` runs episodes in-process and reports success rate, mean episode length,
policy latency (median, p95), control steps per second and visual tokens kept;
`streamprune serve-policy` puts the same policy behind the zmq policy server for robot clients;
`streamprune bench robot` compares methods x budgets in one run.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from streamprune.cliargs import positive, retain_ratio
from streamprune.errors import ModelError
from streamprune.models.vla import VLAPolicy
from streamprune.pruning.base import PruneContext
from streamprune.pruning.pipeline import PruningPipeline, build_pipeline

log = logging.getLogger(__name__)

DEFAULT_POLICY_DIR = Path(__file__).resolve().parent.parent / "streamprune" / "assets" / "default_vla"
DEFAULT_ENV = "streamprune/PickColor-v0"
HELD_OUT_SEED = 100_000  # evaluation episodes use seeds from here; training uses seeds below it
BENCH_WARMUP_STEPS = 5


def default_policy_dir() -> Path:
    """The trained default VLA, or a tiny random one built once into the user cache."""
    from streamprune.models.default import trained_or_tiny
    from streamprune.models.tiny import save_tiny_vla

    return trained_or_tiny(DEFAULT_POLICY_DIR, "tiny-vla", lambda out: save_tiny_vla(out, image_size=64))


def load_policy(path: str | None) -> VLAPolicy:
    target = Path(path) if path else default_policy_dir()
    if not target.exists():
        raise ModelError(f"policy path {str(target)!r} does not exist")
    return VLAPolicy.load(target)


def policy_image_size(policy: VLAPolicy) -> int:
    return int(policy.adapter.model.config.vision_config.image_size)


def run_episodes(policy: VLAPolicy, env_id: str, pipeline: PruningPipeline, episodes: int, seed: int,
                 video_out: Path | None = None, progress: bool = False, warmup_steps: int = 0) -> dict:
    """Closed-loop episodes on held-out seeds; aggregate metrics. `warmup_steps` untimed policy calls
    go first (a bench compares steady-state rates; the first calls of a new pipeline pay one-off
    allocation and kernel-selection costs)."""
    from envs import make_env

    env = make_env(env_id, **({"image_size": policy_image_size(policy)} if env_id == DEFAULT_ENV else {}))
    ctx = PruneContext(seed=seed)
    if warmup_steps:
        obs, _ = env.reset(seed=HELD_OUT_SEED + seed)
        for _ in range(warmup_steps):
            policy.act(obs["image"], obs["instruction"], pipeline, ctx)
    successes, lengths, latencies, kept, tokens_in = [], [], [], [], []
    wall = 0.0
    bar = tqdm(range(episodes), desc=f"{pipeline.name}", unit="ep", disable=not progress)
    for episode in bar:
        obs, info = env.reset(seed=HELD_OUT_SEED + seed + episode)
        policy.reset(ctx)
        frames = [obs["image"]]
        steps, success = 0, False
        start = time.perf_counter()
        while True:
            step = policy.act(obs["image"], obs["instruction"], pipeline, ctx)
            latencies.append(step.latency_ms)
            kept.append(step.visual_tokens_kept)
            tokens_in.append(step.visual_tokens_in)
            obs, _reward, terminated, truncated, info = env.step(step.action)
            frames.append(obs["image"])
            steps += 1
            success = bool(info.get("is_success", False))
            if terminated or truncated:
                break
        wall += time.perf_counter() - start
        successes.append(success)
        lengths.append(steps)
        bar.set_postfix(success=f"{sum(successes)}/{len(successes)}")
        if video_out is not None:
            from streamprune.videofile import write_video

            video_out.mkdir(parents=True, exist_ok=True)
            write_video(video_out / f"{pipeline.name}_ep{episode:03d}.mp4", np.stack(frames), 10.0, "h264")
    env.close()
    return {
        "method": pipeline.name, "retain": pipeline.budget.retain, "episodes": episodes,
        "success_rate": sum(successes) / episodes, "mean_episode_length": statistics.mean(lengths),
        "latency_ms_median": statistics.median(latencies),
        "latency_ms_p95": float(np.percentile(latencies, 95)),
        "control_steps_per_s": sum(lengths) / wall if wall else 0.0,
        "visual_tokens_kept": statistics.mean(kept), "visual_tokens_in": statistics.mean(tokens_in),
    }


def add_robot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--env", default=DEFAULT_ENV, metavar="ENV_ID",
                   help=f"gymnasium env id (default {DEFAULT_ENV}; LIBERO ids like LIBERO-spatial/0)")
    p.add_argument("--policy", metavar="PATH", help="VLA policy directory; default: the embedded trained policy")
    p.add_argument("--episodes", type=positive(int), default=10, help="closed-loop episodes (default 10)")
    p.add_argument("--method", default="none", help="pruning method (default none; e.g. vla_pruner)")
    p.add_argument("--retain", type=retain_ratio, default=None, help="share of visual tokens kept, in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="offset of the held-out episode seeds")
    p.add_argument("--video-out", metavar="DIR", help="write each episode as an MP4 into DIR")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run_robot(args: argparse.Namespace) -> int:
    from envs import known_env_ids

    if args.env not in known_env_ids():
        from envs import make_env

        make_env(args.env)  # raises the one-line ConfigError listing known ids
    policy = load_policy(args.policy)
    pipeline = build_pipeline(args.method, retain=args.retain)
    result = run_episodes(policy, args.env, pipeline, args.episodes, args.seed,
                          Path(args.video_out) if args.video_out else None, progress=sys.stderr.isatty())
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['method']} retain={result['retain']}: success {result['success_rate']:.0%} over "
              f"{args.episodes} episodes, mean length {result['mean_episode_length']:.1f}, latency median "
              f"{result['latency_ms_median']:.1f} ms / p95 {result['latency_ms_p95']:.1f} ms, "
              f"{result['control_steps_per_s']:.1f} control steps/s, visual tokens kept "
              f"{result['visual_tokens_kept']:.0f}/{result['visual_tokens_in']:.0f}")
    return 0


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", metavar="PATH", help="VLA policy directory; default: the embedded trained policy")
    p.add_argument("--bind", default="tcp://127.0.0.1:5555", help="zmq endpoint (default tcp://127.0.0.1:5555)")
    p.add_argument("--method", default="none", help="pruning method (e.g. vla_pruner)")
    p.add_argument("--retain", type=retain_ratio, default=None, help="share of visual tokens kept, in (0, 1]")
    p.add_argument("--allow-remote", action="store_true", help="allow binding a non-loopback address")


def run_serve(args: argparse.Namespace) -> int:
    from streamprune.transport.policy_server import PolicyServer

    policy = load_policy(args.policy)
    size = policy_image_size(policy)
    server = PolicyServer(policy, build_pipeline(args.method, retain=args.retain), args.bind, (size, size, 3),
                          allow_remote=args.allow_remote)
    print(f"serving {args.method} policy on {server.endpoint} (images {size}x{size}x3 uint8); Ctrl-C stops",
          file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    print(f"answered {server.stats.answered}, errors {server.stats.errors}", file=sys.stderr)
    return 0


def compare_methods(policy: VLAPolicy, env_id: str, methods: list[str], retains: list[float], episodes: int,
                    seed: int = 0, progress: bool = False) -> list[dict]:
    """No pruning plus every method x retain, same episodes, one run; each row timed after a warm-up."""
    rows = [run_episodes(policy, env_id, build_pipeline("none"), episodes, seed, progress=progress,
                         warmup_steps=BENCH_WARMUP_STEPS)]
    for method in methods:
        for retain in retains:
            rows.append(run_episodes(policy, env_id, build_pipeline(method, retain=retain), episodes, seed,
                                     progress=progress, warmup_steps=BENCH_WARMUP_STEPS))
    base = rows[0]["control_steps_per_s"]
    for row in rows:
        row["speedup"] = row["control_steps_per_s"] / base if base else 0.0
    return rows


def plot_robot(rows: list[dict], path: str | Path) -> None:
    """Success rate and control steps/s against the share of visual tokens kept, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    base = rows[0]
    for method in dict.fromkeys(r["method"] for r in rows[1:]):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["retain"])
        retains = [r["retain"] for r in mine]
        left.plot(retains, [r["success_rate"] for r in mine], marker="o", label=method)
        right.plot(retains, [r["control_steps_per_s"] for r in mine], marker="o", label=method)
    left.axhline(base["success_rate"], color="black", linestyle="--", linewidth=1, label="unpruned")
    right.axhline(base["control_steps_per_s"], color="black", linestyle="--", linewidth=1, label="unpruned")
    left.set_ylabel("success rate")
    right.set_ylabel("control steps / s")
    ticks = sorted({r["retain"] for r in rows[1:]})
    for axis in (left, right):
        axis.set_xlabel("share of visual tokens kept")
        axis.set_xscale("log")
        axis.set_xticks(ticks, [f"{t:g}" for t in ticks])
        axis.minorticks_off()
        axis.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.suptitle(f"closed-loop control, {base['episodes']} held-out episodes per point (streamprune bench robot)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_robot_table(rows: list[dict]) -> str:
    lines = ["| method | retain | success | mean len | latency med ms | p95 ms | steps/s | speedup | tokens kept |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['retain'] if r['retain'] is not None else 1} | {r['success_rate']:.0%} | "
                     f"{r['mean_episode_length']:.1f} | {r['latency_ms_median']:.1f} | {r['latency_ms_p95']:.1f} | "
                     f"{r['control_steps_per_s']:.1f} | {r['speedup']:.2f} | "
                     f"{r['visual_tokens_kept']:.0f}/{r['visual_tokens_in']:.0f} |")
    return "\n".join(lines)
