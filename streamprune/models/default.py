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

log = logging.getLogger(__name__)

TRAINED_DIR = Path(__file__).resolve().parent.parent / "assets" / "default_videoqa"


def default_model_dir() -> Path:
    if (TRAINED_DIR / "config.json").is_file():
        return TRAINED_DIR
    from streamprune.models.tiny import save_tiny

    cache = Path(os.environ.get("STREAMPRUNE_CACHE", Path.home() / ".cache" / "streamprune")) / "tiny-llava_onevision"
    if not (cache / "config.json").is_file():
        log.warning("no trained default model found; building a tiny random LLaVA-OneVision in %s", cache)
        save_tiny("llava_onevision", cache)
    return cache
