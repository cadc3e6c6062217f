"""The batch job's per-input work before the model: find the inputs, plan each one (sha256 of its
bytes + probe -> [start, end) segments), decode the segments and join their frames in time order.

Plain functions of plain values, so `batch_job` runs them in-process and `batch_ray` runs the same
ones as Ray tasks. decode.py guarantees that the frames of consecutive segments concatenate to
exactly the whole clip's, so a segmented clip gives the model (and temporal pruning methods) the
same frames as one decode of the whole clip. A file that cannot be read, probed or decoded gives an
error value, never an exception: one bad input becomes that input's error line, not a failed batch.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streamprune.decode import decode_frames, probe
from streamprune.errors import InputError

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset({
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts",
    ".flv", ".wmv", ".ogv", ".3gp", ".h264", ".264", ".hevc", ".265", ".y4m",
})
HASH_CHUNK = 1 << 20

Window = tuple[float | None, float | None]


def find_inputs(specs: Sequence[str]) -> list[str]:
    """Absolute paths of the inputs, in the order given, each once.

    A file is taken as named (whatever its extension); a folder is searched recursively for files
    with a video extension; anything else is a glob (`**` recurses) whose matched files are taken
    as named and matched folders searched like folders."""
    found: dict[str, None] = {}
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_file() or path.is_dir():
            matches = [path]
        elif any(ch in spec for ch in "*?["):
            matches = [Path(p) for p in sorted(glob.glob(os.path.expanduser(spec), recursive=True))]
        else:
            raise InputError(f"no such file or folder: {spec}")
        for match in matches:
            if match.is_dir():
                files = sorted(p for p in match.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
            else:
                files = [match]
            for file in files:
                found.setdefault(str(file.resolve()), None)
    if not found:
        raise InputError(f"no video inputs matched: {' '.join(specs)}")
    return list(found)


def file_sha256(path: str | Path) -> str:
    """sha256 of the file's bytes, read in 1 MiB chunks (videos can be larger than memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def split_segments(duration: float, segment_seconds: float) -> list[Window]:
    """[start, end) windows (None = open) of `segment_seconds` covering a `duration`-long clip; one
    open window when the clip is no longer than a segment. The last window is open-ended so frames
    past a short declared duration still land in it."""
    count = max(1, math.ceil(duration / segment_seconds - 1e-9))
    return [(i * segment_seconds if i else None, (i + 1) * segment_seconds if i < count - 1 else None)
            for i in range(count)]


def first_line(err: BaseException) -> str:
    """An exception as one line (results lines and log messages stay one line per event)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@dataclass
class Plan:
    """What an input is before decoding: its content hash and how it is split into segments."""

    input: str
    sha256: str | None = None
    duration_s: float | None = None
    segments: list[Window] = field(default_factory=list)
    error: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)


def plan_input(path: str, segment_seconds: float) -> Plan:
    """Hash and probe `path`. A file that cannot be read or is no video gives `Plan.error`."""
    plan = Plan(input=path)
    start = time.perf_counter()
    try:
        plan.sha256 = file_sha256(path)
    except OSError as err:
        plan.error = f"cannot read {path}: {err.strerror or err}"
        return plan
    hashed = time.perf_counter()
    plan.timings_ms["hash_ms"] = round((hashed - start) * 1000, 3)
    try:
        info = probe(path)
    except InputError as err:
        plan.error = str(err)
        return plan
    except Exception as err:  # noqa: BLE001 - a demuxer failure on one file becomes that input's error line
        log.exception("probing %s failed", path)
        plan.error = f"probing failed: {type(err).__name__}: {first_line(err)}"
        return plan
    plan.timings_ms["probe_ms"] = round((time.perf_counter() - hashed) * 1000, 3)
    plan.duration_s = info.duration
    plan.segments = split_segments(info.duration, segment_seconds)
    return plan


@dataclass
class SegmentMeta:
    """The small half of a decoded segment (the frames travel separately): frame numbers in the
    stream, decode time, or why decoding failed."""

    indices: list[int]
    decode_ms: float
    error: str | None = None


def _no_frames() -> np.ndarray:
    return np.empty((0, 0, 0, 3), dtype=np.uint8)


def decode_segment(path: str, fps: float, max_frames: int | None, start: float | None,
                   end: float | None) -> tuple[SegmentMeta, np.ndarray]:
    """Decode the sampled frames of `path` in [start, end): (meta, frames `[T, H, W, 3]` uint8).
    T may be 0 (no sampled frame falls in the window). A truncated/corrupt file gives `meta.error`."""
    began = time.perf_counter()
    try:
        frames = decode_frames(path, fps=fps, max_frames=max_frames, start=start, end=end)
    except InputError as err:
        return SegmentMeta([], round((time.perf_counter() - began) * 1000, 3), str(err)), _no_frames()
    except Exception as err:  # noqa: BLE001 - a decoder failure on one file becomes that input's error line
        log.exception("decoding %s [%s, %s) failed", path, start, end)
        reason = f"decoding failed: {type(err).__name__}: {first_line(err)}"
        return SegmentMeta([], round((time.perf_counter() - began) * 1000, 3), reason), _no_frames()
    images = np.stack([f.image for f in frames]) if frames else _no_frames()
    return SegmentMeta([f.index for f in frames], round((time.perf_counter() - began) * 1000, 3)), images


def join_segments(segments: Sequence[np.ndarray], indices: Sequence[Sequence[int]]) -> np.ndarray:
    """Frames of consecutive segments in time order, `[T, H, W, 3]`; a frame number that two
    segments both returned (a frame shown across a window boundary) is kept once, as a whole-clip
    decode would."""
    seen: set[int] = set()
    parts = []
    for images, numbers in zip(segments, indices):
        keep = [i for i, number in enumerate(numbers) if number not in seen]
        seen.update(numbers)
        if keep:
            parts.append(images[keep])
    return np.concatenate(parts) if parts else _no_frames()
