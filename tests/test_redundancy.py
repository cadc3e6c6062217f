"""The redundancy statistics of `bench redundancy` on clips built to have all or none of it."""

from __future__ import annotations

import numpy as np
import pytest

from streamprune.bench.redundancy import feature_static_share, pixel_static_share, synthetic_source, video_source


@pytest.fixture(scope="module")
def adapter(tiny_adapters):
    return tiny_adapters["llava_onevision"]


def test_a_frozen_clip_is_all_static_and_fresh_noise_is_not(adapter):
    rng = np.random.default_rng(0)
    frozen = np.repeat(rng.integers(0, 256, (1, 64, 64, 3), dtype=np.uint8), 6, axis=0)
    noise = rng.integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    assert feature_static_share(adapter, frozen, 0.95) == 1.0 and pixel_static_share(frozen, 3.0) == 1.0
    assert feature_static_share(adapter, noise, 0.95) < 0.2 and pixel_static_share(noise, 3.0) == 0.0


def test_a_moving_square_leaves_the_rest_of_the_frame_static():
    frames = np.zeros((5, 128, 128, 3), np.uint8)
    for t in range(5):
        frames[t, 32:48, 16 + 16 * t:32 + 16 * t] = 255  # exactly one 16 px cell, moving a cell a frame
    assert pixel_static_share(frames, 3.0) == pytest.approx(1 - 2 / 64)  # only the cell left and the one entered


def test_sources_read_synthetic_versions_and_real_encoded_video(h264_video):
    assert [c.shape for c in synthetic_source("4", 2).clips] == [(16, 128, 128, 3)] * 2
    assert synthetic_source("3", 1).clips[0].shape == (8, 64, 64, 3)
    windows = video_source(h264_video, fps=24.0, frames=16, windows=3).clips
    assert len(windows) == 3 and windows[0].shape == (16, 48, 64, 3)
    with pytest.raises(ValueError, match="fewer than"):
        video_source(h264_video, fps=1.0, frames=16, windows=1)
