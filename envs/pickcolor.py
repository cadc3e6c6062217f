"""PickColor: a fast 2-D reaching task whose instruction names the target, so a policy must look.

Several objects (distinct colours, random shapes) lie on a dark table; a white cross marks the
agent. The instruction ("reach the red circle") names one of them. Actions are 2-D velocities in
[-1, 1] that move the cross by `step_size` of the arena per unit; the episode succeeds (and
terminates) when the cross is within `success_radius` of the named object's centre, and is
truncated after `max_steps`. Everything is numpy: the objects are drawn once per reset and each
step only pastes the cross onto a copy, so rendering costs microseconds.

The arena is the unit square; pixel (row, col) covers y in [row/S, (row+1)/S), x likewise.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from streamprune.errors import ConfigError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 100, 240),
    "yellow": (235, 215, 40),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (30, 30, 30)
AGENT_COLOUR = (255, 255, 255)
INSTRUCTION_CHARSET = string.ascii_lowercase + " "
MAX_INSTRUCTION_LENGTH = 64


@dataclass
class PickColorConfig:
    """Task knobs; the defaults keep it learnable by a small VLA from ~100 expert episodes."""

    image_size: int = 64
    n_objects: int = 3
    max_steps: int = 30
    step_size: float = 0.1  # arena fraction moved per unit action
    object_radius: float = 0.09  # half-width of an object, arena fraction
    success_radius: float = 0.06  # agent-to-target-centre distance that counts as reached
    min_separation: float = 0.3  # between object centres, so targets never overlap

    def validate(self) -> None:
        if not 1 <= self.n_objects <= len(COLOURS):
            raise ConfigError(f"n_objects must be in 1..{len(COLOURS)}, got {self.n_objects}")
        if self.image_size < 16:
            raise ConfigError(f"image_size must be >= 16 pixels, got {self.image_size}")
        if self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if not 0 < self.step_size <= 1:
            raise ConfigError(f"step_size must be in (0, 1], got {self.step_size}")


class PickColorEnv(gym.Env):
    """Reach the object the instruction names. Observation: Dict(image [S, S, 3] uint8,
    instruction Text, state [2] = agent (x, y) in [0, 1]). Action: Box [-1, 1]^2 = (dx, dy)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, render_mode: str | None = None, **kwargs: Any) -> None:
        self.config = PickColorConfig(**kwargs)
        self.config.validate()
        if render_mode not in (None, "rgb_array"):
            raise ConfigError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.render_mode = render_mode
        size = self.config.image_size
        self.observation_space = spaces.Dict(
            {
                "image": spaces.Box(0, 255, (size, size, 3), np.uint8),
                "instruction": spaces.Text(MAX_INSTRUCTION_LENGTH, min_length=1, charset=INSTRUCTION_CHARSET),
                "state": spaces.Box(0.0, 1.0, (2,), np.float32),
            }
        )
        self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
        centres = (np.arange(size, dtype=np.float32) + 0.5) / size
        self._ys, self._xs = np.meshgrid(centres, centres, indexing="ij")  # [S, S] each
        self._background = np.zeros((size, size, 3), np.uint8)
        self.objects: list[tuple[str, str, np.ndarray]] = []  # (colour, shape, centre xy)
        self.target = 0
        self.agent = np.zeros(2, np.float32)
        self.steps = 0
        self.target_name = ""
        self.instruction = ""

    # --- gymnasium API -------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        cfg, rng = self.config, self.np_random
        colours = rng.choice(len(COLOURS), cfg.n_objects, replace=False)
        centres = self._sample_separated(cfg.n_objects)
        names = list(COLOURS)
        self.objects = [
            (names[c], SHAPES[int(rng.integers(len(SHAPES)))], centres[i]) for i, c in enumerate(colours)
        ]
        self.target = int(rng.integers(cfg.n_objects))
        colour, shape, _ = self.objects[self.target]
        self.target_name = f"{colour} {shape}"
        self.instruction = f"reach the {self.target_name}"
        # Start away from every object so no episode is won at step 0.
        while True:
            self.agent = rng.uniform(0.05, 0.95, 2).astype(np.float32)
            if min(np.linalg.norm(self.agent - c) for _, _, c in self.objects) > 2 * cfg.success_radius:
                break
        self.steps = 0
        self._draw_background()
        return self._obs(), self._info()

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        action = np.clip(np.asarray(action, np.float32).reshape(2), -1.0, 1.0)
        self.agent = np.clip(self.agent + self.config.step_size * action, 0.0, 1.0).astype(np.float32)
        self.steps += 1
        success = self._distance() <= self.config.success_radius
        truncated = not success and self.steps >= self.config.max_steps
        return self._obs(), float(success), bool(success), bool(truncated), self._info()

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        return self._image()

    # --- expert --------------------------------------------------------------------------------
    def expert_action(self) -> np.ndarray:
        """Head straight for the target, at full speed until the last step lands on it. [2]"""
        delta = (self.objects[self.target][2] - self.agent) / self.config.step_size
        return np.clip(delta, -1.0, 1.0).astype(np.float32)

    # --- internals -----------------------------------------------------------------------------
    def _sample_separated(self, n: int) -> list[np.ndarray]:
        cfg, rng = self.config, self.np_random
        margin = cfg.object_radius + 0.05
        while True:  # rejection sampling: with n <= 4 and separation 0.3 this takes a few tries
            pts = rng.uniform(margin, 1 - margin, (n, 2)).astype(np.float32)
            d = np.linalg.norm(pts[:, None] - pts[None], axis=-1) + np.eye(n)
            if n == 1 or d.min() >= cfg.min_separation:
                return list(pts)

    def _draw_background(self) -> None:
        img = self._background
        img[:] = BACKGROUND
        r = self.config.object_radius
        for colour, shape, (cx, cy) in self.objects:
            dx, dy = self._xs - cx, self._ys - cy
            if shape == "circle":
                mask = dx * dx + dy * dy <= r * r
            elif shape == "square":
                mask = (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
            else:  # triangle pointing up: below the two slanted edges, above the base
                mask = (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.55)
            img[mask] = COLOURS[colour]

    def _image(self) -> np.ndarray:
        img = self._background.copy()
        size = self.config.image_size
        col = min(int(self.agent[0] * size), size - 1)
        row = min(int(self.agent[1] * size), size - 1)
        arm = max(1, size // 21)  # a plus sign ~7 px wide at 64x64
        # strokes 2 px thick at 64x64: a 1 px cross moves a 4 px patch's embedding too little for a
        # small policy to find it early in training
        lo, hi = (row, row + 1) if size < 48 else (max(row - 1, 0), row + 1)
        left, right = (col, col + 1) if size < 48 else (max(col - 1, 0), col + 1)
        img[max(row - arm, 0) : row + arm + 1, left:right] = AGENT_COLOUR
        img[lo:hi, max(col - arm, 0) : col + arm + 1] = AGENT_COLOUR
        return img

    def _distance(self) -> float:
        return float(np.linalg.norm(self.agent - self.objects[self.target][2]))

    def _obs(self) -> dict:
        return {"image": self._image(), "instruction": self.instruction, "state": self.agent.copy()}

    def _info(self) -> dict:
        return {"is_success": self._distance() <= self.config.success_radius, "target": self.target_name}
