"""The policy server: observation -> action over zmq, in the msgpack-plus-raw-buffer wire format.

A ROUTER socket so any number of robot clients (DEALER sockets) can talk to one server; each
client's episode state (VLA-Pruner's action history) is kept per client identity and reset when
the client starts a new episode. A bad request (malformed message, wrong image shape or dtype, no
instruction) is counted in `stats.malformed` and gets an `error` reply; nothing a peer sends can
raise out of the serving loop (`decode_request` is the one check, fuzzed by tests/test_wire_fuzz.py).

Request:  kind "obs",    buffer = image [H, W, 3] uint8, fields instruction (str), episode (int).
Reply:    kind "action", buffer = actions [k, A] float32 (k > 1 is an action chunk), fields
          latency_ms, visual_tokens_kept, visual_tokens_in;  or kind "error", field error (str).
The reply carries the request's `seq`, so a client can discard late answers.

The field checks and the policy step (`check_observation`, `PolicyRunner`) are shared with the
openpi websocket server (openpi_server.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np
import zmq

from streamprune.errors import ConfigError
from streamprune.models.vla import PolicyStep, VLAPolicy
from streamprune.pruning.base import PruneContext
from streamprune.pruning.recipe import PruningRecipe
from streamprune.transport import wire
from streamprune.transport.zmq_frames import is_loopback

log = logging.getLogger(__name__)

MAX_OBS_BYTES = 16 * 1024 * 1024
MAX_INSTRUCTION_CHARS = 4000
MAX_SEQ = 2**63 - 1  # the reply echoes seq, and msgpack packs 64-bit integers only
MAX_ERROR_CHARS = 500  # an error reply stays far below the header limit


@dataclass
class ServerStats:
    """requests: messages received.  answered: actions sent.  errors: error replies sent.
    malformed: requests that were not a valid observation (each also got an error reply)."""

    requests: int = 0
    answered: int = 0
    errors: int = 0
    malformed: int = 0
    latencies_ms: list[float] = field(default_factory=list)


class BadRequest(wire.WireError):
    """A request that is not a valid observation; `seq` is the request's when its header was readable."""

    def __init__(self, message: str, seq: int = 0) -> None:
        super().__init__(message)
        self.seq = seq


@dataclass(frozen=True)
class Request:
    """A valid observation: image `[H, W, 3]` uint8 (read-only), instruction, episode number."""

    seq: int
    image: np.ndarray
    instruction: str
    episode: int


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_SEQ


def check_observation(image: object, instruction: object, episode: object, image_shape: tuple[int, ...],
                      seq: int = 0) -> Request:
    """The one check of an observation's fields, whichever protocol carried them (zmq here, openpi's
    websocket in openpi_server.py): BadRequest saying what is wrong, else the Request."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.shape != tuple(image_shape):
        got = f"{image.dtype} {list(image.shape)[:8]}" if isinstance(image, np.ndarray) else type(image).__name__
        raise BadRequest(f"observation image must be uint8 {list(image_shape)}, got {got}", seq)
    if not isinstance(instruction, str) or not instruction.strip():
        raise BadRequest("observation lacks an 'instruction' string", seq)
    if len(instruction) > MAX_INSTRUCTION_CHARS:
        raise BadRequest(f"instruction is longer than {MAX_INSTRUCTION_CHARS} characters", seq)
    if not _integer(episode):
        raise BadRequest(f"episode must be an integer in [0, {MAX_SEQ}]", seq)
    return Request(seq=seq, image=image, instruction=instruction, episode=episode)


def decode_request(parts: list[bytes], image_shape: tuple[int, ...]) -> Request:
    """The observation in a received message, or BadRequest saying what is wrong with it."""
    try:
        header, image = wire.decode(parts, max_bytes=MAX_OBS_BYTES)
    except wire.WireError as err:
        raise BadRequest(str(err)) from None
    if not _integer(header["seq"]):
        raise BadRequest(f"seq must be an integer in [0, {MAX_SEQ}]")
    seq = header["seq"]
    if header["kind"] != "obs":
        raise BadRequest(f"expected an 'obs' message, got {header['kind']!r}", seq)
    return check_observation(image, header.get("instruction"), header.get("episode", 0), image_shape, seq)


class PolicyRunner:
    """The observation -> action step both policy servers share: each client's episode state
    (VLA-Pruner's action history, the camera's STC-Cacher), reset when the client's episode number
    changes, and one policy call at a time (the servers may answer clients from several threads)."""

    def __init__(self, policy: VLAPolicy, recipe: PruningRecipe) -> None:
        self.policy, self.recipe = policy, recipe
        self._episodes: dict[Hashable, tuple[int, PruneContext]] = {}
        self._lock = threading.Lock()

    def step(self, client: Hashable, request: Request) -> PolicyStep:
        with self._lock:
            known = self._episodes.get(client)
            if known is None or known[0] != request.episode:
                ctx = PruneContext()
                self.policy.reset(self.recipe, ctx)
                self._episodes[client] = known = (request.episode, ctx)
            return self.policy.act(np.asarray(request.image), request.instruction, self.recipe, known[1])

    def forget(self, client: Hashable) -> None:
        """Drop a client's episode state (it disconnected)."""
        with self._lock:
            self._episodes.pop(client, None)


class PolicyServer:
    """Serve `policy` with `recipe` on `bind` until `stop` is set (poll granularity 50 ms)."""

    def __init__(self, policy: VLAPolicy, recipe: PruningRecipe, bind: str, image_shape: tuple[int, ...],
                 allow_remote: bool = False) -> None:
        if not allow_remote and not is_loopback(bind):
            raise ConfigError(f"refusing to bind {bind}: not a loopback address (pass allow_remote to expose it)")
        self.policy, self.recipe, self.image_shape = policy, recipe, tuple(image_shape)
        self.runner = PolicyRunner(policy, recipe)
        self.stats = ServerStats()
        self.stop = threading.Event()
        self.context = zmq.Context.instance()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        try:
            self.socket.bind(bind)
        except zmq.ZMQError as err:
            self.socket.close()
            raise ConfigError(f"cannot bind {bind!r}: {err}") from None
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

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
        """The reply to one request: an action, or an error for a malformed request or a failed step."""
        try:
            request = decode_request(parts, self.image_shape)
        except BadRequest as err:
            self.stats.malformed += 1
            log.warning("bad request from %s: %s", identity.hex()[:32], err)
            return self._error(err.seq, str(err))
        try:
            step = self.runner.step(identity, request)
        except Exception as err:  # noqa: BLE001 - a failed step is this client's error reply, never the server's end
            log.exception("the policy failed on a request from %s", identity.hex()[:32])
            return self._error(request.seq, f"policy failed: {type(err).__name__}: {err}")
        self.stats.answered += 1
        self.stats.latencies_ms.append(step.latency_ms)
        return wire.encode(step.action[None].astype(np.float32), kind="action", seq=request.seq,
                           latency_ms=step.latency_ms, visual_tokens_kept=step.visual_tokens_kept,
                           visual_tokens_in=step.visual_tokens_in)

    def _error(self, seq: int, message: str) -> list[bytes]:
        self.stats.errors += 1
        return wire.encode(None, kind="error", seq=seq, error=message[:MAX_ERROR_CHARS])
