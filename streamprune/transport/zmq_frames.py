"""Frames over zmq: a publisher that turns any FrameSource into a PUB socket, and the matching
subscriber socket settings (the subscriber itself is `streamprune.sources.zmq_source`).

Why PUB/SUB with HWM 2 and CONFLATE off:
- A live stream must never wait for its viewers. PUB never blocks: when a subscriber's queue is
  full, PUB drops that subscriber's new messages, so the camera loop keeps its pace. PUSH blocks
  the sender once its HWM is reached (the camera would stall behind the slowest consumer) and
  round-robins messages between pullers (each viewer would see a fraction of the frames).
- PUB/SUB fans out: the pipeline, a recorder and a monitor can all subscribe to one camera.
- HWM 2 on both ends and small kernel socket buffers (256 KB) keep at most a few frames queued
  per subscriber, so a slow consumer sees frames a few intervals old instead of a backlog; the
  subscriber also skips to the newest queued frame (`latest_only`), counting the skips. Measured
  here (640x480 at 30 fps, a consumer needing 150 ms per frame), median age of the frames it
  got: 0.28 s with all three; without `latest_only` 0.73 s, and with the default kernel buffers
  as well 1.5 s (2.0 s with HWM 4).
- CONFLATE (keep only the last message) would be the textbook "latest frame" option, but zmq's
  conflate does not support multipart messages, and every message here is [header, buffer].
Frames dropped anywhere on the way show up as gaps in the header's `seq`, which the subscriber counts.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import zmq

from streamprune.errors import ConfigError
from streamprune.transport.wire import DEFAULT_MAX_BYTES, MAX_HEADER_BYTES, encode

if TYPE_CHECKING:
    from streamprune.sources.base import FrameSource
    from streamprune.types import Frame

log = logging.getLogger(__name__)

HWM = 2
SOCKET_BUFFER = 256 * 1024  # kernel buffers in bytes; the default (MBs) queues seconds of frames
DEFAULT_BIND = "tcp://127.0.0.1:5555"


def is_loopback(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// endpoints on 127.0.0.0/8, ::1 or localhost."""
    transport, sep, rest = endpoint.partition("://")
    if not sep:
        raise ConfigError(f"zmq endpoint {endpoint!r} needs a transport, e.g. tcp://127.0.0.1:5555")
    if transport in ("ipc", "inproc"):
        return True
    if transport != "tcp":
        return False
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # an interface name, a hostname or "*": may face the network
        return False


@dataclass
class PublisherStats:
    """What `run_publisher` did: frames handed to zmq (PUB may still drop them per subscriber)."""

    frames_sent: int = 0
    started: float = 0.0

    @property
    def fps(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.frames_sent / elapsed if elapsed > 0 else 0.0


class Publisher:
    """A bound PUB socket that sends frames as [header, rgb buffer] with a running `seq`.

    `bind` is a zmq endpoint; a tcp port of "*" binds a random free port (see `endpoint`).
    Binding to anything but loopback needs `allow_remote=True`: the wire has no authentication,
    so by default only processes on this machine may watch the stream.
    """

    def __init__(
        self,
        bind: str = DEFAULT_BIND,
        *,
        allow_remote: bool = False,
        hwm: int = HWM,
        context: zmq.Context | None = None,
    ) -> None:
        if not allow_remote and not is_loopback(bind):
            raise ConfigError(f"refusing to publish on non-loopback address {bind!r} (pass allow_remote=True to expose it)")
        self._ctx = context or zmq.Context.instance()
        self.socket = self._ctx.socket(zmq.PUB)
        self.socket.setsockopt(zmq.SNDHWM, hwm)
        self.socket.setsockopt(zmq.SNDBUF, SOCKET_BUFFER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.endpoint = self._bind(bind)
        self.seq = 0
        log.info("publishing frames on %s", self.endpoint)

    def _bind(self, bind: str, retry_for: float = 2.0) -> str:
        """Bind, retrying briefly on "address in use": a publisher restarted in the same process
        finds its port still held until zmq's I/O thread has closed the old socket."""
        deadline = time.monotonic() + retry_for
        while True:
            try:
                if bind.startswith("tcp://") and bind.endswith(":*"):
                    return f"{bind[:-2]}:{self.socket.bind_to_random_port(bind[:-2])}"
                self.socket.bind(bind)
                return self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
            except zmq.ZMQError as e:
                if e.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                    self.socket.close()
                    raise ConfigError(f"cannot bind {bind!r}: {e}") from None
                time.sleep(0.05)

    def send(self, frame: Frame, **fields: object) -> None:
        """Queue one frame; never blocks (PUB drops it for subscribers whose queue is full)."""
        parts = encode(frame.image, kind="frame", ts=frame.timestamp, seq=self.seq, index=frame.index, **fields)
        # zmq processes the subscribers' flow-control credits lazily; with HWM 2 a stale credit
        # count drops every third frame even for a consumer that keeps up. Reading EVENTS makes
        # the socket process its pending commands first (measured: 6 of 19 lockstep frames lost
        # without it, none with it).
        self.socket.getsockopt(zmq.EVENTS)
        self.socket.send_multipart(parts, copy=False)
        self.seq += 1

    def close(self) -> None:
        self.socket.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_publisher(
    source: FrameSource,
    bind: str = DEFAULT_BIND,
    stop_event: threading.Event | None = None,
    *,
    allow_remote: bool = False,
    hwm: int = HWM,
    on_ready: Callable[[str], None] | None = None,
) -> PublisherStats:
    """Publish every frame of `source` until it ends or `stop_event` is set; returns the stats.

    The source is made to share `stop_event`, so setting it also wakes a source that is waiting
    (pacing, reconnect backoff, an idle subscriber). `on_ready(endpoint)` is called once bound,
    which tells a caller that bound port "*" where to connect.
    """
    stop = stop_event or threading.Event()
    source.use_stop_event(stop)
    stats = PublisherStats(started=time.monotonic())
    with Publisher(bind, allow_remote=allow_remote, hwm=hwm) as pub:
        if on_ready is not None:
            on_ready(pub.endpoint)
        for frame in source:
            if stop.is_set():
                break
            pub.send(frame)
            stats.frames_sent += 1
    log.info("publisher on %s stopped after %d frames (%.1f fps); source %s", pub.endpoint, stats.frames_sent, stats.fps, source.stats)
    return stats


def subscriber_socket(
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    hwm: int = HWM,
    context: zmq.Context | None = None,
) -> zmq.Socket:
    """A SUB socket subscribed to everything, not yet connected (attach a monitor first if wanted).

    Until the first connection succeeds, zmq retries on its own (100 ms doubling to 5 s).
    MAXMSGSIZE is a memory guard at twice the message limit: parts between the limit
    and the guard still arrive and are rejected (and counted) by `decode`; anything larger makes
    zmq drop that connection before reading it, for good: the caller must reconnect.
    """
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.RCVBUF, SOCKET_BUFFER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, 2 * max_bytes + MAX_HEADER_BYTES)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    return sock
