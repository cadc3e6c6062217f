"""Shared fixtures: small, real encoded videos (PyAV + libx264 / libvpx-vp9).

Every frame of these clips carries its own index as 8x8 black/white blocks in the top rows
(`streamprune.videofile.pattern_frames`); `streamprune.videofile.read_marker(rgb)` reads it back,
so a test can check WHICH frame a decoder returned.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest



def _make(
    directory: Path,
    frames: int = 48,
    width: int = 64,
    height: int = 48,
    fps: float = 24.0,
    codec: str = "h264",
    gop: int | None = 12,
    name: str | None = None,
    **write_kwargs,
) -> Path:
    from streamprune.videofile import pattern_frames, write_video  # PyAV only where a clip is made

    name = name or f"clip_{codec}_{frames}f_{width}x{height}_{fps:g}fps_g{gop}"
    return write_video(directory / name, pattern_frames(frames, width, height), fps, codec, gop=gop, **write_kwargs)


@pytest.fixture
def make_video(tmp_path: Path) -> Callable[..., Path]:
    """Factory: `make_video(frames=48, width=64, height=48, fps=24, codec="h264", gop=12, name=None,
    **write_video_kwargs)` writes a marker clip under this test's tmp_path and returns its path
    (keyframe every `gop` frames)."""

    def make(**kwargs) -> Path:
        return _make(tmp_path, **kwargs)

    return make


@pytest.fixture(scope="session")
def h264_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 frames, 64x48, 24 fps H.264 in MP4, keyframes at 0/12/24/36. Shared: copy before modifying."""
    return _make(tmp_path_factory.mktemp("videos"), codec="h264")


@pytest.fixture(scope="session")
def vp9_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 frames, 64x48, 24 fps VP9 in WebM, keyframes at 0/12/24/36. Shared: copy before modifying."""
    return _make(tmp_path_factory.mktemp("videos"), codec="vp9")


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random LLaVA-OneVision and Qwen2.5-VL checkpoints (save_pretrained layout), by family."""
    from tests.tiny import FAMILIES, build_tiny_dir

    root = tmp_path_factory.mktemp("models")
    return {family: build_tiny_dir(root, family) for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model_dirs: dict[str, Path]) -> dict:
    """Adapters loaded from `tiny_model_dirs` with `load_adapter`, by family."""
    from streamprune.models import load_adapter

    return {family: load_adapter(path) for family, path in tiny_model_dirs.items()}


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tests use tiny models: a second torch thread gains nothing and spins against other work."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
