"""The stages of the robot loop: env stages are the source (camera images and instructions), the
policy stage encodes them (the recipe's STC-Cacher, one per camera), selects (VLA-Pruner with its
action-attention history, or any recipe) and decodes actions, which go back to the envs.

One *slot* per env. A slot's episode state (its PruneContext: the cacher, VLA-Pruner's history)
lives in the policy stage and is reset when the slot starts an episode, so an env that finishes
early starts its next episode while the others go on.

`LocalRobotStages` runs everything in this process; `RayRobotStages` puts each env in an actor
(they step in parallel) and the policy in another (it loads the model itself, on the placement
asked for). Both answer the same three calls, so the loop in runtime/robot.py is one loop.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from streamprune.config import DEFAULT_ENV, DeviceConfig
from streamprune.pruning.base import PruneContext
from streamprune.pruning.recipe import PruningRecipe


@dataclass
class Transition:
    """What one env step returned (the observation is the next step's input)."""

    obs: dict
    terminated: bool
    truncated: bool
    success: bool
    step_ms: float


@dataclass
class SlotStep:
    """The policy's answer for one slot (numpy and plain numbers: it may cross actors)."""

    action: np.ndarray
    visual_tokens_in: int
    visual_tokens_kept: int
    encode_ms: float
    llm_ms: float  # selection, prefill and action decoding
    cacher_hits: int
    cacher_frames: int
    flops_full: float
    flops_spent: float


def env_options(env_id: str, image_size: int) -> dict[str, Any]:
    """Constructor options of `env_id` for a policy that reads `image_size` px images."""
    return {"image_size": image_size} if env_id == DEFAULT_ENV else {}


class EnvStage:
    """One gymnasium env; a Ray actor under `RayRobotStages`."""

    def __init__(self, env_id: str, image_size: int) -> None:
        from envs import make_env

        self.env = make_env(env_id, **env_options(env_id, image_size))

    def reset(self, seed: int) -> dict:
        obs, _ = self.env.reset(seed=seed)
        return obs

    def step(self, action: np.ndarray) -> Transition:
        start = time.perf_counter()
        obs, _reward, terminated, truncated, info = self.env.step(action)
        return Transition(obs=obs, terminated=bool(terminated), truncated=bool(truncated),
                          success=bool(info.get("is_success", False)),
                          step_ms=(time.perf_counter() - start) * 1000)

    def close(self) -> None:
        self.env.close()


class PolicyStage:
    """The VLA with a recipe and one PruneContext per slot. `act` answers a batch of slots in one
    call; with a recipe that allows it (`VLAPolicy.batches_vision`) their images share one pass of
    the vision tower, otherwise each camera is encoded alone (its STC-Cacher reference is its own).
    The LLM runs per slot: kept tokens and instructions differ in length between envs.

    `policy`: a loaded VLAPolicy, or a model spec loaded here (inside an actor)."""

    def __init__(self, policy: Any, recipe: PruningRecipe, slots: int, seed: int,
                 placement: DeviceConfig | None = None, threads: int | None = None) -> None:
        from streamprune.models.vla import VLAPolicy

        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        if not isinstance(policy, VLAPolicy):
            from streamprune.runtime.robot import load_policy

            policy = load_policy(policy, placement)
        self.policy = policy
        self.recipe = recipe
        self.contexts = [PruneContext(seed=seed) for _ in range(slots)]

    def image_size(self) -> int:
        return int(self.policy.adapter.model.config.vision_config.image_size)

    def start_episode(self, slot: int) -> None:
        self.policy.reset(self.recipe, self.contexts[slot])

    def act(self, batch: list[tuple[int, np.ndarray, str]], retain: float | None = None) -> list[SlotStep]:
        """`batch`: (slot, image `[H, W, 3]` uint8, instruction) per env; `retain` overrides the
        recipe's budget for this step (the latency target's choice)."""
        recipe = self.recipe if retain is None else self.recipe.with_retain(retain)
        encoded: list[Any] = [None] * len(batch)
        share = 0.0
        if len(batch) > 1 and self.policy.batches_vision(recipe):
            start = time.perf_counter()
            encoded = self.policy.encode_batch(np.stack([image for _, image, _ in batch]), recipe)
            share = (time.perf_counter() - start) * 1000 / len(batch)
        out = []
        for (slot, image, instruction), video in zip(batch, encoded):
            step = self.policy.act(image, instruction, recipe, self.contexts[slot], video=video, encode_ms=share)
            stats = step.cacher
            llm_ms = step.latency_ms - (step.encode_ms if video is None else 0.0)
            out.append(SlotStep(action=step.action, visual_tokens_in=step.visual_tokens_in,
                                visual_tokens_kept=step.visual_tokens_kept, encode_ms=step.encode_ms,
                                llm_ms=llm_ms,
                                cacher_hits=stats.cache_hits if stats else 0,
                                cacher_frames=stats.frames if stats else 0,
                                flops_full=stats.flops_full if stats else 0.0,
                                flops_spent=stats.flops_spent if stats else 0.0))
        return out

    def pid(self) -> int:
        return os.getpid()


class RobotStages(Protocol):
    """What the robot loop drives."""

    def reset(self, slot: int, seed: int) -> dict: ...

    def act(self, batch: list[tuple[int, np.ndarray, str]], retain: float | None) -> list[SlotStep]: ...

    def step(self, actions: dict[int, np.ndarray]) -> dict[int, Transition]: ...

    def close(self) -> None: ...


class LocalRobotStages:
    """Envs and policy in this process; envs step one after another."""

    def __init__(self, policy: Any, env_id: str, recipe: PruningRecipe, num_envs: int, seed: int) -> None:
        self.policy = PolicyStage(policy, recipe, num_envs, seed)
        size = self.policy.image_size()
        self.envs = [EnvStage(env_id, size) for _ in range(num_envs)]

    def reset(self, slot: int, seed: int) -> dict:
        self.policy.start_episode(slot)
        return self.envs[slot].reset(seed)

    def act(self, batch: list[tuple[int, np.ndarray, str]], retain: float | None) -> list[SlotStep]:
        return self.policy.act(batch, retain)

    def step(self, actions: dict[int, np.ndarray]) -> dict[int, Transition]:
        return {slot: self.envs[slot].step(action) for slot, action in actions.items()}

    def close(self) -> None:
        for env in self.envs:
            env.close()


class RayRobotStages:
    """Each env an actor (stepped in parallel), the policy an actor that loads `model` itself.
    Ray must be initialised by the caller (`runtime.ray_connect.init_ray`)."""

    def __init__(self, model: str | None, placement: DeviceConfig, env_id: str, recipe: PruningRecipe,
                 num_envs: int, seed: int, threads: int = 1) -> None:
        import ray

        self._ray = ray
        gpus = 1 if placement.device.startswith("cuda") else 0
        policy_cls = ray.remote(PolicyStage).options(num_cpus=0, num_gpus=gpus)
        self.policy = policy_cls.remote(model, recipe, num_envs, seed, placement, threads)
        size = ray.get(self.policy.image_size.remote())
        env_cls = ray.remote(EnvStage).options(num_cpus=0)
        self.envs = [env_cls.remote(env_id, size) for _ in range(num_envs)]

    def _get(self, refs: Any) -> Any:
        from ray.exceptions import RayTaskError

        try:
            return self._ray.get(refs)
        except RayTaskError as e:  # the actor's own exception, not Ray's wrapper
            raise e.cause if isinstance(e.cause, Exception) else e from None

    def reset(self, slot: int, seed: int) -> dict:
        self._get(self.policy.start_episode.remote(slot))
        return self._get(self.envs[slot].reset.remote(seed))

    def act(self, batch: list[tuple[int, np.ndarray, str]], retain: float | None) -> list[SlotStep]:
        return self._get(self.policy.act.remote(batch, retain))

    def step(self, actions: dict[int, np.ndarray]) -> dict[int, Transition]:
        slots = list(actions)
        done = self._get([self.envs[s].step.remote(actions[s]) for s in slots])
        return dict(zip(slots, done))

    def close(self) -> None:
        for env in self.envs:
            self._get(env.close.remote())
            self._ray.kill(env, no_restart=True)
        self._ray.kill(self.policy, no_restart=True)
