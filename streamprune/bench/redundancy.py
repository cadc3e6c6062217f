"""`streamprune bench redundancy`: how much of a video's visual tokens stay the same from one sampled
frame to the next, for our synthetic QA data (versions 3 and 4) and for real footage.

Two statistics per clip, averaged over clips (with the 10th-90th percentile across them):

  feature  share of visual tokens (after the model's projector and pooling) whose feature has cosine
           >= `threshold` with the token at the same grid position one sampled frame earlier; the
           encoder is the `--model` adapter's, the same for every source
  pixel    share of 16x16 cells of the frame resized to 128x128 whose mean absolute change from the
           previous frame is below `level` grey levels (encoder-free)

Pruning methods that merge or drop temporally static tokens (FastVID, HoliTom, STC, FrameFusion)
feed on the first; a benchmark whose data has far less of it than real video cannot rank them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamprune.outputs import write_text

PIXEL_SIDE, PIXEL_CELL = 128, 16


@dataclass
class Source:
    name: str
    clips: list[np.ndarray]  # each [T, H, W, 3] uint8


def feature_static_share(adapter: Any, frames: np.ndarray, threshold: float) -> float:
    """Share of tokens of frames 1..T-1 whose feature barely moved since the previous frame."""
    tokens = adapter.encode(frames, fps=1.0).tokens
    t, h, w = tokens.grid
    feats = torch.nn.functional.normalize(tokens.features.float().reshape(t, h * w, -1), dim=-1)
    cosine = (feats[1:] * feats[:-1]).sum(-1)  # [T-1, h*w]
    return float((cosine >= threshold).float().mean())


def pixel_static_share(frames: np.ndarray, level: float) -> float:
    from PIL import Image

    small = np.stack([np.asarray(Image.fromarray(f).resize((PIXEL_SIDE, PIXEL_SIDE), Image.BILINEAR), np.float32)
                      for f in frames])
    cells = PIXEL_SIDE // PIXEL_CELL
    change = np.abs(np.diff(small, axis=0)).reshape(len(frames) - 1, cells, PIXEL_CELL, cells, PIXEL_CELL, 3)
    return float((change.mean(axis=(2, 4, 5)) < level).mean())


def synthetic_source(version: str, clips: int) -> Source:
    from streamprune.data.synthetic_qa import clip_seed, data_version

    data = data_version(version)
    return Source(f"synthetic v{version}", [data.generate_clip(clip_seed("test", i)).frames for i in range(clips)])


def video_source(path: str | Path, fps: float, frames: int, windows: int) -> Source:
    """`windows` runs of `frames` consecutive frames sampled at `fps`, spread over the file."""
    from streamprune.decode import decode_frames

    decoded = decode_frames(path, fps=fps)
    if len(decoded) < frames:
        raise ValueError(f"{path}: {len(decoded)} frames at {fps:g} fps, fewer than {frames}")
    starts = np.linspace(0, len(decoded) - frames, min(windows, len(decoded) - frames + 1)).round().astype(int)
    return Source(Path(path).name, [np.stack([f.image for f in decoded[s:s + frames]]) for s in starts])


def measure(adapter: Any, sources: list[Source], threshold: float, level: float) -> list[dict[str, Any]]:
    rows = []
    for source in sources:
        feature = [feature_static_share(adapter, clip, threshold) for clip in source.clips]
        pixel = [pixel_static_share(clip, level) for clip in source.clips]
        rows.append({"source": source.name, "clips": len(source.clips), "frames": int(source.clips[0].shape[0]),
                     "size": f"{source.clips[0].shape[2]}x{source.clips[0].shape[1]}",
                     "feature_static": round(float(np.mean(feature)), 4),
                     "feature_static_p10_p90": [round(float(np.percentile(feature, q)), 4) for q in (10, 90)],
                     "pixel_static": round(float(np.mean(pixel)), 4),
                     "pixel_static_p10_p90": [round(float(np.percentile(pixel, q)), 4) for q in (10, 90)]})
    return rows


def format_redundancy_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| source | clips x frames | size | feature-static share (p10-p90) | pixel-static share (p10-p90) |",
             "|---|---|---|---|---|"]
    for r in rows:
        f10, f90 = r["feature_static_p10_p90"]
        p10, p90 = r["pixel_static_p10_p90"]
        lines.append(f"| {r['source']} | {r['clips']} x {r['frames']} | {r['size']} | {r['feature_static']:.3f} "
                     f"({f10:.2f}-{f90:.2f}) | {r['pixel_static']:.3f} ({p10:.2f}-{p90:.2f}) |")
    return "\n".join(lines)


def write_redundancy_json(rows: list[dict[str, Any]], path: str | Path, meta: dict[str, Any]) -> None:
    write_text(path, json.dumps({"meta": meta, "rows": rows}, indent=1), "--json")
