"""Frames from a zmq publisher (`zmq://HOST:PORT`), e.g. one started by `run_publisher`.

Every message goes through `decode_frame` (`wire.decode` with a uint8-only allow list, then an RGB
frame `[H, W, 3]` of at least one pixel, a sane `seq` and `ts`); anything else is dropped and
counted as malformed (`ZmqSource.accept`), and the stream goes on. Fuzzed by tests/test_wire_fuzz.py.

When the connection drops (the publisher stopped, or sent a part beyond the MAXMSGSIZE guard,
after which zmq would never reconnect on its own) the socket is replaced after an exponential
backoff delay. A socket monitor sees each connection; every one after the first is a reconnect.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from streamprune.sources.base import Backoff, FrameSource
from streamprune.transport.wire import DEFAULT_MAX_BYTES, WireError, decode
from streamprune.transport.zmq_frames import subscriber_socket
from streamprune.types import Frame

log = logging.getLogger(__name__)

_FRAME_DTYPES = frozenset({"uint8"})
MAX_SEQ = 2**63 - 1
MAX_TS = 1e12  # seconds; beyond it the re-stamping arithmetic would lose the frame interval


def decode_frame(parts: list[zmq.Frame] | list[bytes], max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[dict, np.ndarray]:
    """(header, image `[H, W, 3]` uint8, read-only) of a frame message, or WireError."""
    header, image = decode(parts, max_bytes=max_bytes, allowed_dtypes=_FRAME_DTYPES)
    if header["kind"] != "frame" or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise WireError(f"expected an RGB frame [H, W, 3], got kind {header['kind']!r} shape {list(image.shape)[:8]}")
    if not 0 <= header["seq"] <= MAX_SEQ or abs(header["ts"]) > MAX_TS:
        raise WireError("seq or ts out of range")
    return header, image


class ZmqSource(FrameSource):
    """Subscribe to frames published at `endpoint` (a zmq endpoint such as tcp://127.0.0.1:5555).

    latest_only: when several frames are queued, deliver only the newest (a live consumer wants
                 the present, not a backlog); skipped frames count as dropped.

    Dropped frames are counted from gaps in the publisher's `seq`, so frames lost at the
    publisher's HWM and frames skipped here are both seen; frames missed while disconnected are
    not (a new connection may be a new publisher, whose seq starts over). Timestamps are the
    publisher's, except that after a reconnect or a publisher restart the new stream is re-stamped
    from the wall time elapsed here, so timestamps keep rising. Images are writable copies.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        latest_only: bool = True,
        poll_interval: float = 0.1,
        backoff: Backoff | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        super().__init__()
        self.endpoint = endpoint
        self.max_bytes = max_bytes
        self.latest_only = latest_only
        self.poll_interval = poll_interval
        self.backoff = backoff or Backoff()
        self._ctx = context

    def _connect(self) -> tuple[zmq.Socket, zmq.Socket, zmq.Poller]:
        sock = subscriber_socket(max_bytes=self.max_bytes, context=self._ctx)
        monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        sock.connect(self.endpoint)  # after the monitor is attached, so it sees this connection
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        return sock, monitor, poller

    @staticmethod
    def _close(sock: zmq.Socket, monitor: zmq.Socket) -> None:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)

    def accept(self, parts: list[zmq.Frame] | list[bytes]) -> tuple[dict, np.ndarray] | None:
        """A received message as (header, frame), or None once it is counted as malformed."""
        try:
            return decode_frame(parts, self.max_bytes)
        except WireError as e:
            self.stats.malformed += 1
            log.debug("dropped a malformed message from %s: %s", self.endpoint, e)
            return None

    def _receive(self, sock: zmq.Socket) -> tuple[dict, np.ndarray] | None:
        """Read what is queued: the first valid frame, or the newest one if `latest_only`."""
        newest = None
        while True:
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return newest
            frame = self.accept(parts)
            if frame is None:
                continue
            newest = frame
            if not self.latest_only:
                return newest

    def _frames(self) -> Iterator[Frame]:
        sock, monitor, poller = self._connect()
        connections = 0
        index, last_seq, last_ts = 0, None, None
        offset, base = 0.0, 0.0  # output ts = offset + (publisher ts - base)
        wall0 = 0.0
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(int(self.poll_interval * 1000)))
                disconnected = False
                while monitor.poll(0):
                    event = recv_monitor_message(monitor)["event"]
                    if event == zmq.EVENT_CONNECTED:
                        connections += 1
                        if connections > 1:
                            self.stats.reconnects += 1
                            log.info("reconnected to %s", self.endpoint)
                    else:
                        disconnected = True
                if disconnected:
                    self._close(sock, monitor)
                    sock = None
                    # whoever answers next may be a new publisher: its seq starts afresh
                    last_seq = None
                    delay = self.backoff.next_delay()
                    log.warning("lost the connection to %s; reconnecting in %.2f s", self.endpoint, delay)
                    if self._stop.wait(delay):
                        return
                    sock, monitor, poller = self._connect()
                    continue
                if sock not in ready:
                    continue
                got = self._receive(sock)
                if got is None:
                    continue
                self.backoff.reset()
                header, image = got
                seq, ts = header["seq"], float(header["ts"])
                if last_seq is None or seq <= last_seq:  # a new connection, or the publisher restarted
                    if last_ts is not None:
                        offset = max(time.monotonic() - wall0, last_ts + 1e-3)
                    base = ts
                else:
                    self.stats.dropped += seq - last_seq - 1
                last_seq = seq
                ts = offset + ts - base
                if last_ts is None:
                    wall0 = time.monotonic() - ts
                last_ts = ts
                yield Frame(image=image.copy(), timestamp=ts, index=index)
                index += 1
        finally:
            if sock is not None:
                self._close(sock, monitor)
