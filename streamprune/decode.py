"""Decode video files to RGB frames with PyAV: fps sampling, a frame cap, and keyframe-aware seeking.

Which frames come back is decided before anything is decoded, from the probed stream alone
(`sample_frame_numbers`): frame numbers on the stream's nominal frame grid, so the same file and
arguments always give the same frames, whichever way they are decoded. Decoding then either runs
sequentially or, where the wanted frames are far apart relative to the keyframe spacing, seeks to
the keyframe before each wanted frame and decodes forward only from there.

Segments: `start`/`end` only filter the whole clip's sampled frame numbers (by their nominal time
k / fps in [start, end)), so for a constant-frame-rate file the frames of consecutive segments
[0, a), [a, b), [b, None) concatenate to exactly the frames of the whole clip, for any boundaries
a < b. The batch job uses this to decode segments of a long video in parallel.

Limits: variable-frame-rate files are mapped onto the nominal grid of their average rate (a wanted
slot with no frame gets the frame on screen then); frame numbers come from presentation
timestamps, so containers that store none (AVI with B-frames) come out shifted by the reorder
delay; a cut-short file is reported only when a wanted frame lies past the cut.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import av
import numpy as np

from streamprune.errors import InputError
from streamprune.types import Frame

log = logging.getLogger(__name__)

Strategy = Literal["auto", "seek", "sequential"]

# Seek when it skips at least this much video: below it, decoding through is about as cheap as a seek
# (which flushes the threaded decoder and restarts it from a keyframe).
MIN_SEEK_SKIP_S = 0.5
# Without a keyframe index, seek blind when the next wanted frame is this far ahead (or 2 GOPs seen so far).
BLIND_SEEK_GAP_S = 1.0
# Wanted frames at most this far past the last decodable frame are served by that frame (a declared
# duration a little longer than the video track is common); further past means the file is cut short.
TRUNCATION_TOLERANCE_S = 0.5


@dataclass(frozen=True)
class VideoInfo:
    """What `probe` reads from the container, without decoding: duration in seconds, the average
    frame rate, and the frame count (estimated as duration * fps when the container stores none,
    as WebM; counted from packets for raw streams)."""

    duration: float
    fps: float
    frames: int
    width: int
    height: int
    codec: str


@contextlib.contextmanager
def _open(path: str | Path) -> Iterator[tuple[av.container.InputContainer, av.video.stream.VideoStream]]:
    """Open `path` and its first video stream, turning every way that can fail into an InputError."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"no such video file: {path}")
    if not path.is_file():
        raise InputError(f"not a file: {path}")
    try:
        container = av.open(str(path), mode="r")
    except av.FFmpegError as err:
        raise InputError(f"not a readable video (not a video, truncated or corrupt): {path} ({_reason(err)})") from None
    try:
        if not container.streams.video:
            raise InputError(f"no video stream in {path}")
        yield container, container.streams.video[0]
    finally:
        container.close()


def _reason(err: Exception) -> str:
    return getattr(err, "strerror", None) or str(err).splitlines()[0]


def _duration_s(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    tag = stream.metadata.get("DURATION")  # Matroska/WebM keep the per-track duration here
    if tag:
        with contextlib.suppress(ValueError):
            h, m, s = tag.split(":")
            return int(h) * 3600 + int(m) * 60 + float(s)
    if container.duration:
        return container.duration / av.time_base
    return None


def _info(container: av.container.InputContainer, stream: av.video.stream.VideoStream, path: Path) -> VideoInfo:
    duration = _duration_s(container, stream)
    frames = stream.frames
    # a raw elementary stream (.h264) declares no duration and its average rate is a default guess;
    # the guessed rate comes from the bitstream's own timing info
    rate = (stream.average_rate or stream.guessed_rate) if duration is not None else (stream.guessed_rate or stream.average_rate)
    rate = rate or stream.base_rate
    if not rate:
        raise InputError(f"video stream has no frame rate: {path}")
    fps = float(rate)
    if duration is None:
        # count the packets (demuxing only) in a second reader: these streams cannot seek back
        with av.open(str(path)) as counter:
            frames = frames or sum(1 for p in counter.demux(video=0) if p.size)
        duration = frames / fps
    frames = frames or round(duration * fps)
    if frames < 1:
        raise InputError(f"video has no frames: {path}")
    return VideoInfo(duration, fps, frames, stream.width, stream.height, stream.codec_context.name)


def probe(path: str | Path) -> VideoInfo:
    """Duration (s), frame rate, frame count, size and codec of the first video stream."""
    with _open(path) as (container, stream):
        return _info(container, stream, Path(path))


def sample_frame_numbers(frames: int, src_fps: float, fps: float | None = None, max_frames: int | None = None) -> list[int]:
    """Frame numbers (0-based, ascending, unique) to keep from a `frames`-long clip at `src_fps`.

    fps sampling: sample times i / fps for i = 0, 1, ... while < frames / src_fps; each takes the
    frame on screen at that time, floor(i * src_fps / fps) (fps above the source rate gives every
    frame once). `fps=None` keeps every frame. Then, if more than `max_frames` remain, keep
    `max_frames` of them evenly spaced, first and last included (round(linspace(0, n-1, max_frames))).
    """
    if fps is None or fps >= src_fps:
        numbers = list(range(frames))
    else:
        n_samples = math.ceil(frames * fps / src_fps - 1e-9)
        step = src_fps / fps
        numbers = sorted({min(frames - 1, math.floor(i * step + 1e-6)) for i in range(n_samples)})
    if max_frames is not None and len(numbers) > max_frames:
        picks = np.round(np.linspace(0, len(numbers) - 1, max_frames)).astype(int)
        numbers = [numbers[j] for j in picks]
    return numbers


def decode_frames(
    path: str | Path,
    fps: float | None = None,
    max_frames: int | None = None,
    start: float | None = None,
    end: float | None = None,
    *,
    strategy: Strategy = "auto",
) -> list[Frame]:
    """Decode the sampled frames of `path` as RGB uint8 `[H, W, 3]` Frames, in time order.

    fps / max_frames choose the frames (`sample_frame_numbers`); start / end (seconds) keep those
    whose nominal time lies in [start, end). `Frame.index` is the frame's number in the stream and
    `Frame.timestamp` its presentation time in seconds from the stream start.

    strategy: "auto" seeks to the keyframe before a wanted frame when that skips at least
    MIN_SEEK_SKIP_S of video (from the container's keyframe index, or, without one, when the frame
    is over max(1 s, 2 GOPs) ahead); "seek" seeks before every wanted frame; "sequential" never
    seeks. All three return the same frames. Raw elementary streams (.h264) are always read through.
    """
    return list(iter_frames(path, fps, max_frames, start, end, strategy=strategy))


def iter_frames(
    path: str | Path,
    fps: float | None = None,
    max_frames: int | None = None,
    start: float | None = None,
    end: float | None = None,
    *,
    strategy: Strategy = "auto",
) -> Iterator[Frame]:
    """`decode_frames` one frame at a time, for clips too long to hold decoded. Arguments are
    checked now; file errors (including truncation, found at the end) surface while iterating."""
    if fps is not None and not fps > 0:
        raise InputError(f"fps must be > 0, got {fps}")
    if max_frames is not None and max_frames < 1:
        raise InputError(f"max_frames must be >= 1, got {max_frames}")
    if start is not None and start < 0:
        raise InputError(f"start must be >= 0 seconds, got {start}")
    if end is not None and end <= (start or 0.0):
        raise InputError(f"end ({end}) must be after start ({start or 0.0})")
    if strategy not in ("auto", "seek", "sequential"):
        raise InputError(f"unknown decode strategy {strategy!r}: auto, seek or sequential")
    return _iterate(Path(path), fps, max_frames, start, end, strategy)


def _iterate(
    path: Path, fps: float | None, max_frames: int | None, start: float | None, end: float | None, strategy: Strategy
) -> Iterator[Frame]:
    with _open(path) as (container, stream):
        info = _info(container, stream, path)
        wanted = [
            k
            for k in sample_frame_numbers(info.frames, info.fps, fps, max_frames)
            if (start is None or k / info.fps >= start) and (end is None or k / info.fps < end)
        ]
        if not wanted:
            return
        stream.thread_type = "AUTO"
        try:
            reader = _Reader(container, stream, info, path)
            yield from reader.read(wanted, strategy)
            if end is None:
                reader.check_complete()
        except av.FFmpegError as err:
            raise InputError(f"truncated or corrupt video: {path} ({_reason(err)})") from None


class _Reader:
    """Decodes one open stream towards a list of wanted frame numbers, seeking when it pays."""

    def __init__(self, container: av.container.InputContainer, stream: av.video.stream.VideoStream, info: VideoInfo, path: Path):
        self.container, self.stream, self.info, self.path = container, stream, info, path
        self.tb = float(stream.time_base)
        self.start_pts = stream.start_time or 0
        self.keyframes, self.index_complete = self._index_keyframes()
        # raw elementary streams (no declared duration) cannot seek: decode them straight through
        self.seekable = bool(container.duration or stream.duration)
        self.gop_s = float(np.max(np.diff(self.keyframes))) if len(self.keyframes) > 1 else 0.0
        self.last_key_s: float | None = None  # last keyframe seen while decoding without a seek in between
        self.seeks = 0
        self.decoded = 0

    def check_complete(self) -> None:
        """A file cut short can still serve every wanted frame (a sparse sample that all lies
        before the cut), yet it is broken: demux the last seconds (packets only, no decoding)
        and check that they reach the declared duration."""
        if not self.seekable:
            return
        tail_start = max(0.0, self.info.duration - 2.0)
        self.container.seek(self.start_pts + int(tail_start / self.tb), backward=True, any_frame=False,
                            stream=self.stream)
        reached = None
        for packet in self.container.demux(self.stream):
            if packet.pts is not None and packet.size:
                end = (packet.pts - self.start_pts + (packet.duration or 0)) * self.tb
                reached = end if reached is None else max(reached, end)
        if reached is None or self.info.duration - reached > TRUNCATION_TOLERANCE_S:
            stop = f"{reached:.2f}s" if reached is not None else "an unknown point"
            raise InputError(f"truncated or corrupt video: {self.path} (packets stop at {stop} of a declared "
                             f"{self.info.duration:.2f}s)")

    def _index_keyframes(self) -> tuple[list[float], bool]:
        """Keyframe times (s, presentation) from the container index, and whether that index lists
        every packet (MP4 does; WebM cues list only some keyframes, so we learn the rest by decoding)."""
        entries = self.stream.index_entries
        if len(entries) == 0:
            return [], False
        # MP4 indexes decode timestamps; with B-frames they run a constant delay ahead of presentation
        shift = max(0, self.start_pts - entries[0].timestamp)
        keys = sorted((e.timestamp + shift - self.start_pts) * self.tb for e in entries if e.is_keyframe)
        return keys, len(entries) >= self.info.frames

    def _time(self, frame: av.VideoFrame, fallback: float) -> float:
        return (frame.pts - self.start_pts) * self.tb if frame.pts is not None else fallback

    def _decode_from_here(self) -> Iterator[tuple[av.VideoFrame, int, float]]:
        t = -1.0 / self.info.fps
        for packet in self.container.demux(self.stream):
            for frame in packet.decode():
                t = self._time(frame, t + 1.0 / self.info.fps)
                self.decoded += 1
                if frame.key_frame:
                    self._saw_keyframe(t)
                yield frame, round(t * self.info.fps), t

    def _saw_keyframe(self, t: float) -> None:
        if self.last_key_s is not None and t > self.last_key_s:
            self.gop_s = max(self.gop_s, t - self.last_key_s)
        self.last_key_s = t
        if not self.index_complete and (not self.keyframes or t not in self.keyframes):
            bisect.insort(self.keyframes, t)

    def _seek_to(self, k: int) -> Iterator[tuple[av.VideoFrame, int, float]]:
        """Frames from the keyframe at or before frame `k` onwards. Some demuxers land on a later
        keyframe (MPEG-TS searches by decode time, forwards); then step back and seek again."""
        target = k / self.info.fps
        offset = target
        while True:
            self.seeks += 1
            self.last_key_s = None
            if offset > 0:
                pts = int(round(offset / self.tb)) + self.start_pts
                self.container.seek(pts, backward=True, any_frame=False, stream=self.stream)
            else:  # the container's time 0 lies before every stream's first timestamp (MPEG-TS starts later)
                self.container.seek(0, backward=True, any_frame=False)
            frames = self._decode_from_here()
            first = next(frames, None)
            if offset <= 0 or (first is not None and first[1] <= k):
                if first is not None:
                    yield first
                    yield from frames
                return
            # landed past the target, or past the last keyframe (MPEG-TS seeks forward to the next one)
            log.debug("seek for %.3fs landed at %s; stepping back", target, f"{first[2]:.3f}s" if first else "the end")
            overshoot = first[2] - target if first else 0.0
            offset = max(0.0, offset - max(BLIND_SEEK_GAP_S, self.gop_s, overshoot))

    def _should_seek(self, pos_s: float | None, k: int, strategy: Strategy) -> bool:
        target = k / self.info.fps
        if strategy == "sequential" or not self.seekable:
            return False
        if strategy == "seek":
            return True
        here = pos_s if pos_s is not None else 0.0
        i = bisect.bisect_right(self.keyframes, target + 0.5 / self.info.fps) - 1
        if i >= 0 and self.keyframes[i] - here >= MIN_SEEK_SKIP_S:
            return True
        return not self.index_complete and target - here > max(BLIND_SEEK_GAP_S, 2 * self.gop_s)

    def read(self, wanted: list[int], strategy: Strategy) -> Iterator[Frame]:
        """Frames for the ascending frame numbers `wanted`, each once, in order."""
        pending = deque(wanted)
        frames: Iterator[tuple[av.VideoFrame, int, float]] | None = None
        prev: tuple[av.VideoFrame, int, float] | None = None  # last frame decoded since the last seek
        last: tuple[int, float] | None = None  # (number, time) of the last frame decoded at all
        considered = -1  # the wanted frame we last decided about seeking for
        emitted = -1  # number of the last frame handed out
        kept = 0

        while pending:
            k = pending[0]
            if k != considered:
                considered = k
                if self._should_seek(last[1] if last else None, k, strategy):
                    frames, prev = self._seek_to(k), None
            if frames is None:
                frames = self._decode_from_here()
            item = next(frames, None)
            if item is None:
                break
            number = item[1]
            chosen = []
            while pending and pending[0] < number:
                # the wanted frame is not in the stream (variable rate, dropped frame): the one on screen then
                pending.popleft()
                chosen.append(prev or item)
            if pending and pending[0] == number:
                pending.popleft()
                chosen.append(item)
            for frame, n, t in chosen:
                if n > emitted:
                    emitted, kept = n, kept + 1
                    yield Frame(image=frame.to_ndarray(format="rgb24"), timestamp=t, index=n)
            prev, last = item, (number, item[2])

        if pending:
            if last is None or (pending[-1] - last[0]) / self.info.fps > TRUNCATION_TOLERANCE_S:
                stop = f"{last[1]:.2f}s" if last else "the start"
                raise InputError(
                    f"truncated or corrupt video: {self.path} (frames stop at {stop} of a declared {self.info.duration:.2f}s)"
                )
            if prev is not None and prev[1] > emitted:  # the declared duration runs a little past the last frame
                kept += 1
                yield Frame(image=prev[0].to_ndarray(format="rgb24"), timestamp=prev[2], index=prev[1])
        log.debug("%s: kept %d frames, decoded %d, %d seeks (%s)", self.path.name, kept, self.decoded, self.seeks, strategy)
