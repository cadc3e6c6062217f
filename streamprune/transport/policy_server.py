"""The policy server: observation -> action over zmq, in the msgpack-plus-raw-buffer wire format.

A ROUTER socket so any number of robot clients (DEALER sockets) can talk to one server; each
client's episode state (VLA-Pruner's action history) is kept per client identity and reset when
the client starts a new episode. A bad request (malformed message, wrong image shape or dtype, no
instruction) gets an `error` reply and the server keeps serving.

Request:  kind "obs",    buffer = image [H, W, 3] uint8, fields instruction (str), episode (int).
Reply:    kind "action", buffer = actions [k, A] float32 (k > 1 is an action chunk), fields
          latency_ms, visual_tokens_kept, visual_tokens_in;  or kind "error", field error (str).
The reply carries the request's `seq`, so a client can discard late answers.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import numpy as np
import zmq

from streamprune.errors import ConfigError
from streamprune.models.vla import VLAPolicy
from streamprune.pruning.base import PruneContext
from streamprune.pruning.recipe import PruningRecipe
from streamprune.transport import wire
from streamprune.transport.zmq_frames import is_loopback

log = logging.getLogger(__name__)

MAX_OBS_BYTES = 16 * 1024 * 1024


@dataclass
class ServerStats:
    requests: int = 0
    answered: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)


class PolicyServer:
    """Serve `policy` with `recipe` on `bind` until `stop` is set (poll granularity 50 ms)."""

    def __init__(self, policy: VLAPolicy, recipe: PruningRecipe, bind: str, image_shape: tuple[int, ...],
                 allow_remote: bool = False) -> None:
        if not allow_remote and not is_loopback(bind):
            raise ConfigError(f"refusing to bind {bind}: not a loopback address (pass allow_remote to expose it)")
        self.policy, self.recipe, self.image_shape = policy, recipe, tuple(image_shape)
        self.stats = ServerStats()
        self.stop = threading.Event()
        self.context = zmq.Context.instance()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(bind)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._episodes: dict[bytes, tuple[int, PruneContext]] = {}

    def serve_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        try:
            while not self.stop.is_set():
                if not dict(poller.poll(50)):
                    continue
                identity, *parts = self.socket.recv_multipart(copy=True)
                self.stats.requests += 1
                reply = self.handle(identity, parts)
                self.socket.send_multipart([identity, *reply])
        finally:
            self.socket.close(linger=0)

    def handle(self, identity: bytes, parts: list[bytes]) -> list[bytes]:
        seq = 0
        try:
            header, image = wire.decode(parts, max_bytes=MAX_OBS_BYTES)
            seq = header["seq"]
            self._check(header, image)
            ctx = self._context(identity, header.get("episode", 0))
            step = self.policy.act(np.asarray(image), header["instruction"], self.recipe, ctx)
        except (wire.WireError, ValueError) as err:
            self.stats.errors += 1
            log.warning("bad request from %s: %s", identity.hex(), err)
            return wire.encode(None, kind="error", seq=seq, error=str(err))
        self.stats.answered += 1
        self.stats.latencies_ms.append(step.latency_ms)
        return wire.encode(step.action[None].astype(np.float32), kind="action", seq=seq,
                           latency_ms=step.latency_ms, visual_tokens_kept=step.visual_tokens_kept,
                           visual_tokens_in=step.visual_tokens_in)

    def _check(self, header: dict, image: np.ndarray) -> None:
        if header["kind"] != "obs":
            raise ValueError(f"expected an 'obs' message, got {header['kind']!r}")
        if image.dtype != np.uint8 or image.shape != self.image_shape:
            raise ValueError(f"observation image must be uint8 {list(self.image_shape)}, "
                             f"got {image.dtype} {list(image.shape)}")
        if not isinstance(header.get("instruction"), str) or not header["instruction"].strip():
            raise ValueError("observation lacks an 'instruction' string")

    def _context(self, identity: bytes, episode: int) -> PruneContext:
        known = self._episodes.get(identity)
        if known is None or known[0] != episode:
            ctx = PruneContext()
            self.policy.reset(self.recipe, ctx)
            self._episodes[identity] = (episode, ctx)
        return self._episodes[identity][1]
