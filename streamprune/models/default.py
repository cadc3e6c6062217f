"""Where the embedded default Video-LLM lives.

The trained default (a small LLaVA-OneVision trained here on synthetic video QA, see
pipelines/train_video_qa.py) ships in streamprune/assets/default_videoqa. Until that checkpoint
is present, a tiny randomly initialised LLaVA-OneVision is built once into the user cache: it
runs every code path but its answers are noise.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

TRAINED_DIR = Path(__file__).resolve().parent.parent / "assets" / "default_videoqa"


def trained_or_tiny(trained: Path, cache_name: str, build: Callable[[Path], Path]) -> Path:
    """`trained` if that checkpoint is present, else a tiny random stand-in built once by
    `build(dir)` into the user cache (a warning says its outputs are noise)."""
    if (trained / "config.json").is_file():
        return trained
    cache = Path(os.environ.get("STREAMPRUNE_CACHE", Path.home() / ".cache" / "streamprune")) / cache_name
    if not (cache / "config.json").is_file():
        log.warning("no trained model at %s; building a tiny random stand-in in %s", trained, cache)
        build(cache)
    return cache


def default_model_dir() -> Path:
    from streamprune.models.tiny import save_tiny

    return trained_or_tiny(TRAINED_DIR, "tiny-llava_onevision", lambda out: save_tiny("llava_onevision", out))
