"""Action chunking on the robot side, LeRobot's async-inference style: a queue of future actions
keyed by the control step each is for, asked to refill before it runs dry, with overlapping chunks
merged step by step.

When to ask (LeRobot `RobotClient._ready_to_send_observation`, src/lerobot/async_inference/
robot_client.py): as soon as queued actions / chunk_size <= `threshold` (LeRobot's
`chunk_size_threshold`, default 0.5); 0 asks only when the queue is empty (no overlap, openpi's
`ActionChunkBroker` plays a chunk out before asking again), 1 asks after every step.

Alignment: a chunk asked for with the observation taken before step t holds the actions for steps
t, t+1, ...; when it arrives at step t' the actions for steps before t' are stale and dropped, and
each of the rest is merged with the action already queued for the same step (LeRobot
`_aggregate_action_queues`, which keys by `timestep` too). LeRobot stamps a chunk with the last
step *played* when the observation was taken, so its first action is always dropped; we stamp it
with the next step to play.

Merge rules (`aggregate`), for one step, `old` queued and `new` arriving:
- "replace": new wins (LeRobot's `latest_only`).
- "average": the uniform mean of every chunk that predicted the step (for two chunks this is
  LeRobot's `average`, 0.5 old + 0.5 new; for three or more LeRobot halves again, weighting the
  newest 1/2, we keep all equal: ACT's temporal ensemble with coefficient 0).
- "weighted": (1 - w) old + w new with w = `new_weight` = 0.7 (LeRobot's default
  `weighted_average`, 0.3 old + 0.7 new; `new_weight` 0.3 is its `conservative`). Applied chunk
  after chunk over n predictions of a step it gives the k-th newest the weight w (1 - w)^k (the
  oldest keeps (1 - w)^(n-1)): exponential weights, the newest highest (ACT's temporal ensembler in
  lerobot/policies/act weights exponentially too, but the oldest highest).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from streamprune.errors import ConfigError

AGGREGATES = ("replace", "average", "weighted")


@dataclass
class ChunkingConfig:
    """How the queue refills and merges; defaults are LeRobot async inference's."""

    chunk_size: int  # actions per chunk the server sends (its metadata's `chunk_size`)
    threshold: float = 0.5  # ask when queued / chunk_size <= threshold
    aggregate: str = "weighted"
    new_weight: float = 0.7  # "weighted": the arriving chunk's share

    def __post_init__(self) -> None:
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ConfigError(f"chunk_size must be a positive integer, got {self.chunk_size!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.aggregate not in AGGREGATES:
            raise ConfigError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {self.aggregate!r}")
        if not 0.0 < self.new_weight <= 1.0:
            raise ConfigError(f"new_weight must be in (0, 1], got {self.new_weight}")


@dataclass
class ChunkStats:
    """queue_sizes: queued actions at each control step, before it takes one. starved_steps: steps
    with nothing queued. latencies_ms: request -> chunk merged. stale_actions: arrived for a step
    already past. merged_actions: arrived for a step that already had one."""

    queue_sizes: list[int] = field(default_factory=list)
    starved_steps: int = 0
    chunks: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    stale_actions: int = 0
    merged_actions: int = 0

    def summary(self) -> dict:
        lat = np.asarray(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        sizes = np.asarray(self.queue_sizes) if self.queue_sizes else np.zeros(1)
        return {"chunks": self.chunks, "starved_steps": self.starved_steps, "stale_actions": self.stale_actions,
                "merged_actions": self.merged_actions, "latency_ms_p50": float(np.percentile(lat, 50)),
                "latency_ms_p99": float(np.percentile(lat, 99)), "queue_size_mean": float(sizes.mean()),
                "queue_size_min": int(sizes.min()), "queue_size_max": int(sizes.max())}


class ActionQueue:
    """Future actions `[A]` keyed by control step; thread-safe (a receiver thread merges chunks
    while the control loop pops). `step` is the next control step to play."""

    def __init__(self, config: ChunkingConfig) -> None:
        self.config = config
        self.step = 0
        self.stats = ChunkStats()
        self._actions: dict[int, np.ndarray] = {}  # step -> action (float64 while merging)
        self._counts: dict[int, int] = {}  # step -> chunks merged into it ("average")
        self._lock = threading.Lock()

    def size(self) -> int:
        with self._lock:
            return len(self._actions)

    def needs_chunk(self) -> bool:
        return self.size() / self.config.chunk_size <= self.config.threshold

    def merge(self, chunk: np.ndarray, asked_at: int, latency_ms: float | None = None) -> None:
        """Merge `chunk` `[H, A]`, whose row i is the action for step `asked_at + i`."""
        chunk = np.asarray(chunk, np.float64)
        if chunk.ndim != 2:
            raise ValueError(f"a chunk is [H, A], got shape {list(chunk.shape)}")
        rule, w = self.config.aggregate, self.config.new_weight
        with self._lock:
            self.stats.chunks += 1
            if latency_ms is not None:
                self.stats.latencies_ms.append(latency_ms)
            for i, new in enumerate(chunk):
                step = asked_at + i
                if step < self.step:
                    self.stats.stale_actions += 1
                    continue
                old = self._actions.get(step)
                if old is None:
                    self._actions[step], self._counts[step] = new.copy(), 1
                    continue
                self.stats.merged_actions += 1
                n = self._counts[step]
                if rule == "replace":
                    merged = new.copy()
                elif rule == "average":
                    merged = (old * n + new) / (n + 1)
                else:
                    merged = (1.0 - w) * old + w * new
                self._actions[step], self._counts[step] = merged, n + 1

    def pop(self) -> np.ndarray | None:
        """The action for the current step (float32), or None when starved; the step advances either way."""
        with self._lock:
            self.stats.queue_sizes.append(len(self._actions))
            action = self._actions.pop(self.step, None)
            self._counts.pop(self.step, None)
            self.step += 1
            if action is None:
                self.stats.starved_steps += 1
                return None
            return action.astype(np.float32)
