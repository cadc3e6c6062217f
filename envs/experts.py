"""Scripted experts that read the true simulator state: demonstrations for behaviour cloning and
an end-to-end check that an env can be solved at all."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np

from streamprune.errors import ConfigError

if TYPE_CHECKING:
    from envs.libero import LiberoEnv


def expert_action(env: gym.Env) -> np.ndarray:
    """The scripted expert's next action for `env` (wrapped or not), from its true state."""
    base = env.unwrapped
    act = getattr(base, "expert_action", None)
    if act is None:
        raise ConfigError(f"no scripted expert for {type(base).__name__}")
    return act()


def _quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product of (x, y, z, w) quaternions."""
    ax, ay, az, aw = a
    bx, by, bz, bw = b
    return np.array(
        [
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
            aw * bw - ax * bx - ay * by - az * bz,
        ]
    )


def _rotation_error(target: np.ndarray, current: np.ndarray) -> np.ndarray:
    """World-frame axis-angle taking `current` to `target` ((x, y, z, w) quaternions). [3]"""
    inv = np.array([-current[0], -current[1], -current[2], current[3]])
    q = _quat_mul(target, inv)
    if q[3] < 0:  # shortest way round
        q = -q
    s = np.linalg.norm(q[:3])
    if s < 1e-9:
        return np.zeros(3)
    return q[:3] / s * 2.0 * np.arctan2(s, q[3])


_MJ_GEOM_MESH = 7  # mujoco.mjtGeom.mjGEOM_MESH, without importing MuJoCo here


def _gap(point: np.ndarray, box: tuple[np.ndarray, np.ndarray]) -> float:
    """Horizontal distance from `point` [2] to a box's footprint (0 inside it)."""
    lo, hi = box
    return float(np.linalg.norm(np.maximum(0.0, np.maximum(lo[:2] - point, point - hi[:2]))))


class LiberoPickPlaceExpert:
    """Move above / descend / grasp / lift / carry / lower / release, for LIBERO goals of the form
    `(On|In obj target)`, driving the end effector with OSC_POSE delta actions.

    The grasp point comes from the object's world bounding box at the start of the episode:
    objects narrower than the open gripper are grasped at their centre; wider ones (bowls,
    plates) at the rim on the side along the fingers' closing axis (world y), so one finger goes
    inside the wall and one outside. The end effector keeps its initial orientation.
    """

    POS_SCALE = 0.05  # metres per unit of action (robosuite OSC_POSE output_max)
    ROT_SCALE = 0.5  # radians per unit of action
    GAIN = 2.0  # proportional gain on the position error, in action units per POS_SCALE
    MAX_HALF_WIDTH = 0.03  # objects at most twice this wide fit the open gripper (~0.08 m)
    GRASP_DEPTH = 0.03  # how far below an object's top the fingers close
    RIM_INSET = 0.012  # how far inside a wide object's edge the fingers straddle its wall
    CLEARANCE = 0.08  # carry height above the highest thing on the path

    def __init__(self, env: LiberoEnv) -> None:
        self.env = env
        sim_env = env.sim_env.env
        goals = sim_env.parsed_problem["goal_state"]
        if len(goals) != 1 or goals[0][0].lower() not in ("on", "in"):
            raise ConfigError(f"the scripted LIBERO expert handles one (On|In obj target) goal, got {goals}")
        _, obj, target = goals[0]
        self.sim = sim_env.sim
        self.sim_env, self.obj = sim_env, obj
        self.obj_body = self._body_id(sim_env.objects_dict[obj].root_body)
        self.target_pos, self.target_top = self._target_location(sim_env, target)
        self.side = 0.0
        self._plan_grasp(choose_side=True)
        self.quat0 = self._eef_quat()
        self.phase = "above"
        self.count = 0

    def _plan_grasp(self, choose_side: bool) -> None:
        """Grasp point, hold offset and carry height from the object's current bounding box."""
        lo, hi = self._aabb(self.obj_body)
        centre = self.sim.data.body_xpos[self.obj_body].copy()
        half = (hi - lo) / 2
        grasp = centre.copy()
        grasp[2] = max(hi[2] - self.GRASP_DEPTH, lo[2] + 0.015)
        if min(half[0], half[1]) > self.MAX_HALF_WIDTH:
            if choose_side:
                # Straddle the wall at +y or -y, whichever side is farther from anything standing
                # taller than the grasp height (the hand is wider than the fingers).
                obstacles = [b for b in self._other_boxes(self.sim_env, self.obj) if b[1][2] > grasp[2]]
                sides = [centre[:2] + np.array([0.0, s * half[1]]) for s in (1.0, -1.0)]
                room = [min((_gap(p, box) for box in obstacles), default=1.0) for p in sides]
                self.side = 1.0 if room[0] >= room[1] else -1.0
            grasp[1] += self.side * (half[1] - self.RIM_INSET)
        self.grasp = grasp
        self.grasp_from_bottom = grasp[2] - lo[2]
        self.offset = grasp - centre  # keeps the object where the gripper holds it
        self.carry_z = max(hi[2], self.target_top + (hi[2] - lo[2])) + self.CLEARANCE

    # --- geometry ---------------------------------------------------------------------------
    def _body_id(self, name: str) -> int:
        return int(self.sim.model.body_name2id(name))

    def _aabb(self, root: int) -> tuple[np.ndarray, np.ndarray]:
        """World bounding box of every geom on `root` and the bodies under it. [3], [3]"""
        model, data = self.sim.model, self.sim.data
        bodies = {root}
        for b in range(model.nbody):  # parents come before children in MuJoCo
            if int(model.body_parentid[b]) in bodies:
                bodies.add(b)
        pts = []
        for g in range(model.ngeom):
            if int(model.geom_bodyid[g]) not in bodies:
                continue
            pos, rot = data.geom_xpos[g], data.geom_xmat[g].reshape(3, 3)
            if int(model.geom_type[g]) == _MJ_GEOM_MESH:  # use its vertices
                mid = int(model.geom_dataid[g])
                a, n = int(model.mesh_vertadr[mid]), int(model.mesh_vertnum[mid])
                pts.append(pos + model.mesh_vert[a : a + n] @ rot.T)
            else:  # primitive: a box of its rbound radius is close enough
                r = float(model.geom_rbound[g])
                pts.append(np.stack([pos - r, pos + r]))
        allp = np.concatenate(pts)
        return allp.min(0), allp.max(0)

    def _other_boxes(self, sim_env: Any, exclude: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """World bounding boxes of every object and fixture but `exclude`."""
        tables = {**sim_env.objects_dict, **sim_env.fixtures_dict}
        return [self._aabb(self._body_id(o.root_body)) for name, o in tables.items() if name != exclude]

    def _target_location(self, sim_env: Any, target: str) -> tuple[np.ndarray, float]:
        """Where to put the object: centre of the target object (its top height) or region."""
        for table in (sim_env.objects_dict, sim_env.fixtures_dict):
            if target in table:
                body = self._body_id(table[target].root_body)
                lo, hi = self._aabb(body)
                return self.sim.data.body_xpos[body].copy(), float(hi[2])
        if target in sim_env.object_sites_dict:
            site = self.sim.model.site_name2id(target)
            pos = self.sim.data.site_xpos[site].copy()
            return pos, float(pos[2])
        raise ConfigError(f"the scripted LIBERO expert cannot locate goal target {target!r}")

    def _eef_pos(self) -> np.ndarray:
        return np.asarray(self.env.raw_obs["robot0_eef_pos"], np.float64)

    def _eef_quat(self) -> np.ndarray:
        return np.asarray(self.env.raw_obs["robot0_eef_quat"], np.float64)

    # --- control ----------------------------------------------------------------------------
    def _move(self, goal: np.ndarray, gripper: float) -> np.ndarray:
        pos_err = goal - self._eef_pos()
        rot_err = _rotation_error(self.quat0, self._eef_quat())
        action = np.zeros(7)
        action[:3] = np.clip(self.GAIN * pos_err / self.POS_SCALE, -1.0, 1.0)
        action[3:6] = np.clip(rot_err / self.ROT_SCALE, -1.0, 1.0)
        action[6] = gripper
        return action

    def _reached(self, goal: np.ndarray, tol: float) -> bool:
        return bool(np.linalg.norm(goal - self._eef_pos()) < tol)

    def _plan(self) -> dict[str, tuple[np.ndarray, float, float | int, str]]:
        """Each phase: (waypoint, gripper command, tolerance in m or step count, next phase)."""
        above = np.array([self.grasp[0], self.grasp[1], self.carry_z])
        lifted = above.copy()
        place_xy = self.target_pos[:2] + self.offset[:2]
        over_target = np.array([place_xy[0], place_xy[1], self.carry_z])
        lowered = np.array([place_xy[0], place_xy[1], self.target_top + self.grasp_from_bottom + 0.02])
        plan = {  # phase: (waypoint, gripper, tolerance or step count, next phase)
            "above": (above, -1.0, 0.01, "descend"),
            "descend": (self.grasp, -1.0, 0.006, "grasp"),
            "grasp": (self.grasp, 1.0, 15, "lift"),
            "lift": (lifted, 1.0, 0.02, "carry"),
            "carry": (over_target, 1.0, 0.015, "lower"),
            "lower": (lowered, 1.0, 0.01, "release"),
            "release": (lowered, -1.0, 10, "retreat"),
            "retreat": (over_target, -1.0, 0.0, "retreat"),
        }
        return plan

    def act(self) -> np.ndarray:
        """One step of the phase machine: each phase holds a waypoint until reached. [7]"""
        self.count += 1
        goal, gripper, done_when, nxt = self._plan()[self.phase]
        finished = self.count >= done_when if isinstance(done_when, int) else self._reached(goal, done_when)
        if finished and nxt != self.phase:
            self.phase, self.count = nxt, 0
            if nxt == "descend":  # the object may have settled or been nudged since the start
                self._plan_grasp(choose_side=False)
            goal, gripper, _, _ = self._plan()[self.phase]
        return self._move(goal, gripper).astype(np.float32)
