"""Closed-loop robot control: a VLA policy (with any pruning recipe) drives a gymnasium env.

`run_episodes` is the loop `streamprune robot`, `streamprune bench robot` and the VLA trainer's
held-out evaluation share: observation -> policy (encode with the recipe's STC-Cacher, prune,
prefill, decode action tokens) -> env step, with the recipe's per-episode state reset at each
episode start.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from streamprune.config import DEFAULT_ENV, DEFAULT_VLA_MODEL, DeviceConfig
from streamprune.models.vla import VLAPolicy
from streamprune.pruning.base import PruneContext
from streamprune.pruning.recipe import PruningRecipe

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


def run_episodes(policy: VLAPolicy, env_id: str, recipe: PruningRecipe, episodes: int, seed: int,
                 video_out: Path | None = None, progress: bool = False, warmup_steps: int = 0) -> dict:
    """Closed-loop episodes on held-out seeds; aggregate metrics. `warmup_steps` untimed policy calls
    go first (a bench compares steady-state rates; the first calls of a new recipe pay one-off
    allocation and kernel-selection costs)."""
    from envs import make_env

    env = make_env(env_id, **({"image_size": policy_image_size(policy)} if env_id == DEFAULT_ENV else {}))
    ctx = PruneContext(seed=seed)
    if warmup_steps:
        obs, _ = env.reset(seed=HELD_OUT_SEED + seed)
        for _ in range(warmup_steps):
            policy.act(obs["image"], obs["instruction"], recipe, ctx)
    successes, lengths, latencies, kept, tokens_in = [], [], [], [], []
    wall = 0.0
    bar = tqdm(range(episodes), desc=f"{recipe.name}", unit="ep", disable=not progress)
    for episode in bar:
        obs, info = env.reset(seed=HELD_OUT_SEED + seed + episode)
        policy.reset(recipe, ctx)
        frames = [obs["image"]]
        steps, success = 0, False
        start = time.perf_counter()
        while True:
            step = policy.act(obs["image"], obs["instruction"], recipe, ctx)
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
            from streamprune.outputs import output_file
            from streamprune.videofile import write_video

            with output_file(video_out / f"{recipe.name}_ep{episode:03d}.mp4", "--video-out") as tmp:
                write_video(tmp, np.stack(frames), 10.0, "h264")
    env.close()
    return {
        "method": recipe.name, "retain": recipe.budget.retain, "episodes": episodes,
        "success_rate": sum(successes) / episodes, "mean_episode_length": statistics.mean(lengths),
        "latency_ms_median": statistics.median(latencies),
        "latency_ms_p95": float(np.percentile(latencies, 95)),
        "control_steps_per_s": sum(lengths) / wall if wall else 0.0,
        "visual_tokens_kept": statistics.mean(kept), "visual_tokens_in": statistics.mean(tokens_in),
    }
