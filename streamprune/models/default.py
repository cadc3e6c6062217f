"""Where the embedded models live.

The trained defaults (a small LLaVA-OneVision Video-LLM trained on synthetic video QA by
pipelines/train_video_qa.py, and a VLA of the same family trained by pipelines/train_vla.py) ship
in streamprune/assets. Until a checkpoint is present, a tiny randomly initialised model of the same
kind is built once into the user cache: it runs every code path but its outputs are noise.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from streamprune.errors import ConfigError

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TRAINED_DIR = ASSETS / "default_videoqa"
TRAINED_VLA_DIR = ASSETS / "default_vla"
EMBEDDED = {"videoqa": TRAINED_DIR, "vla": TRAINED_VLA_DIR}


def embedded_model_dir(name: str) -> Path:
    """The trained embedded model `name` (videoqa | vla), or its tiny random stand-in."""
    if name not in EMBEDDED:
        raise ConfigError(f"unknown embedded model {name!r}; choose one of: {', '.join(EMBEDDED)}")
    trained = EMBEDDED[name]
    if (trained / "config.json").is_file():
        return trained
    cache = Path(os.environ.get("STREAMPRUNE_CACHE", Path.home() / ".cache" / "streamprune")) / f"tiny-{name}"
    if not (cache / "config.json").is_file():
        from streamprune.models.tiny import save_tiny, save_tiny_vla

        log.warning("no trained model at %s; building a tiny random stand-in in %s", trained, cache)
        if name == "vla":
            save_tiny_vla(cache, image_size=64)
        else:
            save_tiny("llava_onevision", cache)
    return cache


def trained_data_version(model_dir: str | Path | None) -> str:
    """The synthetic QA version a model was trained on (its train_metrics.json), else version 3."""
    metrics = Path(model_dir or "") / "train_metrics.json"
    if model_dir is not None and metrics.is_file():
        return str(json.loads(metrics.read_text()).get("data_version", "3"))
    return "3"
