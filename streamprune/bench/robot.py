"""`streamprune bench robot`: success and control rate of a VLA per method x budget, in one run."""

from __future__ import annotations

from pathlib import Path

from streamprune.models.vla import VLAPolicy
from streamprune.outputs import output_file
from streamprune.pruning.recipe import build_recipe
from streamprune.runtime.robot import run_episodes

BENCH_WARMUP_STEPS = 5


def compare_methods(policy: VLAPolicy, env_id: str, methods: list[str], retains: list[float], episodes: int,
                    seed: int = 0, progress: bool = False, num_envs: int = 1) -> list[dict]:
    """No pruning plus every method x retain, same episodes, one run; each row timed after a warm-up.
    `num_envs` envs step together through the robot stage graph (one policy call per step)."""
    rows = [run_episodes(policy, env_id, build_recipe("none"), episodes, seed, progress=progress,
                         warmup_steps=BENCH_WARMUP_STEPS, num_envs=num_envs)]
    for method in methods:
        for retain in retains:
            rows.append(run_episodes(policy, env_id, build_recipe(method, retain=retain), episodes, seed,
                                     progress=progress, warmup_steps=BENCH_WARMUP_STEPS, num_envs=num_envs))
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
    with output_file(path, "--plot") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def format_robot_table(rows: list[dict]) -> str:
    lines = ["| method | retain | envs | success | mean len | step med ms | p95 ms | steps/s | speedup | tokens kept "
             "| STC hits | vision FLOPs saved |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        hits, saved = r.get("cacher_hit_rate"), r.get("vision_flops_saved_share")
        lines.append(f"| {r['method']} | {r['retain'] if r['retain'] is not None else 1} | {r.get('num_envs', 1)} | "
                     f"{r['success_rate']:.0%} | "
                     f"{r['mean_episode_length']:.1f} | {r['latency_ms_median']:.1f} | {r['latency_ms_p95']:.1f} | "
                     f"{r['control_steps_per_s']:.1f} | {r['speedup']:.2f} | "
                     f"{r['visual_tokens_kept']:.0f}/{r['visual_tokens_in']:.0f} | "
                     f"{'-' if hits is None else f'{hits:.0%}'} | {'-' if saved is None else f'{saved:.0%}'} |")
    return "\n".join(lines)
