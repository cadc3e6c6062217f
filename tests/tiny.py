"""Helpers for tests: tiny random models of both supported families, built once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np

FAMILIES = ("llava_onevision", "qwen2_5_vl")


def random_clip(frames: int = 4, height: int = 40, width: int = 56, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 255, (frames, height, width, 3), dtype=np.uint8)


def build_tiny_dir(root: Path, family: str) -> Path:
    from streamprune.models.tiny import save_tiny

    return save_tiny(family, root / family, seed=0)
