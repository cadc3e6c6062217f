"""Sources decoded by PyAV: a video file played as if live, a V4L2 camera, an RTSP/HTTP(S) URL.

One reading loop serves all three; they differ in what the end of the input means. A file ends
(or starts over with `loop`); a camera or URL that ends or fails has disconnected, so it is
re-opened with exponential backoff and the stream goes on, its timestamps still rising.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import av

from streamprune.errors import InputError
from streamprune.sources.base import Backoff, FrameSource, Pacer
from streamprune.types import Frame

log = logging.getLogger(__name__)

URL_SCHEMES = ("rtsp", "rtsps", "http", "https")
_FAILURES = (av.FFmpegError, OSError)


class AVSource(FrameSource):
    """Decode the first video stream of `target` (a path, URL or device) to RGB frames.

    live:     the end of the input is a disconnect: re-open after a backoff delay, forever.
    loop:     (files) start over at the end; timestamps and indices keep counting up.
    realtime: release each frame when its timestamp is due on the wall clock.
    timeout:  seconds PyAV waits to open the input or for the next packet before failing.

    Timestamps are the frames' presentation times relative to the first frame. After a reconnect
    the new connection's first frame is stamped with the wall time elapsed since the source
    started, so timestamps never go back even when the server restarts its clock.
    """

    def __init__(
        self,
        target: str,
        *,
        live: bool,
        loop: bool = False,
        realtime: bool = True,
        fmt: str | None = None,
        options: dict[str, str] | None = None,
        timeout: float | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        super().__init__()
        self.target = target
        self.live = live
        self.loop = loop
        self.realtime = realtime
        self.fmt = fmt
        self.options = options or {}
        self.timeout = timeout
        self.backoff = backoff or Backoff()

    def _open(self) -> av.container.InputContainer:
        return av.open(self.target, format=self.fmt, options=self.options, timeout=self.timeout)

    def _frames(self) -> Iterator[Frame]:
        pacer = Pacer(self._stop) if self.realtime else None
        index, offset, last_ts = 0, 0.0, None
        wall0 = 0.0  # wall clock at stream time 0, for re-stamping after a reconnect
        while not self._stop.is_set():
            try:
                container = self._open()
            except _FAILURES as e:
                if not self._retry(f"cannot open {self.target}: {e}"):
                    return
                continue
            failed = False
            with container:
                if not container.streams.video:
                    raise InputError(f"{self.target} has no video stream")
                stream = container.streams.video[0]
                rate = stream.average_rate or stream.guessed_rate
                interval = 1.0 / float(rate) if rate else 0.0
                base = None
                try:
                    for packet in container.demux(stream):
                        try:
                            decoded = packet.decode()
                        except av.InvalidDataError as e:
                            self.stats.malformed += 1
                            log.debug("%s: undecodable packet skipped: %s", self.target, e)
                            continue
                        for frame in decoded:
                            t = frame.time
                            if base is None:
                                base = t if t is not None else 0.0
                                if self.live and last_ts is not None:
                                    offset = max(time.monotonic() - wall0, last_ts + interval)
                            ts = offset + ((t if t is not None else base) - base)
                            if last_ts is not None and ts <= last_ts:  # missing or repeated pts
                                ts = last_ts + (interval or 1e-3)
                            image = frame.to_ndarray(format="rgb24")
                            if pacer is not None and not pacer.wait(ts):
                                return
                            if last_ts is None:
                                wall0 = time.monotonic() - ts
                            last_ts = ts
                            self.backoff.reset()
                            yield Frame(image=image, timestamp=ts, index=index)
                            index += 1
                except _FAILURES as e:
                    failed = True
                    log.warning("%s: read failed: %s", self.target, e)
            if self.live:
                if not self._retry(f"{self.target} {'failed' if failed else 'ended'}"):
                    return
                continue
            if failed:  # a file that breaks off part-way: keep what was read, count it
                self.stats.malformed += 1
            if not self.loop or last_ts is None:
                return
            offset = last_ts + interval

    def _retry(self, why: str) -> bool:
        """Wait the next backoff delay before re-opening; False if stopped (or a file won't open)."""
        if not self.live and not self.loop:
            raise InputError(why)
        delay = self.backoff.next_delay()
        self.stats.reconnects += 1
        log.warning("%s; retrying in %.2f s", why, delay)
        return not self._stop.wait(delay)


def file_source(path: str, *, loop: bool = False, realtime: bool = True) -> AVSource:
    """A video file played as a live stream. Checked now, so a bad path fails at open time."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"no such video file: {path}")
    try:
        with av.open(str(p)) as probe:
            if not probe.streams.video:
                raise InputError(f"{path} has no video stream")
    except _FAILURES as e:
        raise InputError(f"cannot read {path} as a video: {e}") from None
    return AVSource(str(p), live=False, loop=loop, realtime=realtime)


def camera_source(device: str, *, realtime: bool = True) -> AVSource:
    """V4L2 camera `N` (/dev/videoN). The device must exist now; later failures are retried."""
    if not device.isdigit():
        raise InputError(f"camera must be a device number, e.g. camera:0, got camera:{device}")
    path = f"/dev/video{int(device)}"
    if not os.path.exists(path):
        raise InputError(f"no camera at {path}")
    return AVSource(path, live=True, realtime=realtime, fmt="v4l2", timeout=5.0)


def url_source(url: str, *, realtime: bool = True, timeout: float = 5.0, backoff: Backoff | None = None) -> AVSource:
    """An RTSP or HTTP(S) stream. Not contacted now: a server that is down is retried until it is up.

    Every end of the stream counts as a disconnect, so the URL of a finite file plays over and
    over (paced by `realtime`); to play a remote file once, download it and use `file:`.
    """
    options = {"rtsp_transport": "tcp"} if url.startswith("rtsp") else {}
    return AVSource(url, live=True, realtime=realtime, options=options, timeout=timeout, backoff=backoff)
