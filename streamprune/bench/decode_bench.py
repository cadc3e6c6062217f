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
import resource
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


def _ours(path: Path, fps: float | None, strategy: Strategy) -> tuple[float, float, int]:
    """(wall s, CPU s of this process, frames out)."""
    wall, cpu = time.perf_counter(), time.process_time()
    n = sum(1 for _ in iter_frames(path, fps=fps, strategy=strategy))
    return time.perf_counter() - wall, time.process_time() - cpu, n


def _ffmpeg(ffmpeg: str, path: Path, extra: list[str]) -> tuple[float, float, int]:
    """(wall s, CPU s of the ffmpeg child, frames out)."""
    cmd = [ffmpeg, "-hide_banner", "-nostdin", "-i", str(path), *extra, "-f", "null", "-"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip().splitlines()[-1:]}")
    counts = re.findall(r"frame=\s*(\d+)", done.stderr)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, int(counts[-1]) if counts else -1


def _row(runs: list[tuple[float, float, int]], duration: float) -> dict:
    """Best wall and best CPU time over the repeats (least disturbed by other load)."""
    wall, cpu = min(r[0] for r in runs), min(r[1] for r in runs)
    return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "frames_out": runs[0][2],
            "video_s_per_wall_s": round(duration / wall, 1)}


def run_decode_bench(path: str | Path, repeats: int = 3) -> dict:
    """Wall and CPU time for us (auto and sequential strategies) and for the ffmpeg CLI on `path`,
    per workload, best of `repeats` runs interleaved so background load hits all alike.
    `ratio_wall` / `ratio_cpu` = our auto time / ffmpeg's (below 1: we are faster)."""
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
        runs: dict[str, list[tuple[float, float, int]]] = {"ours_auto": [], "ours_sequential": [], "ffmpeg": []}
        for _ in range(repeats):
            runs["ours_auto"].append(_ours(path, fps, "auto"))
            runs["ours_sequential"].append(_ours(path, fps, "sequential"))
            if ffmpeg:
                runs["ffmpeg"].append(_ffmpeg(ffmpeg, path, ff_args))
        row = {key: _row(r, info.duration) for key, r in runs.items() if r}
        if ffmpeg:
            row["ratio_wall"] = round(row["ours_auto"]["wall_s"] / row["ffmpeg"]["wall_s"], 2)
            row["ratio_cpu"] = round(row["ours_auto"]["cpu_s"] / row["ffmpeg"]["cpu_s"], 2)
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
