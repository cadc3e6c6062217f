"""Live QA with the trained default Video-LLM: after a scene change, a question is answered about
the new scene, not the old one (issue: answers refer to the recent stream)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streamprune.data.synthetic_qa import clip_seed, data_version
from streamprune.memory import MemoryConfig
from streamprune.models.default import TRAINED_DIR, trained_data_version
from streamprune.config import LiveConfig
from streamprune.runtime.live_runner import LiveRunner
from streamprune.runtime.live_stages import LocalStages
from streamprune.sources import open_source
from streamprune.videofile import write_video

QUESTION = "what colour is the object that appeared last ?"
DATA = data_version(trained_data_version(TRAINED_DIR))  # the synthetic QA the default model was trained on
FRAMES = DATA.NUM_FRAMES  # its clip length
TOKENS_PER_FRAME = (DATA.SIZE // 8 // 2) ** 2  # patch 8, 2x2 pooling

pytestmark = pytest.mark.skipif(not (TRAINED_DIR / "config.json").is_file(), reason="no trained default model")


def _last_colour(clip) -> str | None:
    """The clip's own answer to QUESTION (None where the clip does not ask it)."""
    return next((answer for kind, _, answer in clip.questions if kind == "last_colour"), None)


@pytest.fixture(scope="module")
def stages() -> LocalStages:
    memory = MemoryConfig(kv_budget=FRAMES * TOKENS_PER_FRAME, recent_frames=FRAMES)
    return LocalStages(LiveConfig(model=str(TRAINED_DIR), fps=None, memory=memory, batch_frames=FRAMES,
                                  drop_oldest=False, max_new_tokens=2))


def _play(stages: LocalStages, path: Path, max_frames: int | None = None):
    from streamprune.memory import StreamingMemory

    stages.memory.memory = StreamingMemory(stages.memory.memory.config, stages.memory.memory.dim)
    stages.memory.frames = 0
    config = LiveConfig(model=str(TRAINED_DIR), fps=None, memory=stages.memory.memory.config,
                        batch_frames=FRAMES, drop_oldest=False, max_frames=max_frames, max_new_tokens=2)
    runner = LiveRunner(open_source(f"file:{path}", realtime=False), stages, config).start()
    try:
        assert runner.wait_stream_end(timeout=60)
        return runner.ask(QUESTION)
    finally:
        runner.stop()


def _two_scenes():
    clips = (DATA.generate_clip(clip_seed("test", i)) for i in range(50))
    first = next(c for c in clips if _last_colour(c))
    return first, next(c for c in clips if _last_colour(c) not in (None, _last_colour(first)))


def test_a_question_after_a_scene_change_is_answered_about_the_new_scene(stages, tmp_path):
    """Two held-out clips whose last-appearing objects differ in colour, played back to back as one
    H.264 stream: asked after the first clip the model names the first clip's colour, asked at the
    end it names the second's; memory then holds only the new scene (budget = one clip)."""
    first, second = _two_scenes()
    path = write_video(tmp_path / "two_scenes.mp4", np.concatenate([first.frames, second.frames]), fps=8)
    before = _play(stages, path, max_frames=FRAMES)
    assert before.text.strip() == _last_colour(first)
    after = _play(stages, path)
    assert after.text.strip() == _last_colour(second)
    assert after.memory_start >= FRAMES / 8 - 1e-6  # nothing of the old scene was left to answer from
