"""The policy server in openpi's websocket protocol, so robot code written against `openpi-client`
(Physical-Intelligence/openpi) talks to a streamprune VLA unchanged.

The protocol follows openpi's `src/openpi/serving/websocket_policy_server.py` (server side) and
`packages/openpi-client/src/openpi_client/websocket_client_policy.py` (what its client expects):

- one websocket per client, permessage-deflate off (`compression=None`: images barely compress and
  deflate costs latency on every step);
- right after the handshake the server sends one binary message: the metadata map;
- then each binary message from the client is one observation map (msgpack-numpy, see
  msgpack_numpy.py) and gets exactly one binary reply: `{"actions": [H, A] float32,
  "server_timing": {"infer_ms", "prev_total_ms" (from the second request on)}, "policy_timing":
  {"infer_ms", "encode_ms"}, "visual_tokens_kept", "visual_tokens_in"}`; H is 1 here (our VLA
  decodes one action per observation; the metadata says so as `chunk_size`);
- an error is a *text* message (openpi's client raises on any str reply); when the policy itself
  fails the text is the traceback and the server closes with 1011, as openpi does;
- `GET /healthz` answers 200 "OK" without a websocket, as openpi's `_health_check` does.

Observation keys (openpi's LIBERO example names first, ours second; others, such as a wrist camera,
are ignored): the camera `observation/image` | `image`, `[S, S, 3]` uint8 (`[3, S, S]` is
transposed, as openpi's LIBERO input transform does); the instruction `prompt` | `instruction`;
`episode`, an optional integer of ours: a new value restarts the per-episode pruning state (openpi
has no episodes on the wire, so without it the state lasts as long as the connection).
`observation/state` / `state` may be sent and is unused: the policy reads the camera and the words.

Deviations from openpi, on purpose: a malformed request (not msgpack-numpy, no image, wrong shape)
gets a one-line text error and the connection stays usable (openpi closes on any exception);
messages are capped at MAX_MESSAGE_BYTES (openpi: no cap), a larger one closes with 1009; the
bind is loopback unless `allow_remote`; `prev_total_ms` counts from the request's arrival, not
from when the server began waiting for it.
"""

from __future__ import annotations

import http
import ipaddress
import logging
import threading
import time
import traceback
from typing import Any

import numpy as np
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.sync.server import ServerConnection, serve

from streamprune.errors import ConfigError
from streamprune.models.vla import VLAPolicy
from streamprune.pruning.recipe import PruningRecipe
from streamprune.transport import msgpack_numpy
from streamprune.transport.policy_server import (MAX_ERROR_CHARS, MAX_OBS_BYTES, BadRequest, PolicyRunner, Request,
                                                 ServerStats, check_observation)

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = MAX_OBS_BYTES
IMAGE_KEYS = ("observation/image", "image")
PROMPT_KEYS = ("prompt", "instruction")
HEALTH_PATH = "/healthz"


def parse_bind(text: str) -> tuple[str, int]:
    """'ws://HOST:PORT' -> (host, port); port 0 picks a free one. One-line ConfigError otherwise."""
    scheme, sep, rest = str(text).partition("://")
    if not sep or scheme != "ws":
        raise ConfigError(f"openpi bind must be ws://HOST:PORT (e.g. ws://127.0.0.1:8000), got {text!r}")
    host, colon, port = rest.rpartition(":")
    host = host.strip("[]")
    if not colon or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"openpi bind must be ws://HOST:PORT with a port in [0, 65535], got {text!r}")
    return host, int(port)


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a hostname or an interface name: may face the network
        return False


def check_bind(bind: str, allow_remote: bool = False) -> tuple[str, int]:
    """(host, port) of `bind`, refused unless loopback or `allow_remote` (checked before a model loads)."""
    host, port = parse_bind(bind)
    if not allow_remote and not is_loopback_host(host):
        raise ConfigError(f"refusing to bind {bind}: not a loopback address (pass --allow-remote to expose it)")
    return host, port


def policy_metadata(policy: VLAPolicy, recipe: PruningRecipe, image_shape: tuple[int, ...],
                    name: str = "") -> dict[str, Any]:
    """What the server sends on connect: enough for a client to build observations and size its
    action queue (openpi sends its train config's metadata; any map is valid there)."""
    return {"policy": name, "action_dim": int(policy.actions.dims), "chunk_size": 1,
            "image_shape": [int(d) for d in image_shape], "image_key": IMAGE_KEYS[0], "prompt_key": PROMPT_KEYS[0],
            "method": recipe.name, "retain": recipe.budget.retain, "max_tokens": recipe.budget.max_tokens}


def _first(obs: dict, keys: tuple[str, ...]) -> Any:
    return next((obs[k] for k in keys if k in obs), None)


def observation_request(obs: Any, image_shape: tuple[int, ...]) -> Request:
    """An openpi-style observation map -> the checked Request (BadRequest saying what is wrong)."""
    if not isinstance(obs, dict):
        raise BadRequest(f"an observation must be a map of named fields, got {type(obs).__name__}")
    image = _first(obs, IMAGE_KEYS)
    if image is None:
        raise BadRequest(f"observation has no image: send one of {', '.join(map(repr, IMAGE_KEYS))}")
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
        image = np.ascontiguousarray(image.transpose(1, 2, 0))
    prompt = _first(obs, PROMPT_KEYS)
    if prompt is None:
        raise BadRequest(f"observation has no instruction: send one of {', '.join(map(repr, PROMPT_KEYS))}")
    return check_observation(image, prompt, obs.get("episode", 0), image_shape)


class OpenPIServer:
    """Serve `policy` with `recipe` on `bind` (ws://HOST:PORT) in openpi's protocol; one thread per
    connection, policy calls one at a time. Binds on construction; `serve_forever` until `shutdown`."""

    def __init__(self, policy: VLAPolicy, recipe: PruningRecipe, bind: str, image_shape: tuple[int, ...],
                 allow_remote: bool = False, metadata: dict[str, Any] | None = None) -> None:
        host, port = check_bind(bind, allow_remote)
        self.image_shape = tuple(image_shape)
        self.runner = PolicyRunner(policy, recipe)
        self.metadata = metadata if metadata is not None else policy_metadata(policy, recipe, self.image_shape)
        self.stats = ServerStats()
        self._stats_lock = threading.Lock()
        self._serving = threading.Event()
        try:
            self._server = serve(self._handle, host, port, compression=None, max_size=MAX_MESSAGE_BYTES,
                                 process_request=self._health_check)
        except OSError as err:
            raise ConfigError(f"cannot bind {bind!r}: {err.strerror or err}") from None
        bound = self._server.socket.getsockname()
        self.endpoint = f"ws://{'[' + host + ']' if ':' in host else host}:{bound[1]}"

    def serve_forever(self) -> None:
        self._serving.set()
        self._server.serve_forever()

    def shutdown(self) -> None:
        """Stop accepting connections, close the open ones (1001) and wait for their handlers; from
        any thread. (websockets' own shutdown waits for serve_forever to exit, so a server that
        never served only closes its socket.)"""
        if self._serving.is_set():
            self._server.shutdown()
        else:
            self._server.socket.close()

    @staticmethod
    def _health_check(connection: ServerConnection, request: Any) -> Any:
        if request.path == HEALTH_PATH:
            return connection.protocol.reject(http.HTTPStatus.OK, "OK\n")
        return None  # go on with the websocket handshake

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for name, delta in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + delta)

    def _handle(self, ws: ServerConnection) -> None:
        """One client's connection: metadata, then request -> reply until it closes."""
        peer = ws.remote_address  # read now: the socket may be gone by the end
        log.info("openpi client %s connected", peer)
        prev_total_ms: float | None = None
        try:
            ws.send(msgpack_numpy.packb(self.metadata))
            while True:
                message = ws.recv()
                start = time.perf_counter()
                reply, failed = self.answer(ws.id, message, prev_total_ms)
                ws.send(reply)
                if failed:
                    ws.close(CloseCode.INTERNAL_ERROR, "internal server error; traceback in the previous message")
                    return
                prev_total_ms = (time.perf_counter() - start) * 1000
        except ConnectionClosed:
            pass
        finally:
            self.runner.forget(ws.id)
            log.info("openpi client %s disconnected", peer)

    def answer(self, client: Any, message: bytes | str,
               prev_total_ms: float | None = None) -> tuple[bytes | str, bool]:
        """(reply, the policy failed) for one received message: packed actions, or a text error."""
        self._count(requests=1)
        try:
            if isinstance(message, str):
                raise BadRequest("expected a binary msgpack-numpy message, got text")
            obs = msgpack_numpy.unpackb(message)
            start = time.perf_counter()  # openpi's infer_ms: input parsing + the policy, not the unpacking
            request = observation_request(obs, self.image_shape)
        except (BadRequest, msgpack_numpy.MsgpackNumpyError) as err:
            self._count(malformed=1, errors=1)
            log.warning("bad openpi request from %s: %s", client, err)
            return f"bad request: {err}"[:MAX_ERROR_CHARS], False
        try:
            step = self.runner.step(client, request)
        except Exception:  # noqa: BLE001 - openpi's way: the traceback goes to this client, the server goes on
            log.exception("the policy failed on a request from %s", client)
            self._count(errors=1)
            return traceback.format_exc(), True
        infer_ms = (time.perf_counter() - start) * 1000
        timing = {"infer_ms": infer_ms}
        if prev_total_ms is not None:  # like openpi: the previous round's total, which includes its send
            timing["prev_total_ms"] = prev_total_ms
        with self._stats_lock:
            self.stats.answered += 1
            self.stats.latencies_ms.append(step.latency_ms)
        return msgpack_numpy.packb({
            "actions": np.asarray(step.action, np.float32).reshape(1, -1),
            "server_timing": timing,
            "policy_timing": {"infer_ms": float(step.latency_ms), "encode_ms": float(getattr(step, "encode_ms", 0.0))},
            "visual_tokens_kept": int(step.visual_tokens_kept), "visual_tokens_in": int(step.visual_tokens_in),
        }), False
