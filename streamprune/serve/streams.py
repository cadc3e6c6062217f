"""Live stream sessions of `streamprune serve`: each is the streaming runtime (`LiveRunner` over the
live stage graph) on one source, with its own bounded memory, sharing the server's model.

A session also keeps what its page shows: the newest frame that reached the memory with the tokens
kept of it (drawn as `streamprune viz` draws them), and one stats sample a second for the plots."""

from __future__ import annotations

import io
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from streamprune.config import LiveConfig, MemoryConfig
from streamprune.config.fields import positive_float, positive_int, retain_ratio
from streamprune.errors import StreampruneError
from streamprune.runtime.live_runner import LiveRunner
from streamprune.runtime.live_stages import LocalStages
from streamprune.runtime.memory_stage import LiveAnswer
from streamprune.serve.engine import ChatEngine
from streamprune.serve.media import local_path
from streamprune.serve.protocol import ApiError, checked_field, flag, text_field
from streamprune.types import Frame

HISTORY = 3600  # one-second samples kept for the plots (an hour)
SAMPLE_S = 1.0


class ServedStages(LocalStages):
    """The live stages on the server's shared model: encoder and answers hold the engine's lock;
    after each batch the newest unit's kept tokens are noted for the overlay."""

    def __init__(self, config: LiveConfig, engine: ChatEngine) -> None:
        super().__init__(config, adapter=engine.adapter)
        self.lock = engine.lock
        # frames of units not in memory yet: a segment closes within max_segment_units units
        held = config.max_segment_units * self.unit_frames + config.batch_frames
        self.recent: deque[tuple[int, np.ndarray]] = deque(maxlen=held)
        self.overlay: tuple[np.ndarray, np.ndarray, float] | None = None  # image, kept [h, w], stream time

    def encode_add(self, frames: list[Frame], fps: float, flush: bool = False) -> dict[str, Any]:
        self.recent.extend((f.index, f.image) for f in frames)
        with self.lock:
            chunk = self.encoder.process(frames, fps, flush)
        result = self.memory.add(chunk, fps)
        grid = self.memory.grid
        images = dict(self.recent)
        for unit in reversed(chunk.units):
            if grid is not None and unit.frame in images:
                kept = np.zeros(grid, dtype=bool)
                hw = unit.hw.cpu().numpy()
                kept[hw[:, 0], hw[:, 1]] = True
                self.overlay = (images[unit.frame], kept, unit.timestamp)
                break
        return result

    def ask(self, question: str, retain: float | None = None) -> LiveAnswer:
        with self.lock:
            return super().ask(question, retain)


class StreamSession:
    """One source through the streaming runtime; `ask` answers from its memory as it is now."""

    def __init__(self, stream_id: str, spec: dict[str, Any], config: LiveConfig, engine: ChatEngine) -> None:
        from streamprune.sources import open_source

        self.id, self.spec, self.created = stream_id, spec, int(time.time())
        source = open_source(config.source, loop=config.loop, realtime=True)
        self.stages = ServedStages(config, engine)
        self.runner = LiveRunner(source, self.stages, config).start()
        self.history: deque[dict[str, float]] = deque(maxlen=HISTORY)
        self._closed = threading.Event()
        self._started = time.monotonic()
        self._sampler = threading.Thread(target=self._sample, name=f"stream-{stream_id}-stats", daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._closed.wait(SAMPLE_S):
            s = self.runner.stats
            self.history.append({"t": round(time.monotonic() - self._started, 2), "stream_time": s.stream_time,
                                 "tokens": s.tokens, "cacher_hit_rate": s.cacher_hit_rate,
                                 "latency_ms": s.latency_ms_mean, "answer_ms": s.answer_ms_p50,
                                 "fps": s.fps_processed})

    @property
    def status(self) -> str:
        if self.runner.error is not None:
            return "failed"
        return "ended" if self.runner.worker_done.is_set() else "running"

    def describe(self, history: bool = False, since: float | None = None) -> dict[str, Any]:
        """The stream object; with `history`, the one-second samples (after `since` s, if given:
        a page polling every second fetches only what is new)."""
        error, overlay = self.runner.error, self.stages.overlay
        out = {"id": self.id, "object": "stream", "created": self.created, **self.spec, "status": self.status,
               "error": None if error is None else str(error), "stats": asdict(self.runner.stats),
               "overlay_time": None if overlay is None else overlay[2]}
        if history:
            out["history"] = [h for h in list(self.history) if since is None or h["t"] > since]
        return out

    def ask(self, question: str, timeout: float) -> LiveAnswer:
        try:
            return self.runner.ask(question, None, timeout)
        except StreampruneError as err:
            raise ApiError(400, f"stream {self.id}: {err}") from None

    def overlay_png(self) -> tuple[bytes, float] | None:
        """The newest frame in memory with its kept tokens outlined (PNG), and its stream time."""
        from PIL import Image

        from streamprune.viz import annotate, upscale_factor

        overlay = self.stages.overlay
        if overlay is None:
            return None
        image, kept, stream_time = overlay
        drawn = annotate(image, kept, np.zeros_like(kept), upscale_factor(*image.shape[:2]))
        buffer = io.BytesIO()
        Image.fromarray(drawn).save(buffer, format="PNG")
        return buffer.getvalue(), stream_time

    def close(self) -> None:
        self._closed.set()
        self.runner.stop()
        self._sampler.join(timeout=5)
        self.stages.close()


class StreamSessions:
    """The open sessions, at most `max_streams`; each its own memory, all on the engine's model."""

    def __init__(self, engine: ChatEngine, base: LiveConfig, max_streams: int, allowed: Path | None) -> None:
        self.engine, self.base, self.max_streams, self.allowed = engine, base, max_streams, allowed
        self._sessions: dict[str, StreamSession] = {}
        self._opening = 0
        self._lock = threading.Lock()

    def _source(self, body: dict[str, Any]) -> str:
        source = text_field(body, "source")
        if not source:
            raise ApiError(400, "'source' is required: file:PATH, camera:N, rtsp://..., http(s)://..., "
                                "zmq://HOST:PORT, synthetic:[k=v,...] or gym:ENV_ID", "source")
        scheme, sep, rest = source.partition(":")
        if not sep or len(scheme) == 1 or scheme.lower() == "file":  # a local file: only under the allowed dir
            local_path(rest if sep and len(scheme) > 1 else source, self.allowed, "source")
        return source

    def start(self, body: Any) -> StreamSession:
        """A session for a POST /v1/streams body (source, method, retain, max_visual_tokens,
        kv_budget, fps, loop)."""
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        source = self._source(body)
        method = text_field(body, "method") or self.base.method
        kv_budget = checked_field(body, "kv_budget", positive_int)
        spec = {"source": source, "method": method,
                "retain": checked_field(body, "retain", retain_ratio),
                "max_visual_tokens": checked_field(body, "max_visual_tokens", positive_int),
                "kv_budget": kv_budget or self.base.memory.kv_budget,
                "fps": checked_field(body, "fps", positive_float) or self.base.fps,
                "loop": checked_field(body, "loop", flag) or False}
        if "method" not in body:
            spec["retain"] = self.base.retain if spec["retain"] is None else spec["retain"]
        config = LiveConfig(source=source, model=self.base.model, method=method, retain=spec["retain"],
                            max_tokens=spec["max_visual_tokens"], fps=spec["fps"], loop=spec["loop"],
                            memory=MemoryConfig(kv_budget=spec["kv_budget"]), placement=self.base.placement,
                            no_ray=True, max_new_tokens=self.base.max_new_tokens, seed=self.base.seed)
        stream_id = f"stream-{uuid.uuid4().hex[:12]}"
        with self._lock:  # the slot is taken here; the source opens outside the lock (an RTSP open is slow)
            if len(self._sessions) + self._opening >= self.max_streams:
                raise ApiError(429, f"{self.max_streams} streams are open (--max-streams); delete one first",
                               code="too_many_streams")
            self._opening += 1
        try:
            session = StreamSession(stream_id, spec, config, self.engine)
        except StreampruneError as err:
            raise ApiError(400, str(err), "source") from None
        finally:
            with self._lock:
                self._opening -= 1
        with self._lock:
            self._sessions[stream_id] = session
        return session

    def get(self, stream_id: str) -> StreamSession:
        session = self._sessions.get(stream_id)
        if session is None:
            raise ApiError(404, f"no stream {stream_id!r}", "stream_id", code="stream_not_found")
        return session

    def list(self) -> list[StreamSession]:
        return list(self._sessions.values())

    def delete(self, stream_id: str) -> None:
        with self._lock:
            session = self.get(stream_id)
            del self._sessions[stream_id]
        session.close()

    def close_all(self) -> None:
        for stream_id in list(self._sessions):
            self.delete(stream_id)
