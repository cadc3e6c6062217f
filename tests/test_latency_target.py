"""`--target-latency-ms`: RetainController picks the retain ratio per step from measured step times.
The unit tests run it on a simulated step time with noise and spikes. The closed-loop test makes
the default VLA hold a target below its unpruned step time on this CPU."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

from envs import make_env
from streamprune.config import DEFAULT_ENV
from streamprune.errors import ConfigError
from streamprune.models.vla import VLAPolicy
from streamprune.pruning.base import PruneContext
from streamprune.pruning.recipe import PruningRecipe, build_recipe
from streamprune.pruning.vla_pruner import HISTORY_KEY
from streamprune.runtime.latency import RetainController
from streamprune.runtime.robot import HELD_OUT_SEED, load_policy, policy_image_size, run_episodes

# On this CPU the default VLA's step time depends on retain most under DivPrune, a pre-LLM stage,
# so all four LLM layers and the action decoding see fewer tokens, and its own selection cost
# grows with k: 1.0 -> 0.02 is about -19% (VLA-Pruner prunes at layer 3 of 4: about -7%).
CLOSED_LOOP_METHOD = "divprune"


def simulated_step(fixed: float = 4.0, slope: float = 16.0, noise: float = 0.5, spikes: float = 0.05,
                   seed: int = 0) -> Callable[[float], float]:
    """ms = fixed + slope * retain, Gaussian noise, and a spike of +10..30 ms on `spikes` of the
    steps (a shared CPU)."""
    rng = random.Random(seed)

    def step(retain: float) -> float:
        ms = fixed + slope * retain + rng.gauss(0.0, noise)
        if rng.random() < spikes:
            ms += rng.uniform(10.0, 30.0)
        return max(0.1, ms)

    return step


def drive(controller: RetainController, step: Callable[[float], float], steps: int) -> tuple[list[float], list[float]]:
    retains, latencies = [], []
    for _ in range(steps):
        retain = controller.next_retain()
        ms = step(retain)
        controller.observe(retain, ms, {"encode": 1.0, "llm": ms - 1.0})
        retains.append(retain)
        latencies.append(ms)
    return retains, latencies


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("target", [6.0, 12.0, 18.0])
def test_controller_converges_within_10_percent_of_a_reachable_target(target: float, seed: int) -> None:
    controller = RetainController(target)
    retains, latencies = drive(controller, simulated_step(seed=seed), 60)
    assert abs(statistics.median(latencies[-20:]) - target) <= 0.1 * target, latencies[-20:]
    ideal = (target - 4.0) / 16.0
    assert abs(statistics.median(retains[-20:]) - ideal) <= 0.1, retains[-20:]
    assert controller.stats()["target_reachable"] is True


def test_controller_prunes_when_the_target_is_below_the_unpruned_time() -> None:
    controller = RetainController(10.0)  # unpruned: 20 ms
    retains, _ = drive(controller, simulated_step(), 10)
    assert retains[0] == 1.0  # the first step measures the unpruned time
    assert max(retains[1:]) < 1.0
    assert controller.stats()["retain"] < 1.0


def test_controller_keeps_every_token_when_the_unpruned_step_meets_the_target() -> None:
    controller = RetainController(30.0)  # unpruned: 20 ms
    retains, _ = drive(controller, simulated_step(spikes=0.0), 30)
    assert retains == [1.0] * 30
    assert controller.stats()["target_reachable"] is True


def test_controller_sits_at_retain_min_and_says_so_when_the_target_is_unreachable() -> None:
    controller = RetainController(3.0)  # retain_min costs 4.3 ms
    retains, latencies = drive(controller, simulated_step(seed=3), 40)
    assert retains[-30:] == [controller.retain_min] * 30
    stats = controller.stats()
    assert stats["target_reachable"] is False and stats["retain"] == controller.retain_min
    assert stats["steps"] == 40 and stats["latency_ms_last"] == latencies[-1]
    assert stats["latency_ms_mean"] == pytest.approx(statistics.mean(latencies))
    assert stats["stage_ms_mean"]["encode"] == 1.0


def test_controller_never_leaves_its_retain_range() -> None:
    """Any target, range and step time, a flat or falling one (noise only) and huge spikes included."""
    rng = random.Random(0)
    for trial in range(60):
        low = rng.choice([0.02, 0.1, 0.3])
        high = rng.choice([low, min(1.0, low + 0.05), 0.7, 1.0])
        controller = RetainController(rng.uniform(0.5, 40.0), retain_max=high, retain_min=low)
        step = simulated_step(fixed=rng.uniform(0.0, 20.0), slope=rng.choice([-5.0, 0.0, 1.0, 30.0]),
                              noise=rng.uniform(0.0, 5.0), spikes=rng.choice([0.0, 0.3]), seed=trial)
        retains, _ = drive(controller, step, 40)
        assert all(low <= r <= high for r in retains), (trial, low, high, retains)
        assert low <= controller.stats()["retain"] <= high


def test_controller_follows_a_machine_that_slows_down() -> None:
    """The fixed cost doubles mid-run (another job takes the CPU): forgetting lets the fit follow."""
    controller = RetainController(14.0)
    fast, slow = simulated_step(fixed=4.0, seed=1), simulated_step(fixed=8.0, seed=2)
    before, _ = drive(controller, fast, 40)
    after, latencies = drive(controller, slow, 40)
    assert statistics.median(after[-15:]) < statistics.median(before[-15:]) - 0.15
    assert abs(statistics.median(latencies[-15:]) - 14.0) <= 1.4


def test_controller_rejects_settings_a_user_can_get_wrong() -> None:
    for bad in ({"target_ms": 0.0}, {"target_ms": float("nan")}, {"target_ms": 5.0, "retain_min": 0.0},
                {"target_ms": 5.0, "retain_min": 0.5, "retain_max": 0.4}):
        with pytest.raises(ConfigError):
            RetainController(**bad)


def test_with_retain_changes_only_the_budget_and_shares_the_stages() -> None:
    recipe = build_recipe("stc_vla_pruner", max_tokens=48)
    copy = recipe.with_retain(0.5)
    assert copy.budget.retain == 0.5 and copy.budget.max_tokens == 48
    assert recipe.budget.retain is None  # the original is untouched
    assert copy.inner_llm is recipe.inner_llm and copy.pre_llm == recipe.pre_llm
    assert copy.encoder_options == recipe.encoder_options and copy.name == recipe.name
    assert copy.inner_budget(64, 64).count(64) == 32
    assert recipe.with_retain(1.0).inner_budget(64, 64).count(64) == 48  # the cap still wins
    pre = build_recipe("divprune").with_retain(0.25)
    assert pre.budget.count(64) == 16 and pre.budget.max_tokens is None


@pytest.fixture(scope="module")
def policy() -> Iterator[VLAPolicy]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: one thread gives the steadiest step times
    yield load_policy()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def env(policy: VLAPolicy) -> Iterator:
    env = make_env(DEFAULT_ENV, image_size=policy_image_size(policy))
    yield env
    env.close()


def timed_act(policy: VLAPolicy, obs: dict, recipe: PruningRecipe, ctx: PruneContext):
    start = time.perf_counter()
    step = policy.act(obs["image"], obs["instruction"], recipe, ctx)
    return step, (time.perf_counter() - start) * 1000


def test_with_retain_keeps_vla_pruners_episode_history_across_steps(policy: VLAPolicy, env) -> None:
    """A new budget every step keeps VLA-Pruner's action history, which lives in the episode's
    context. It warms up unpruned for w=3 steps, then each step keeps its own retain's count."""
    recipe = build_recipe("vla_pruner")
    ctx = PruneContext(seed=0)
    policy.reset(recipe, ctx)
    obs, _ = env.reset(seed=HELD_OUT_SEED)
    kept = []
    for retain in (0.5, 0.25, 0.5, 0.5, 0.25, 0.125):
        step, _ = timed_act(policy, obs, recipe.with_retain(retain), ctx)
        kept.append(step.visual_tokens_kept)
        obs, *_ = env.step(step.action)
    assert len(ctx.state[HISTORY_KEY]) == 3
    assert kept == [64, 64, 64, 32, 16, 8]


def reference_ms(policy: VLAPolicy, obs: dict, recipe: PruningRecipe, ctx: PruneContext,
                 rounds: int = 15) -> tuple[float, float]:
    """Median step ms at retain 1.0 and at retain_min (0.02), interleaved, so a change in CPU
    load hits both alike."""
    full, floor = recipe.with_retain(1.0), recipe.with_retain(0.02)
    unpruned, pruned = [], []
    for _ in range(rounds):
        unpruned.append(timed_act(policy, obs, full, ctx)[1])
        pruned.append(timed_act(policy, obs, floor, ctx)[1])
    return statistics.median(unpruned), statistics.median(pruned)


def closed_loop(policy: VLAPolicy, env, recipe: PruningRecipe, controller: RetainController,
                steps: int) -> tuple[list[float], list[float]]:
    """`steps` control steps, each with the retain the controller chose; a new episode (fresh
    context, next held-out seed) whenever one ends. Returns (retains chosen, step ms)."""
    ctx = PruneContext(seed=0)
    policy.reset(recipe, ctx)
    obs, _ = env.reset(seed=HELD_OUT_SEED)
    episode, chosen, latencies = 0, [], []
    for _ in range(steps):
        retain = controller.next_retain()
        step, ms = timed_act(policy, obs, recipe.with_retain(retain), ctx)
        controller.observe(retain, ms, {"encode": step.encode_ms})
        chosen.append(retain)
        latencies.append(ms)
        obs, _, terminated, truncated, _ = env.step(step.action)
        if terminated or truncated:
            episode += 1
            policy.reset(recipe, ctx)
            obs, _ = env.reset(seed=HELD_OUT_SEED + episode)
    return chosen, latencies


def test_default_vla_holds_a_latency_target_below_its_unpruned_step_time(policy: VLAPolicy, env) -> None:
    """Target: ~0.6x the unpruned step, but never below what retain_min reaches. The fixed cost
    dominates this small model (retain_min is only ~0.8x the unpruned step here), so the target
    falls halfway between the two. Other jobs share this CPU and can change its speed by more than
    the gap between the two. So a trial counts only if the reference times measured after it match
    the ones before it within 10%, and retain_min must be at least 5% faster than retain 1.0. It
    waits for such a trial (at most 8 tries or 40 s; a trial takes ~1 s on an idle CPU)."""
    recipe = build_recipe(CLOSED_LOOP_METHOD)
    ctx = PruneContext(seed=0)
    policy.reset(recipe, ctx)
    obs, _ = env.reset(seed=HELD_OUT_SEED)
    assert timed_act(policy, obs, recipe.with_retain(1.0), ctx)[0].visual_tokens_kept == 64  # nothing pruned
    reference_ms(policy, obs, recipe, ctx, rounds=3)  # untimed: the first calls pay one-off allocation costs
    unsteady: list[dict] = []
    deadline = time.monotonic() + 40.0
    while len(unsteady) < 8 and time.monotonic() < deadline:
        unpruned_ms, floor_ms = reference_ms(policy, obs, recipe, ctx)
        target = max(0.6 * unpruned_ms, (unpruned_ms + floor_ms) / 2)
        controller = RetainController(target)
        chosen, latencies = closed_loop(policy, env, recipe, controller, 40)
        after = reference_ms(policy, obs, recipe, ctx)
        report = {"unpruned_ms": round(unpruned_ms, 2), "floor_ms": round(floor_ms, 2),
                  "after_ms": tuple(round(ms, 2) for ms in after), "target_ms": round(target, 2),
                  "achieved_ms": round(statistics.median(latencies[-15:]), 2),
                  "retain_last15": round(statistics.median(chosen[-15:]), 3),
                  "reachable": controller.stats()["target_reachable"]}
        steady = abs(after[0] - unpruned_ms) <= 0.1 * unpruned_ms and abs(after[1] - floor_ms) <= 0.1 * floor_ms
        # a reference with no gap between retain 1.0 and retain_min is noise too (or a regression:
        # then every trial lands here and the test fails below)
        if not steady or floor_ms >= 0.95 * unpruned_ms:
            unsteady.append(report)
            continue
        assert all(controller.retain_min <= r <= controller.retain_max for r in chosen), report
        # it pruned to get there (once a slow spell is over it may rightly go back to 1.0)
        assert min(chosen) < 1.0, report
        assert abs(report["achieved_ms"] - target) <= 0.2 * target, report
        return
    pytest.fail(f"no trial with a steady CPU and retain_min at least 5% faster than retain 1.0: {unsteady}")


def test_run_episodes_with_an_unreachable_target_sits_at_retain_min(policy: VLAPolicy) -> None:
    """The `streamprune robot --target-latency-ms` path: a 1 ms step is beyond any retain (the
    vision tower alone takes longer), so the run ends at retain_min and reports its choice."""
    result = run_episodes(policy, DEFAULT_ENV, build_recipe("vla_pruner"), episodes=6, seed=0,
                          target_latency_ms=1.0)
    assert result["target_latency_ms"] == 1.0
    assert result["retain_chosen_last"] == pytest.approx(0.02)
    assert 0.02 <= result["retain_chosen_mean"] < 1.0
    assert np.isfinite(result["latency_ms_median"])
