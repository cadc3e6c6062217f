"""The fast PickColor env and the env registry: contract, task semantics, expert, speed."""

from __future__ import annotations

import subprocess
import sys
import time
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from envs import LIBERO_IDS, PICKCOLOR_ID, expert_action, known_env_ids, make_env
from envs.pickcolor import COLOURS, PickColorEnv
from streamprune.errors import ConfigError


def _rollout(env: gym.Env, policy, seed: int) -> tuple[dict, int]:
    env.reset(seed=seed)
    steps, done, info = 0, False, {}
    while not done:
        _, _, terminated, truncated, info = env.step(policy(env))
        steps += 1
        done = terminated or truncated
    return info, steps


def test_pickcolor_passes_gymnasium_env_checker():
    env = make_env(PICKCOLOR_ID)
    with warnings.catch_warnings(record=True) as caught:  # gymnasium's checker warns, not raises
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    assert [str(w.message) for w in caught] == []


def test_pickcolor_observation_is_image_instruction_and_state():
    env = make_env(PICKCOLOR_ID)
    obs, info = env.reset(seed=0)
    assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8
    assert obs["instruction"].startswith("reach the ")
    assert obs["state"].shape == (2,)
    assert info["is_success"] is False
    assert isinstance(env.action_space, gym.spaces.Box) and env.action_space.shape == (2,)


def test_pickcolor_same_seed_same_scene_other_seed_other_scene():
    env = make_env(PICKCOLOR_ID)
    a, _ = env.reset(seed=7)
    b, _ = env.reset(seed=7)
    c, _ = env.reset(seed=8)
    assert np.array_equal(a["image"], b["image"]) and a["instruction"] == b["instruction"]
    assert not np.array_equal(a["image"], c["image"])


def test_pickcolor_named_object_is_drawn_in_its_colour_at_its_position():
    env = PickColorEnv()
    for seed in range(20):
        obs, _ = env.reset(seed=seed)
        colour, shape, (x, y) = env.objects[env.target]
        assert obs["instruction"] == f"reach the {colour} {shape}"
        px = obs["image"][int(y * 64), int(x * 64)]
        assert tuple(px) == COLOURS[colour]
        # every object has its own colour, so the colour alone tells the target apart
        assert len({c for c, _, _ in env.objects}) == len(env.objects)


def test_pickcolor_action_moves_the_agent_marker_in_the_image():
    env = PickColorEnv()
    obs, _ = env.reset(seed=3)
    white = lambda img: np.argwhere((img == 255).all(-1)).mean(0)  # noqa: E731  [row, col] of the cross
    before = white(obs["image"])
    direction = np.array([1.0, 0.0], np.float32) if env.agent[0] < 0.5 else np.array([-1.0, 0.0], np.float32)
    obs, *_ = env.step(direction)
    after = white(obs["image"])
    assert np.sign(after[1] - before[1]) == np.sign(direction[0])
    assert abs(after[1] - before[1]) == pytest.approx(0.1 * 64, abs=1.5)
    assert abs(after[0] - before[0]) < 1.0


def test_pickcolor_expert_succeeds_on_every_seed_within_the_step_limit():
    env = make_env(PICKCOLOR_ID)
    results = [_rollout(env, expert_action, seed) for seed in range(300)]
    assert all(info["is_success"] for info, _ in results)
    assert max(steps for _, steps in results) <= env.unwrapped.config.max_steps


def test_pickcolor_reaching_a_distractor_is_not_success_and_truncates():
    env = PickColorEnv(max_steps=12)
    env.reset(seed=5)
    distractor = next(i for i in range(len(env.objects)) if i != env.target)
    goal = env.objects[distractor][2]
    for step in range(12):
        _, reward, terminated, truncated, info = env.step(np.clip((goal - env.agent) / 0.1, -1, 1))
        assert not info["is_success"] and reward == 0.0 and not terminated
        assert truncated == (step == 11)
    assert np.linalg.norm(env.agent - goal) < 1e-5


def test_pickcolor_random_policy_rarely_succeeds():
    env = make_env(PICKCOLOR_ID)
    env.action_space.seed(0)
    wins = sum(_rollout(env, lambda e: e.action_space.sample(), seed)[0]["is_success"] for seed in range(100))
    assert wins < 40  # the expert gets 100: success needs the right object


def test_pickcolor_runs_thousands_of_steps_per_second():
    env = PickColorEnv()
    env.reset(seed=0)
    actions = np.random.default_rng(0).uniform(-1, 1, (3000, 2)).astype(np.float32)
    start = time.perf_counter()
    for a in actions:
        _, _, terminated, truncated, _ = env.step(a)
        if terminated or truncated:
            env.reset()
    assert len(actions) / (time.perf_counter() - start) > 1000


def test_make_env_unknown_id_raises_config_error_listing_known_ids():
    with pytest.raises(ConfigError) as err:
        make_env("streamprune/NoSuchEnv-v0")
    message = str(err.value)
    assert "NoSuchEnv" in message and PICKCOLOR_ID in message and "LIBERO-spatial/0..9" in message


def test_make_env_bad_option_raises_config_error():
    with pytest.raises(ConfigError):
        make_env(PICKCOLOR_ID, n_objects=9)
    with pytest.raises(ConfigError):
        make_env(PICKCOLOR_ID, no_such_option=1)


def test_known_ids_cover_pickcolor_and_four_libero_suites():
    ids = known_env_ids()
    assert PICKCOLOR_ID in ids and len(LIBERO_IDS) == 40
    assert {"LIBERO-spatial/0", "LIBERO-object/9", "LIBERO-goal/3", "LIBERO-10/5"} <= set(ids)
    assert all(i in gym.registry for i in ids)


def test_expert_action_without_an_expert_raises_config_error():
    with pytest.raises(ConfigError):
        expert_action(gym.make("CartPole-v1"))


def test_importing_envs_does_not_load_the_simulator():
    # LIBERO ids are registered by name only; MuJoCo loads when a LIBERO env is made.
    code = "import sys, envs; assert not {'libero', 'mujoco', 'robosuite'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_libero_env_rejects_unknown_suite_and_task_before_loading_the_simulator():
    from envs.libero import LiberoEnv

    with pytest.raises(ConfigError, match="suite"):
        LiberoEnv(suite="kitchen")
    with pytest.raises(ConfigError, match="task_id"):
        LiberoEnv(suite="spatial", task_id=10)


@pytest.mark.parametrize("angle", [0.0, 0.3, np.pi / 2, 3.0])
def test_libero_state_axis_angle_matches_a_rotation_about_z(angle):
    from envs.libero import quat_to_axis_angle

    quat = np.array([0.0, 0.0, np.sin(angle / 2), np.cos(angle / 2)])  # (x, y, z, w)
    np.testing.assert_allclose(quat_to_axis_angle(quat), [0.0, 0.0, angle], atol=1e-6)
