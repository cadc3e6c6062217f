"""Closed-loop robot control: a VLA policy (with any pruning recipe) drives a gymnasium env.

`run_episodes` is the loop `streamprune robot`, `streamprune bench robot` and the VLA trainer's
held-out evaluation share, over the stages of runtime/robot_stages.py: env observations (the
source) -> policy stage (encode with the recipe's STC-Cacher per camera, select, prefill, decode
action tokens) -> actions back to the envs, with each slot's per-episode state reset at its
episode start; in this process or as Ray actors.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from streamprune.config import DEFAULT_VLA_MODEL, DeviceConfig
from streamprune.models.vla import VLAPolicy
from streamprune.pruning.recipe import PruningRecipe
from streamprune.runtime.robot_stages import LocalRobotStages, RobotStages

log = logging.getLogger(__name__)

HELD_OUT_SEED = 100_000  # evaluation episodes use seeds from here; training uses seeds below it


def load_policy(spec: str | None = DEFAULT_VLA_MODEL, placement: DeviceConfig | None = None) -> VLAPolicy:
    """The VLA policy `spec` names (a configs/models name or a directory; default: the embedded one)
    on the device `placement` asks for."""
    from streamprune.models import resolve_model_dir, resolve_placement

    path, attn = resolve_model_dir(spec or DEFAULT_VLA_MODEL)
    return VLAPolicy.load(path, resolve_placement(placement, attn))


def policy_image_size(policy: VLAPolicy) -> int:
    return int(policy.adapter.model.config.vision_config.image_size)


def percentiles(values: list[float]) -> dict[str, float]:
    """p50 / p99 of a list of milliseconds (0 when empty)."""
    if not values:
        return {"p50": 0.0, "p99": 0.0}
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}


def run_episodes(policy: VLAPolicy, env_id: str, recipe: PruningRecipe, episodes: int, seed: int,
                 video_out: Path | None = None, progress: bool = False, warmup_steps: int = 0,
                 num_envs: int = 1, stages: RobotStages | None = None,
                 target_latency_ms: float | None = None, trace: bool = False) -> dict:
    """Closed-loop episodes on held-out seeds through the robot stage graph; aggregate metrics.

    Episode e always runs on seed HELD_OUT_SEED + seed + e, whichever env slot takes it, so the
    number of envs changes the wall time, not the episodes. `num_envs` slots step together: one
    policy call per control step answers every active env. `stages`: where the stages run
    (default: this process; `RayRobotStages` for actors). `warmup_steps` untimed policy calls go
    first (a bench compares steady-state rates; the first calls of a new recipe pay one-off
    allocation and kernel-selection costs). `target_latency_ms`: the retain ratio is chosen per
    step by a `RetainController` from the measured step times; the choice is in the result.
    `trace`: the result also holds every episode's actions (`actions[e]`, a list of lists)."""
    own = stages is None
    stages = stages if stages is not None else LocalRobotStages(policy, env_id, recipe, num_envs, seed)
    slots = num_envs
    controller = None
    if target_latency_ms is not None:
        from streamprune.runtime.latency import RetainController

        controller = RetainController(target_latency_ms)
    try:
        if warmup_steps:
            obs = stages.reset(0, HELD_OUT_SEED + seed)
            for _ in range(warmup_steps):
                stages.act([(0, obs["image"], obs["instruction"])], None)
        return _drive(stages, recipe, episodes, seed, slots, video_out, progress, controller, trace)
    finally:
        if own:
            stages.close()


def _drive(stages: RobotStages, recipe: PruningRecipe, episodes: int, seed: int, slots: int,
           video_out: Path | None, progress: bool, controller: Any, trace: bool) -> dict:
    successes: dict[int, bool] = {}
    lengths: dict[int, int] = {}
    traces: dict[int, list] = {}
    latencies, encode_ms, llm_ms, env_ms, kept, tokens_in, chosen = [], [], [], [], [], [], []
    hits = frames = 0
    flops_full = flops_spent = 0.0
    next_episode = 0
    running: dict[int, dict] = {}  # slot -> {"episode", "obs", "steps", "frames"}

    def start(slot: int) -> None:
        nonlocal next_episode
        if next_episode >= episodes:
            return
        obs = stages.reset(slot, HELD_OUT_SEED + seed + next_episode)
        running[slot] = {"episode": next_episode, "obs": obs, "steps": 0, "frames": [obs["image"]] if video_out else [],
                         "actions": []}
        next_episode += 1

    for slot in range(min(slots, episodes)):
        start(slot)
    bar = tqdm(total=episodes, desc=f"{recipe.name}", unit="ep", disable=not progress)
    wall_start = time.perf_counter()
    while running:
        order = sorted(running)
        retain = controller.next_retain() if controller is not None else None
        begin = time.perf_counter()
        answers = stages.act([(s, running[s]["obs"]["image"], running[s]["obs"]["instruction"]) for s in order],
                             retain)
        step_ms = (time.perf_counter() - begin) * 1000
        latencies.append(step_ms)
        if controller is not None:
            # the share the step really kept (a warm-up step of VLA-Pruner keeps all, whatever was asked)
            used = statistics.mean(a.visual_tokens_kept / max(1, a.visual_tokens_in) for a in answers)
            controller.observe(used, step_ms)
            chosen.append(retain)
        for answer in answers:
            encode_ms.append(answer.encode_ms)
            llm_ms.append(answer.llm_ms)
            kept.append(answer.visual_tokens_kept)
            tokens_in.append(answer.visual_tokens_in)
            hits += answer.cacher_hits
            frames += answer.cacher_frames
            flops_full += answer.flops_full
            flops_spent += answer.flops_spent
        results = stages.step({s: a.action for s, a in zip(order, answers)})
        if trace:
            for slot, answer in zip(order, answers):
                running[slot]["actions"].append(answer.action.tolist())
        for slot in order:
            result, state = results[slot], running[slot]
            env_ms.append(result.step_ms)
            state["obs"] = result.obs
            state["steps"] += 1
            if video_out is not None:
                state["frames"].append(result.obs["image"])
            if result.terminated or result.truncated:
                episode = state["episode"]
                successes[episode], lengths[episode] = result.success, state["steps"]
                traces[episode] = state["actions"]
                del running[slot]
                if video_out is not None:
                    _write_episode(video_out, recipe.name, episode, state["frames"])
                bar.update(1)
                bar.set_postfix(success=f"{sum(successes.values())}/{len(successes)}")
                start(slot)
    wall = time.perf_counter() - wall_start
    bar.close()
    steps = sum(lengths.values())
    result = {
        "method": recipe.name, "retain": recipe.budget.retain, "episodes": episodes, "num_envs": slots,
        "success_rate": sum(successes.values()) / episodes, "mean_episode_length": statistics.mean(lengths.values()),
        "latency_ms_median": statistics.median(latencies),
        "latency_ms_p95": float(np.percentile(latencies, 95)),
        "control_steps_per_s": steps / wall if wall else 0.0,
        "visual_tokens_kept": statistics.mean(kept), "visual_tokens_in": statistics.mean(tokens_in),
        "stage_ms": {"policy_step": percentiles(latencies), "encode": percentiles(encode_ms),
                     "llm": percentiles(llm_ms), "env_step": percentiles(env_ms)},
        "cacher_hit_rate": hits / frames if frames else None,
        "vision_flops_saved_share": 1.0 - flops_spent / flops_full if flops_full else None,
    }
    if trace:
        result["actions"] = [traces[e] for e in range(episodes)]
    if controller is not None:
        result["target_latency_ms"] = controller.target_ms
        result["retain_chosen_mean"] = statistics.mean(chosen)
        result["retain_chosen_last"] = chosen[-1]
    return result


def _write_episode(video_out: Path, name: str, episode: int, frames: list[np.ndarray]) -> None:
    from streamprune.outputs import output_file
    from streamprune.videofile import write_video

    with output_file(video_out / f"{name}_ep{episode:03d}.mp4", "--video-out") as tmp:
        write_video(tmp, np.stack(frames), 10.0, "h264")
