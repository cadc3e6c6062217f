"""The robot loop through the stage graph: the same actions as calling the policy in-process, with
or without Ray, with one env or several stepped together; the STC-Cacher on the robot camera."""

from __future__ import annotations

import numpy as np
import pytest

from envs import PICKCOLOR_ID, make_env
from streamprune.pruning.base import PruneContext
from streamprune.pruning.recipe import build_recipe
from streamprune.runtime.robot import HELD_OUT_SEED, load_policy, policy_image_size, run_episodes

EPISODES = 2


@pytest.fixture(scope="module")
def policy():
    return load_policy()


def reference_actions(policy, method: str, episodes: int, seed: int) -> list[list[list[float]]]:
    """The policy called directly, one env, one step at a time: what the graph must reproduce."""
    recipe = build_recipe(method)
    env = make_env(PICKCOLOR_ID, image_size=policy_image_size(policy))
    ctx = PruneContext(seed=seed)
    out = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=HELD_OUT_SEED + seed + episode)
        policy.reset(recipe, ctx)
        actions = []
        while True:
            step = policy.act(obs["image"], obs["instruction"], recipe, ctx)
            actions.append(step.action.tolist())
            obs, _, terminated, truncated, _ = env.step(step.action)
            if terminated or truncated:
                break
        out.append(actions)
    env.close()
    return out


@pytest.mark.parametrize("method", ["stc_vla_pruner", "vla_pruner"])
def test_graph_in_process_gives_the_policy_s_own_actions(policy, method):
    expected = reference_actions(policy, method, EPISODES, seed=3)
    result = run_episodes(policy, PICKCOLOR_ID, build_recipe(method), EPISODES, seed=3, trace=True)
    assert result["actions"] == expected


def test_several_envs_stepped_together_give_each_episode_s_own_actions(policy):
    expected = reference_actions(policy, "stc_vla_pruner", 3, seed=7)
    result = run_episodes(policy, PICKCOLOR_ID, build_recipe("stc_vla_pruner"), 3, seed=7, num_envs=2, trace=True)
    assert result["num_envs"] == 2
    assert result["actions"] == expected


def test_batched_vision_pass_matches_one_camera_at_a_time(policy):
    """Without an encoder stage the envs' images share one tower pass; actions stay the same
    bins (features equal to float rounding)."""
    recipe = build_recipe("none")
    assert policy.batches_vision(recipe)
    env = make_env(PICKCOLOR_ID, image_size=policy_image_size(policy))
    images = []
    for k in range(3):
        obs, _ = env.reset(seed=HELD_OUT_SEED + k)
        images.append(obs["image"])
    batch = policy.encode_batch(np.stack(images), recipe)
    for image, video in zip(images, batch):
        alone = policy.adapter.encode_for(image[None], recipe, fps=1.0)
        assert video.tokens.grid == alone.tokens.grid
        assert (video.tokens.features - alone.tokens.features).abs().max() < 1e-4
        assert (video.always_kept - alone.always_kept).abs().max() == 0
    expected = reference_actions(policy, "none", 2, seed=11)
    result = run_episodes(policy, PICKCOLOR_ID, recipe, 2, seed=11, num_envs=2, trace=True)
    assert result["actions"] == expected


def test_stc_cacher_on_the_robot_camera_reuses_frames(policy):
    result = run_episodes(policy, PICKCOLOR_ID, build_recipe("stc_vla_pruner"), 1, seed=0)
    # the authors' interval refreshes every 2nd frame, so at most half the frames are cache hits
    assert 0.3 < result["cacher_hit_rate"] <= 0.5
    assert result["vision_flops_saved_share"] > 0.1
    assert result["stage_ms"]["encode"]["p99"] >= result["stage_ms"]["encode"]["p50"] > 0


def test_graph_as_ray_actors_gives_the_policy_s_own_actions(policy):
    import ray

    from streamprune.runtime.robot_stages import RayRobotStages

    expected = reference_actions(policy, "stc_vla_pruner", EPISODES, seed=5)
    ray.init(address="local", include_dashboard=False, num_cpus=2, log_to_driver=False)
    try:
        recipe = build_recipe("stc_vla_pruner")
        stages = RayRobotStages(None, _placement(), PICKCOLOR_ID, recipe, num_envs=2, seed=5)
        try:
            result = run_episodes(policy, PICKCOLOR_ID, recipe, EPISODES, seed=5, num_envs=2, stages=stages,
                                  trace=True)
        finally:
            stages.close()
    finally:
        ray.shutdown()
    assert result["actions"] == expected


def _placement():
    from streamprune.config import DeviceConfig

    return DeviceConfig()
