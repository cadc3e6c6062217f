"""`streamprune ask`: one question about one video file."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from streamprune.config import AskConfig
from streamprune.config.fields import question_text
from streamprune.errors import InputError

log = logging.getLogger("streamprune")


def run(config: AskConfig) -> int:
    import numpy as np

    from streamprune.decode import decode_frames
    from streamprune.models import load_model
    from streamprune.pruning.base import PruneContext
    from streamprune.pruning.recipe import build_recipe

    question = question_text(config.question, "--question")
    build_recipe(config.method, retain=config.retain, max_tokens=config.max_tokens)  # a bad name fails before decoding
    if not Path(config.video).is_file():
        raise InputError(f"video file not found: {config.video}")
    start = time.perf_counter()
    frames = decode_frames(config.video, fps=config.fps, max_frames=config.max_frames)
    if not frames:
        raise InputError(f"no frames decoded from {config.video}")
    decode_ms = (time.perf_counter() - start) * 1000
    loaded = time.perf_counter()
    adapter = load_model(config.model, config.placement, frames=config.max_frames)
    recipe = adapter.recipe(config.method, retain=config.retain, max_tokens=config.max_tokens)
    load_ms = (time.perf_counter() - loaded) * 1000
    clip = np.stack([f.image for f in frames])
    answer = adapter.answer(clip, question, recipe, PruneContext(seed=config.seed), fps=config.fps,
                            max_new_tokens=config.max_new_tokens)
    timings = {f"{k}_ms": round(v, 3) for k, v in answer.timings_ms.items()}
    total_ms = round((time.perf_counter() - start) * 1000 - load_ms, 3)  # excludes the one-off model load
    if config.json:
        print(json.dumps({
            "answer": answer.text, "video": str(config.video), "question": question,
            "frames": len(frames), "frame_timestamps": [round(f.timestamp, 3) for f in frames],
            "visual_tokens_in": answer.visual_tokens_in, "visual_tokens_kept": answer.visual_tokens_kept,
            "method": config.method, "retain": recipe.budget.retain, "max_tokens": recipe.budget.max_tokens,
            "model": str(adapter.model_dir), "family": adapter.family,
            # decode_ms is the LLM's token decoding; video_decode_ms is PyAV's frame decoding
            **{k: timings.get(k, 0.0) for k in ("encode_ms", "prune_ms", "prefill_ms", "decode_ms")},
            "video_decode_ms": round(decode_ms, 3), "model_load_ms": round(load_ms, 3), "total_ms": total_ms,
            # what the recipe's STC-Cacher did (null when the recipe has none)
            "cacher": answer.cacher.as_dict() if answer.cacher is not None else None,
        }))
    else:
        print(answer.text)
        log.info("%d frames, %d/%d visual tokens kept, %.0f ms", len(frames), answer.visual_tokens_kept,
                 answer.visual_tokens_in, total_ms)
    return 0
