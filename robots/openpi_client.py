"""A robot client in openpi's websocket protocol, and a control loop that plays queued actions
while a background thread asks for the next chunk (LeRobot's async inference, robots/chunking.py).

`OpenPIClient` follows openpi's `packages/openpi-client/src/openpi_client/websocket_client_policy.py`
(Physical-Intelligence/openpi): connect with permessage-deflate off and no message size cap,
retrying while the server is not up yet; read the metadata map the server sends first; then
`infer(obs)` sends one msgpack-numpy map and reads one back, and a *text* reply is the server's
error. It is written against the wire format alone (streamprune.transport.msgpack_numpy, checked
byte for byte against openpi's layout in tests/test_openpi.py), nothing of our server, so a client
it talks to is one an openpi client talks to unchanged. Two additions, both client-side: a reply
timeout (after which the connection is closed: openpi's replies carry no sequence number, so a late
one could not be told from the next) and one-line OpenPIError instead of RuntimeError.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import gymnasium as gym
import numpy as np
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.sync.client import ClientConnection, connect

from robots.chunking import ActionQueue, ChunkingConfig
from streamprune.errors import InputError
from streamprune.transport import msgpack_numpy

log = logging.getLogger(__name__)

IMAGE_KEY, STATE_KEY, PROMPT_KEY = "observation/image", "observation/state", "prompt"  # openpi's LIBERO names


class OpenPIError(InputError):
    """The policy server cannot be reached, closed the connection, or answered with an error."""


class OpenPIClient:
    """`infer(obs) -> dict` against an openpi-protocol policy server at `uri` (ws://HOST:PORT)."""

    def __init__(self, uri: str = "ws://127.0.0.1:8000", connect_timeout_s: float = 10.0,
                 timeout_s: float | None = 30.0) -> None:
        self.uri, self.timeout_s = uri if uri.startswith("ws") else f"ws://{uri}", timeout_s
        self._ws, self.metadata = self._connect(connect_timeout_s)

    def _connect(self, timeout_s: float) -> tuple[ClientConnection, dict]:
        deadline, pause = time.monotonic() + timeout_s, 0.05
        while True:
            try:
                # entered as a context manager (websockets >= 17.1 warns otherwise); close() exits it
                ws = connect(self.uri, compression=None, max_size=None, open_timeout=max(timeout_s, 1.0)).__enter__()
                break
            except (InvalidURI, InvalidHandshake) as err:
                raise OpenPIError(f"{self.uri} is not an openpi policy server: {err}") from None
            except OSError as err:  # refused while the server starts: openpi waits too (every 5 s)
                if time.monotonic() + pause > deadline:
                    raise OpenPIError(f"no policy server at {self.uri} within {timeout_s:g} s: {err}") from None
                time.sleep(pause)
                pause = min(pause * 2, 1.0)
        try:
            metadata = msgpack_numpy.unpackb(ws.recv(timeout=timeout_s))
        except (TimeoutError, ConnectionClosed, msgpack_numpy.MsgpackNumpyError) as err:
            ws.close()
            raise OpenPIError(f"{self.uri} sent no metadata map on connect: {err}") from None
        if not isinstance(metadata, dict):
            ws.close()
            raise OpenPIError(f"{self.uri} sent {type(metadata).__name__} as metadata, not a map")
        return ws, metadata

    def infer(self, obs: dict) -> dict:
        """One observation map -> the server's reply map (`actions` [H, A], timings, ...)."""
        try:
            self._ws.send(msgpack_numpy.packb(obs))
            reply = self._ws.recv(timeout=self.timeout_s)
        except TimeoutError:
            self._ws.close()
            raise OpenPIError(f"no reply from {self.uri} within {self.timeout_s:g} s; connection closed") from None
        except ConnectionClosed as err:
            raise OpenPIError(f"{self.uri} closed the connection ({err})") from None
        if isinstance(reply, str):  # openpi's convention: text is an error (a traceback or one line)
            lines = [line for line in reply.strip().splitlines() if line.strip()]
            raise OpenPIError(f"policy server error: {lines[-1] if lines else 'no detail'}")
        result = msgpack_numpy.unpackb(reply)
        if not isinstance(result, dict) or not isinstance(result.get("actions"), np.ndarray):
            raise OpenPIError(f"{self.uri} replied without an 'actions' array")
        return result

    def close(self) -> None:
        self._ws.close()


def openpi_observation(obs: dict, episode: int) -> dict:
    """A gymnasium observation (image, instruction, state) under openpi's LIBERO key names, plus
    our `episode` number (the server restarts its per-episode pruning state when it changes)."""
    wire = {IMAGE_KEY: np.ascontiguousarray(obs["image"]), PROMPT_KEY: str(obs["instruction"]), "episode": episode}
    if "state" in obs:
        wire[STATE_KEY] = np.asarray(obs["state"], np.float32)
    return wire


class ChunkRequester:
    """A thread that asks for one chunk at a time and merges each into the queue as it arrives."""

    def __init__(self, client: OpenPIClient, queue: ActionQueue) -> None:
        self.client, self.queue = client, queue
        self.errors: list[str] = []
        self._pending: tuple[dict, int] | None = None
        self._busy = False
        self._stop = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="chunk-requester", daemon=True)
        self._thread.start()

    def ask(self, obs: dict, step: int) -> bool:
        """Ask for the chunk that starts at control step `step`; False while one is in flight."""
        with self._cond:
            if self._busy:
                return False
            self._pending, self._busy = (obs, step), True
            self._cond.notify_all()
            return True

    def wait_idle(self, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._busy, timeout_s)

    def close(self) -> None:
        """Stop after the request in flight (its reply must be read before the socket is reused)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._stop)
                if self._pending is None:
                    return
                (obs, step), self._pending = self._pending, None
            start = time.perf_counter()
            try:
                actions = self.client.infer(obs)["actions"]
                self.queue.merge(actions, step, latency_ms=(time.perf_counter() - start) * 1000)
            except (OpenPIError, ValueError) as err:
                self.errors.append(str(err))
                log.warning("chunk request failed: %s", err)
            with self._cond:
                self._busy = False
                self._cond.notify_all()


def run_chunked_episode(env: gym.Env, client: OpenPIClient, chunking: ChunkingConfig | None = None, *,
                        seed: int | None = None, episode: int = 0, control_hz: float = 20.0,
                        max_steps: int | None = None, first_chunk_timeout_s: float = 30.0) -> dict[str, Any]:
    """One episode at `control_hz`: each tick plays the queued action for that step (or holds
    still, zeros, when starved: the safety rule of robots/client.py) and, when the queue is low,
    hands the newest observation to the requester thread. The first chunk is awaited before the
    clock starts. Returns success, steps, the queue's statistics (ChunkStats.summary) and its size
    at every step."""
    chunking = chunking or ChunkingConfig(chunk_size=int(client.metadata.get("chunk_size", 1)))
    hold = np.zeros(int(client.metadata["action_dim"]), np.float32)
    queue = ActionQueue(chunking)
    requester = ChunkRequester(client, queue)
    obs, info = env.reset(seed=seed)
    steps, success, period = 0, False, 1.0 / control_hz
    try:
        requester.ask(openpi_observation(obs, episode), queue.step)
        if not requester.wait_idle(first_chunk_timeout_s) or requester.errors:
            raise OpenPIError(requester.errors[0] if requester.errors else
                              f"no first chunk within {first_chunk_timeout_s:g} s")
        tick = time.perf_counter()
        while True:
            action = queue.pop()
            obs, _reward, terminated, truncated, info = env.step(hold if action is None else action)
            steps += 1
            success = bool(info.get("is_success", False))
            if terminated or truncated or (max_steps is not None and steps >= max_steps):
                break
            if queue.needs_chunk():  # LeRobot's order: act, then send the observation that followed
                requester.ask(openpi_observation(obs, episode), queue.step)
            tick += period
            time.sleep(max(0.0, tick - time.perf_counter()))  # the control rate, as LeRobot's loop keeps it
    finally:
        requester.close()
    return {"success": success, "steps": steps, "request_errors": len(requester.errors), **queue.stats.summary(),
            "queue_sizes": list(queue.stats.queue_sizes)}  # per step, before it took its action
