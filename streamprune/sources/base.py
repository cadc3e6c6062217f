"""What every frame source shares: the iterator interface, stats, reconnect backoff, pacing."""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

from streamprune.types import Frame

log = logging.getLogger(__name__)


@dataclass
class SourceStats:
    """Counters a source keeps while it runs.

    frames_read: frames yielded.  dropped: frames lost before reaching us (sequence gaps, stale
    frames skipped).  malformed: messages or packets rejected as invalid.  reconnects: times the
    source was re-opened (or, for zmq, re-connected) after a failure or disconnect.
    """

    frames_read: int = 0
    dropped: int = 0
    malformed: int = 0
    reconnects: int = 0


@dataclass
class Backoff:
    """Exponential reconnect delays: initial, initial*factor, ... capped at `cap` seconds.

    `reset()` after a success, so a source that recovers reconnects fast the next time.
    """

    initial: float = 0.1
    factor: float = 2.0
    cap: float = 5.0
    attempt: int = 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.initial * self.factor**self.attempt)
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


class FrameSource(ABC):
    """An iterator of `Frame`s (RGB uint8 `[H, W, 3]`, stream timestamp, running index).

    Iterate it once (`for frame in source`); it ends when the input ends, or when `close()` is
    called or the stop event is set from another thread. Every wait inside a source (pacing,
    backoff, polling) waits on the stop event, so stopping is prompt.
    """

    def __init__(self) -> None:
        self.stats = SourceStats()
        self._stop = threading.Event()

    @abstractmethod
    def _frames(self) -> Iterator[Frame]:
        """Yield frames until the input ends or `self._stop` is set."""

    def __iter__(self) -> Iterator[Frame]:
        for frame in self._frames():
            if self._stop.is_set():
                return
            self.stats.frames_read += 1
            yield frame

    def use_stop_event(self, event: threading.Event) -> None:
        """Stop when `event` is set (call before iterating); `close()` then sets it too."""
        self._stop = event

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def close(self) -> None:
        """End the stream; safe from any thread."""
        self._stop.set()

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Pacer:
    """Releases stream timestamps on the wall clock: timestamp t is due at start + t.

    A late consumer is not made to catch up by skipping; the next frame is due at once, so a slow
    reader simply sees the stream slower than real time (the publisher's HWM is where a live
    consumer drops frames).
    """

    def __init__(self, stop: threading.Event) -> None:
        self._stop = stop
        self._start: float | None = None

    def wait(self, timestamp: float) -> bool:
        """Block until `timestamp` is due; False if the stop event was set meanwhile."""
        now = time.monotonic()
        if self._start is None:
            self._start = now - timestamp
        delay = self._start + timestamp - now
        return not self._stop.wait(delay) if delay > 0 else not self._stop.is_set()
