"""How fast our PyAV decoding is next to the ffmpeg CLI on the same file, in the same run.

Two workloads: dense (every frame) and sparse (1 frame per second). The ffmpeg references are
`ffmpeg -i FILE -f null -` and `ffmpeg -i FILE -vf fps=1 -f null -`; ffmpeg decodes every frame in
both, while we may seek past frames in the sparse one. Our side also converts each kept frame to
RGB (`Frame.image`), which the ffmpeg null sink does not. ffmpeg is a system package
(`apt-get install -y ffmpeg` on Debian/Ubuntu CI); without it the bench says so in its result.

    python -m streamprune.bench.decode_bench FILE          # or: --generate 60 to make a 640x360 clip
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from streamprune.decode import Strategy, iter_frames, probe
from streamprune.videofile import pattern_frames, write_video

log = logging.getLogger(__name__)

WORKLOADS = {"dense": (None, []), "sparse_1fps": (1.0, ["-vf", "fps=1"])}


def _ours(path: Path, fps: float | None, strategy: Strategy) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = sum(1 for _ in iter_frames(path, fps=fps, strategy=strategy))
    return time.perf_counter() - t0, n


def _ffmpeg(ffmpeg: str, path: Path, extra: list[str]) -> tuple[float, int]:
    cmd = [ffmpeg, "-hide_banner", "-nostdin", "-i", str(path), *extra, "-f", "null", "-"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip().splitlines()[-1:]}")
    counts = re.findall(r"frame=\s*(\d+)", done.stderr)
    return seconds, int(counts[-1]) if counts else -1


def run_decode_bench(path: str | Path, repeats: int = 3) -> dict:
    """Best-of-`repeats` wall time (s) and frames per second for us and for the ffmpeg CLI on `path`,
    per workload, with `ratio` = our time / ffmpeg's time (below 1: we are faster)."""
    path = Path(path)
    info = probe(path)
    ffmpeg = shutil.which("ffmpeg")
    result: dict = {
        "file": str(path),
        "video": {"duration_s": info.duration, "fps": info.fps, "frames": info.frames,
                  "size": f"{info.width}x{info.height}", "codec": info.codec},
        "ffmpeg": _ffmpeg_version(ffmpeg) if ffmpeg else "not installed: no reference timings (apt-get install -y ffmpeg)",
        "repeats": repeats,
    }
    for name, (fps, ff_args) in WORKLOADS.items():
        row: dict = {}
        for strategy in ("auto", "sequential"):
            seconds, n = min(_ours(path, fps, strategy) for _ in range(repeats))
            row[f"ours_{strategy}"] = {"seconds": round(seconds, 3), "frames_out": n,
                                       "video_s_per_s": round(info.duration / seconds, 1)}
        if ffmpeg:
            seconds, n = min(_ffmpeg(ffmpeg, path, ff_args) for _ in range(repeats))
            row["ffmpeg"] = {"seconds": round(seconds, 3), "frames_out": n, "video_s_per_s": round(info.duration / seconds, 1)}
            row["ratio"] = round(row["ours_auto"]["seconds"] / seconds, 2)
        result[name] = row
        log.info("%s: %s", name, row)
    return result


def _ffmpeg_version(ffmpeg: str) -> str:
    out = subprocess.run([ffmpeg, "-version"], capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else ffmpeg


def generate_clip(path: Path, seconds: float = 60.0, fps: float = 30.0, gop_s: float = 2.0) -> Path:
    """A 640x360 H.264 test clip of `seconds` with a keyframe every `gop_s` seconds."""
    return write_video(path, pattern_frames(round(seconds * fps), 640, 360), fps, "h264", gop=round(gop_s * fps))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", type=Path, help="video to decode (or use --generate)")
    parser.add_argument("--generate", type=float, metavar="SECONDS", help="bench a generated 640x360 H.264 clip this long")
    parser.add_argument("--gop", type=float, default=2.0, help="keyframe interval (s) of the generated clip")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.file is None and args.generate is None:
        parser.error("give a FILE or --generate SECONDS")
    with tempfile.TemporaryDirectory() as tmp:
        path = args.file or generate_clip(Path(tmp) / "bench.mp4", args.generate, gop_s=args.gop)
        sys.stdout.write(json.dumps(run_decode_bench(path, args.repeats), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
