"""`streamprune viz`: draw the tokens a recipe keeps on each frame (drawing in streamprune/viz.py)."""

from __future__ import annotations

import logging
from pathlib import Path

from streamprune.config import VizConfig
from streamprune.config.fields import question_text
from streamprune.errors import ConfigError, InputError
from streamprune.outputs import check_output, output_file

log = logging.getLogger("streamprune.viz")


def run(config: VizConfig) -> int:
    """Decode, encode, select and write the annotated clip or contact sheet. Returns 0."""
    import numpy as np

    from streamprune.decode import decode_frames
    from streamprune.models import load_model
    from streamprune.pruning.base import PruneContext
    from streamprune.pruning.recipe import build_recipe
    from streamprune.viz import (CAPTION_PX, OUTPUTS, budget_text, contact_sheet, render, select_tokens,
                                 text_strip)

    out = Path(config.out)
    if out.suffix.lower() not in OUTPUTS:
        raise ConfigError(f"--out must end in .mp4 (annotated clip) or .png (contact sheet), got {out.name!r}")
    check_output(out, "--out")  # before any decoding or model work
    question = question_text(config.question, "--question")
    build_recipe(config.method, retain=config.retain, max_tokens=config.max_tokens)  # a bad name fails before decoding
    if not Path(config.video).is_file():
        raise InputError(f"video file not found: {config.video}")
    fps = config.fps
    frames = decode_frames(config.video, fps=fps, max_frames=config.max_frames)
    if not frames:
        raise InputError(f"no frames decoded from {config.video}")
    adapter = load_model(config.model, config.placement, frames=config.max_frames)
    recipe = adapter.recipe(config.method, retain=config.retain, max_tokens=config.max_tokens)
    clip = np.stack([f.image for f in frames])
    highlight = select_tokens(adapter, clip, recipe, fps, PruneContext(seed=config.seed), question)
    images, maps = render(frames, highlight, adapter.frames_per_unit)
    n_in, n_kept = len(highlight.tokens), len(highlight.indices)
    head = f"{recipe.name} {budget_text(recipe)}"
    per_frame = maps.kept.reshape(len(frames), -1).sum(1)
    labels = [f"#{i} {f.timestamp:.2f}s kept {int(k)}/{maps.kept[i].size}"
              for i, (f, k) in enumerate(zip(frames, per_frame))]
    if out.suffix.lower() == ".png":
        import matplotlib.image

        title = f"{head}: {n_kept}/{n_in} tokens kept ({highlight.stage}, {adapter.family})"
        with output_file(out, "--out") as tmp:
            matplotlib.image.imsave(tmp, contact_sheet(images, labels, title))
    else:
        from streamprune.videofile import write_video

        width = images[0].shape[1]
        captioned = (np.concatenate([text_strip(f"{head} | {label}", width, CAPTION_PX), image])
                     for label, image in zip(labels, images))
        with output_file(out, "--out") as tmp:
            write_video(tmp, captioned, fps=fps)
    log.info("%s: %d/%d tokens kept (%s) over %d frames -> %s", head, n_kept, n_in, highlight.stage,
             len(frames), out)
    return 0
