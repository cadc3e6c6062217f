"""Runs a stream through the live stages: a source thread samples frames into a drop-oldest
queue, a worker thread encodes batches and adds them to the memory, questions are answered at any
moment from the memory as it is (stats lines go to a JSON file as it runs)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from streamprune.config import LiveConfig
from streamprune.errors import InputError
from streamprune.outputs import append_line, open_append
from streamprune.runtime.live_stages import StageFailed, Stages
from streamprune.runtime.memory_stage import LiveAnswer, process_rss
from streamprune.runtime.queues import DropOldestQueue
from streamprune.sources.base import FrameSource
from streamprune.types import Frame

log = logging.getLogger(__name__)
ANSWER_WINDOW = 1000  # answers the latency percentiles are taken over


@dataclass
class LiveStats:
    """Counters of one run (the JSON stats lines are snapshots of these)."""

    frames_in: int = 0  # frames read from the source
    frames_sampled: int = 0  # kept by fps sampling, queued for the encoder
    frames_processed: int = 0  # in the memory
    frames_dropped: int = 0  # dropped oldest-first when the model fell behind, or lost with a failed batch
    stage_failures: int = 0
    tokens: int = 0
    tokens_max: int = 0  # highest token count after any unit since the run started
    kv_cache_bytes: int = 0
    rss_bytes: int = 0  # process holding the memory
    driver_rss_bytes: int = 0
    stream_time: float = 0.0
    latency_ms_mean: float = 0.0  # frame queued -> in memory, over the last interval
    latency_ms_max: float = 0.0
    fps_processed: float = 0.0
    merged: int = 0
    evicted: int = 0
    source_dropped: int = 0
    source_malformed: int = 0
    segments_closed: int = 0  # temporal segments the encoder closed and pruned
    open_units: int = 0  # units waiting in the open segment
    cacher_frames: int = 0  # frames through the STC-Cacher (0 without one)
    cacher_hits: int = 0  # of which served by its selective path
    cacher_hit_rate: float = 0.0
    cacher_scene_cuts: int = 0  # full refreshes forced by a scene cut
    vision_flops_saved_share: float = 0.0
    encode_ms_p50: float = 0.0  # vision tower per encoder call, over the last interval
    encode_ms_p99: float = 0.0
    select_ms_p50: float = 0.0  # segmenting + pre-LLM selection per call
    select_ms_p99: float = 0.0
    answers: int = 0
    answer_ms_p50: float = 0.0  # over the last ANSWER_WINDOW answers
    answer_ms_p99: float = 0.0
    answer_retain: float = 1.0  # share of memory tokens the last answer used (--target-latency-ms)


class LiveRunner:
    """Runs a stream through `stages` in background threads; `ask` answers at any time.

    The source thread samples frames to `config.fps` and queues them; the worker encodes batches
    and adds them to the memory; a JSON stats line goes to `stats_path` every `stats_interval` s.
    """

    def __init__(self, source: FrameSource, stages: Stages, config: LiveConfig,
                 stats_path: str | Path | None = None) -> None:
        self.source, self.stages, self.config = source, stages, config
        self.queue = DropOldestQueue(config.queue_frames, drop=config.drop_oldest)
        self.stats = LiveStats()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._progress = threading.Condition()
        self._stats_path = stats_path
        self._stats_fd = open_append(stats_path, "--stats-json") if stats_path else None
        self._lat: list[float] = []
        self._stage_ms: dict[str, list[float]] = {"encode": [], "select": []}
        self._answer_ms: deque[float] = deque(maxlen=ANSWER_WINDOW)  # bounded: a stream may run for hours
        self._flops = [0.0, 0.0]  # full, spent
        self._ask_lock = threading.Lock()
        self.controller = None
        if config.target_latency_ms is not None:
            from streamprune.runtime.latency import RetainController

            self.controller = RetainController(config.target_latency_ms)
        self._last_sample = (time.monotonic(), 0)
        self._fps = config.fps or 30.0
        self._threads = [threading.Thread(target=self._guard(self._read), name="live-source", daemon=True),
                         threading.Thread(target=self._guard(self._work), name="live-encode", daemon=True)]
        self.source_done = threading.Event()
        self.worker_done = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> LiveRunner:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        """Stop reading, drop what is queued, end the threads."""
        self._stop.set()
        self.source.close()
        self.queue.close()
        with self._progress:
            self._progress.notify_all()
        for t in self._threads:
            t.join(timeout=30)
        self._write_stats()
        if self._stats_fd is not None:
            os.close(self._stats_fd)
            self._stats_fd = None

    def wait_stream_end(self, timeout: float | None = None) -> bool:
        """Block until the source ended and every queued frame is in memory (or failed)."""
        return self.worker_done.wait(timeout)

    def wait_for(self, predicate: Callable[[LiveStats], bool], timeout: float) -> bool:
        """Wait until `predicate(stats)` holds, the run failed or `timeout` passed."""
        deadline = time.monotonic() + timeout
        with self._progress:
            while not predicate(self.stats):
                left = deadline - time.monotonic()
                if left <= 0 or self.error is not None or self.worker_done.is_set() or self._stop.is_set():
                    return predicate(self.stats)
                self._progress.wait(min(left, 0.5))
        return True

    def _guard(self, target):
        def run() -> None:
            try:
                target()
            except BaseException as e:  # surfaced to the caller through self.error / ask
                log.error("%s failed: %s", threading.current_thread().name, e)
                self.error = e
                self._stop.set()
                self.queue.close()
                self.source.close()
            finally:
                with self._progress:
                    self._progress.notify_all()
        return run

    # -- stages ----------------------------------------------------------------------------------
    def _read(self) -> None:
        fps, due = self.config.fps, None
        limit = self.config.max_frames
        try:
            for frame in self.source:
                if limit is not None and self.stats.frames_in >= limit:
                    break
                self.stats.frames_in += 1
                if fps is not None:  # keep a frame per 1/fps of stream time; after a gap restart the grid
                    if due is not None and frame.timestamp + 1e-6 < due:
                        continue
                    due = (frame.timestamp if due is None else due) + 1.0 / fps
                    if due <= frame.timestamp:
                        due = frame.timestamp + 1.0 / fps
                self.stats.frames_sampled += 1
                if not self.queue.put((frame, time.monotonic())):
                    break
        finally:
            self.source_done.set()
            self.queue.close()

    def _work(self) -> None:
        carry: list[tuple[Frame, float]] = []
        unit = self.stages.unit_frames
        try:
            while not self._stop.is_set():
                batch = self.queue.get_batch(self.config.batch_frames, timeout=0.1)
                if not batch:
                    if self.queue.closed and not len(self.queue):
                        if self.source_done.is_set() and not self._stop.is_set():
                            self._process([], flush=True)  # the stream ended: close the open segment
                        break
                    continue
                items = carry + batch
                usable = len(items) - len(items) % unit
                carry = items[usable:]
                if usable:
                    self._process(items[:usable])
                self._sample()
        finally:
            # a trailing half unit cannot be encoded; frames still queued at stop are never processed
            self.stats.frames_dropped += len(carry) + len(self.queue.get_batch(self.config.queue_frames, 0))
            self.stats.frames_dropped += self.queue.take_dropped()
            self.worker_done.set()

    def _process(self, items: list[tuple[Frame, float]], flush: bool = False) -> None:
        frames = [f for f, _ in items]
        try:
            result = self.stages.encode_add(frames, self._fps, flush)
        except StageFailed as e:
            self.stats.stage_failures += 1
            self.stats.frames_dropped += len(frames)
            log.warning("lost %d frames: %s", len(frames), e)
            return
        s = self.stats
        s.frames_processed += len(frames)
        s.tokens = result["tokens"]
        s.tokens_max = max(s.tokens_max, result["tokens_peak"])
        s.kv_cache_bytes = result["kv_cache_bytes"]
        s.rss_bytes = result["rss_bytes"]
        s.stream_time = result["stream_time"]
        s.merged, s.evicted = result["merged"], result["evicted"]
        s.segments_closed, s.open_units = result["segments_closed"], result["open_units"]
        s.cacher_frames += result["cacher_frames"]
        s.cacher_hits += result["cacher_hits"]
        s.cacher_scene_cuts += result["cacher_scene_cuts"]
        s.cacher_hit_rate = s.cacher_hits / s.cacher_frames if s.cacher_frames else 0.0
        self._flops[0] += result["flops_full"]
        self._flops[1] += result["flops_spent"]
        s.vision_flops_saved_share = 1.0 - self._flops[1] / self._flops[0] if self._flops[0] else 0.0
        if frames:
            self._stage_ms["encode"].append(result["encode_ms"])
            self._stage_ms["select"].append(result["select_ms"])
        done = time.monotonic()
        self._lat.extend((done - arrived) * 1000 for _, arrived in items)
        with self._progress:
            self._progress.notify_all()

    def _sample(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_sample[0] < self.config.stats_interval:
            return
        self._write_stats(now)

    def _write_stats(self, now: float | None = None) -> None:
        now = now or time.monotonic()
        s = self.stats
        s.frames_dropped += self.queue.take_dropped()
        last_t, last_n = self._last_sample
        s.fps_processed = (s.frames_processed - last_n) / (now - last_t) if now > last_t else 0.0
        lat, self._lat = self._lat, []
        s.latency_ms_mean = float(np.mean(lat)) if lat else 0.0
        s.latency_ms_max = float(np.max(lat)) if lat else 0.0
        for stage, values in self._stage_ms.items():
            if values:
                setattr(s, f"{stage}_ms_p50", float(np.percentile(values, 50)))
                setattr(s, f"{stage}_ms_p99", float(np.percentile(values, 99)))
            self._stage_ms[stage] = []
        s.driver_rss_bytes = process_rss()
        s.source_dropped, s.source_malformed = self.source.stats.dropped, self.source.stats.malformed
        self._last_sample = (now, s.frames_processed)
        if self._stats_fd is not None:  # one line, on disk when written; a full disk ends the run in one line
            append_line(self._stats_fd, json.dumps({"time": round(time.time(), 3), **asdict(s)}) + "\n",
                        self._stats_path, "--stats-json")

    # -- questions -------------------------------------------------------------------------------
    def ask(self, question: str, at: float | None = None, timeout: float = 60.0) -> LiveAnswer:
        """Answer `question` from the memory now, or once the stream reached `at` seconds."""
        # tokens, not frames: a temporal method's frames reach the memory when their segment closes
        if not self.wait_for(lambda s: s.tokens > 0 and (at is None or s.stream_time >= at), timeout):
            if self.error is not None:
                raise self.error
            if not self.stats.tokens:
                raise InputError("no frames reached the memory; is the source producing frames?")
        if self.error is not None:
            raise self.error
        with self._ask_lock:  # one controller decision per answer, in order
            retain = self.controller.next_retain() if self.controller is not None else None
            answer = self.stages.ask(question, retain)
            if self.controller is not None:
                self.controller.observe(retain, answer.latency_ms)
        s = self.stats
        self._answer_ms.append(answer.latency_ms)
        s.answers += 1
        s.answer_ms_p50 = float(np.percentile(self._answer_ms, 50))
        s.answer_ms_p99 = float(np.percentile(self._answer_ms, 99))
        s.answer_retain = 1.0 if retain is None else retain
        return answer
