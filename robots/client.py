"""A robot client for the policy server: sends observations, applies actions, stays safe.

Safety rule: the robot is never driven by a stale or missing answer. If no answer arrives within
`deadline_s`, the client applies the hold action (zeros: stand still) for that control tick,
counts it, and asks again with the newest observation on the next tick; answers that arrive late
(their `seq` is not the one awaited) are discarded. Action chunks (a reply with k > 1 actions) are
played out one per tick before the server is asked again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import zmq

from streamprune.transport import wire

log = logging.getLogger(__name__)


@dataclass
class ClientStats:
    requests: int = 0
    answers: int = 0
    timeouts: int = 0
    held_steps: int = 0
    late_discarded: int = 0
    errors: list[str] = field(default_factory=list)
    round_trip_ms: list[float] = field(default_factory=list)


class PolicyClient:
    """DEALER socket to a PolicyServer; `act(obs)` returns an action or the hold action."""

    def __init__(self, address: str, action_dim: int, deadline_s: float = 1.0) -> None:
        self.address, self.action_dim, self.deadline_s = address, action_dim, deadline_s
        self.context = zmq.Context.instance()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, 4)
        self.socket.connect(address)
        self.stats = ClientStats()
        self.seq = 0
        self.chunk: list[np.ndarray] = []
        self.episode = 0

    def hold_action(self) -> np.ndarray:
        return np.zeros(self.action_dim, dtype=np.float32)

    def new_episode(self) -> None:
        self.episode += 1
        self.chunk = []

    def act(self, image: np.ndarray, instruction: str) -> tuple[np.ndarray, bool]:
        """(action, held): the next action of the current chunk, a fresh answer, or the hold
        action when the server did not answer within the deadline."""
        if self.chunk:
            return self.chunk.pop(0), False
        self.seq += 1
        self.stats.requests += 1
        start = time.perf_counter()
        try:
            self.socket.send_multipart(wire.encode(np.ascontiguousarray(image), kind="obs", seq=self.seq,
                                                   instruction=instruction, episode=self.episode), zmq.NOBLOCK)
        except zmq.Again:  # queue full: the server is gone
            return self._hold()
        deadline = start + self.deadline_s
        while (remaining := deadline - time.perf_counter()) > 0:
            if not self.socket.poll(max(1, int(remaining * 1000))):
                break
            try:
                header, array = wire.decode(self.socket.recv_multipart())
            except wire.WireError as err:
                self.stats.errors.append(str(err))
                continue
            if header["seq"] != self.seq:
                self.stats.late_discarded += 1
                continue
            if header["kind"] == "error":
                self.stats.errors.append(str(header.get("error")))
                return self._hold(timeout=False)
            self.stats.answers += 1
            self.stats.round_trip_ms.append((time.perf_counter() - start) * 1000)
            actions = np.asarray(array, dtype=np.float32).reshape(-1, self.action_dim)
            self.chunk = [a for a in actions[1:]]
            return actions[0], False
        return self._hold()

    def _hold(self, timeout: bool = True) -> tuple[np.ndarray, bool]:
        self.stats.timeouts += int(timeout)
        self.stats.held_steps += 1
        if timeout:
            log.warning("no answer from %s within %.2fs: holding still", self.address, self.deadline_s)
        return self.hold_action(), True

    def close(self) -> None:
        self.socket.close(linger=0)


def run_episode(env: gym.Env, client: PolicyClient, seed: int | None = None, max_steps: int | None = None,
                on_step=None) -> dict:
    """One closed-loop episode through the server: success, length, held steps."""
    obs, info = env.reset(seed=seed)
    client.new_episode()
    held = 0
    steps = 0
    success = False
    while True:
        action, was_held = client.act(obs["image"], obs["instruction"])
        held += was_held
        obs, _reward, terminated, truncated, info = env.step(action)
        steps += 1
        success = bool(info.get("is_success", False))
        if on_step is not None:
            on_step(steps, was_held)
        if terminated or truncated or (max_steps is not None and steps >= max_steps):
            break
    return {"success": success, "steps": steps, "held_steps": held}
