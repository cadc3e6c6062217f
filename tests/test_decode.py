"""Decoding real H.264 / VP9 files: which frames come back, by which path, and how bad input fails."""

from __future__ import annotations

import logging
import re
import shutil
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from streamprune.bench.decode_bench import run_decode_bench
from streamprune.decode import decode_frames, iter_frames, probe, sample_frame_numbers
from streamprune.errors import ConfigError, InputError
from streamprune.videofile import pattern_frames, read_marker, write_video

CODECS = ["h264", "vp9"]


@pytest.fixture(params=CODECS)
def clip(request: pytest.FixtureRequest) -> Path:
    """The shared 48-frame, 24 fps, GOP-12 marker clip, once per codec."""
    return request.getfixturevalue(f"{request.param}_video")


def markers(frames) -> list[int]:
    return [read_marker(f.image) for f in frames]


def decode_stats(caplog: pytest.LogCaptureFixture) -> tuple[int, int]:
    """(frames decoded, seeks) of the last decode_frames call, from its debug summary line."""
    line = [r.getMessage() for r in caplog.records if r.name == "streamprune.decode" and "seeks" in r.getMessage()][-1]
    decoded, seeks = re.search(r"decoded (\d+), (\d+) seeks", line).groups()
    return int(decoded), int(seeks)


# --- probing and what is decoded ------------------------------------------------------------------


def test_probe_reports_duration_fps_frames_size_and_codec(clip: Path) -> None:
    info = probe(clip)
    assert info.fps == 24.0
    assert info.frames == 48
    assert info.duration == pytest.approx(2.0, abs=0.05)
    assert (info.width, info.height) == (64, 48)
    assert info.codec == ("h264" if clip.suffix == ".mp4" else "vp9")


def test_decode_without_sampling_returns_every_frame_once_in_order(clip: Path) -> None:
    frames = decode_frames(clip)
    assert markers(frames) == list(range(48))
    assert [f.index for f in frames] == list(range(48))
    assert [f.timestamp for f in frames] == pytest.approx([i / 24 for i in range(48)], abs=1e-3)
    assert all(f.image.shape == (48, 64, 3) and f.image.dtype == np.uint8 for f in frames)


def test_decoded_pixels_are_rgb_not_bgr(tmp_path: Path) -> None:
    red = np.zeros((4, 32, 32, 3), np.uint8)
    red[..., 0] = 220
    image = decode_frames(write_video(tmp_path / "red.mp4", red, 8))[0].image
    assert image[..., 0].mean() > 180 and image[..., 2].mean() < 60


@pytest.mark.parametrize("fps, expected", [(2.0, [0, 12, 24, 36]), (1.0, [0, 24]), (5.0, [0, 4, 9, 14, 19, 24, 28, 33, 38, 43])])
def test_fps_sampling_decodes_the_frame_on_screen_at_each_sample_time(clip: Path, fps: float, expected: list[int]) -> None:
    frames = decode_frames(clip, fps=fps)
    assert len(frames) == len(expected) == int(np.ceil(2.0 * fps))
    assert markers(frames) == expected
    assert [f.timestamp for f in frames] == pytest.approx([k / 24 for k in expected], abs=1e-3)


def test_fps_above_the_source_rate_gives_every_frame_once(h264_video: Path) -> None:
    assert markers(decode_frames(h264_video, fps=60)) == list(range(48))


def test_max_frames_keeps_evenly_spaced_frames_including_first_and_last(clip: Path) -> None:
    frames = decode_frames(clip, max_frames=5)
    got = markers(frames)
    assert got == [0, 12, 24, 35, 47]
    assert max(np.diff(got)) - min(np.diff(got)) <= 1
    assert markers(decode_frames(clip, max_frames=100)) == list(range(48))  # cap above the count: all


def test_max_frames_applies_after_fps_sampling(clip: Path) -> None:
    # fps=6 -> frames 0, 4, ..., 44 (12 samples); 4 of them evenly spaced: samples 0, 4, 7, 11
    assert markers(decode_frames(clip, fps=6, max_frames=4)) == [0, 16, 28, 44]


def test_sample_frame_numbers_depend_only_on_length_rates_and_cap() -> None:
    assert sample_frame_numbers(100, 30.0, fps=1.0) == [0, 30, 60, 90]
    assert sample_frame_numbers(100, 30.0, fps=None, max_frames=3) == [0, 50, 99]
    assert sample_frame_numbers(10, 10.0, fps=3.0) == [0, 3, 6]
    assert sample_frame_numbers(5, 25.0, fps=1.0) == [0]


def test_a_frame_missing_from_the_grid_is_served_by_the_frame_on_screen(tmp_path: Path) -> None:
    path = tmp_path / "gap.webm"  # 24 fps grid, frame 3 never written (a dropped frame)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx-vp9", rate=24, options={"deadline": "realtime", "cpu-used": "8"})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i, image in enumerate(pattern_frames(48)):
            if i != 3:
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts, frame.time_base = i, Fraction(1, 24)
                container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    assert markers(decode_frames(path))[:5] == [0, 1, 2, 4, 5]
    for strategy in ("sequential", "seek"):
        assert markers(decode_frames(path, fps=8, strategy=strategy))[:4] == [0, 2, 6, 9]


def test_iter_frames_yields_what_decode_frames_returns_and_checks_arguments_eagerly(h264_video: Path) -> None:
    assert [f.index for f in iter_frames(h264_video, fps=3)] == [f.index for f in decode_frames(h264_video, fps=3)]
    with pytest.raises(InputError, match="fps must be > 0"):
        iter_frames(h264_video, fps=0)


# --- seek path vs sequential path ---------------------------------------------------------------


@pytest.mark.parametrize("sampling", [dict(fps=2), dict(fps=24 / 11), dict(max_frames=5), dict(fps=3, max_frames=4)])
def test_seek_and_sequential_paths_decode_identical_frames(clip: Path, sampling: dict) -> None:
    seq = decode_frames(clip, strategy="sequential", **sampling)
    seek = decode_frames(clip, strategy="seek", **sampling)
    auto = decode_frames(clip, **sampling)
    assert [f.index for f in seq] == [f.index for f in seek] == [f.index for f in auto] == markers(seek)
    for a, b, c in zip(seq, seek, auto):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.image, c.image)
        assert a.timestamp == b.timestamp == c.timestamp


@pytest.mark.parametrize("codec", CODECS)
def test_auto_strategy_seeks_for_sparse_samples_and_decodes_fewer_frames(make_video, codec: str, caplog) -> None:
    # 10 s at 24 fps, a keyframe every second; one sample every 2 s sits on a keyframe
    path = make_video(frames=240, fps=24, gop=24, codec=codec)
    caplog.set_level(logging.DEBUG, logger="streamprune.decode")
    sparse = decode_frames(path, fps=0.5)
    decoded_sparse, seeks_sparse = decode_stats(caplog)
    assert markers(sparse) == [0, 48, 96, 144, 192]
    assert seeks_sparse >= 3
    assert decoded_sparse < 60  # sequential decoding would go through 193 frames

    dense = decode_frames(path, fps=8)
    decoded_dense, seeks_dense = decode_stats(caplog)
    assert markers(dense) == [3 * i for i in range(80)]
    assert seeks_dense == 0 and decoded_dense >= 238


def test_auto_strategy_seeks_to_a_late_segment_instead_of_decoding_from_the_start(make_video, caplog) -> None:
    path = make_video(frames=240, fps=24, gop=24, codec="h264")
    caplog.set_level(logging.DEBUG, logger="streamprune.decode")
    frames = decode_frames(path, start=8.0, end=9.0)
    decoded, seeks = decode_stats(caplog)
    assert markers(frames) == list(range(192, 216))
    assert seeks == 1 and decoded < 48


def test_mpeg_ts_seeks_that_land_past_the_target_step_back_to_the_wanted_frames(make_video) -> None:
    path = make_video(name="clip.ts")  # MPEG-TS has no index: its seeks land on a later keyframe
    for sampling in (dict(fps=2), dict(fps=24 / 11), dict(start=1.2)):
        seek = decode_frames(path, strategy="seek", **sampling)
        assert markers(seek) == [f.index for f in seek] == [f.index for f in decode_frames(path, strategy="sequential", **sampling)]
    assert markers(decode_frames(path, fps=2, strategy="seek")) == [0, 12, 24, 36]


def test_raw_h264_stream_is_counted_and_read_straight_through(make_video) -> None:
    path = make_video(name="clip.h264")  # no container: no duration, no index, no seeking
    info = probe(path)
    assert (info.frames, info.fps, info.duration) == (48, 24.0, 2.0)
    assert markers(decode_frames(path, fps=2, strategy="seek")) == [0, 12, 24, 36]
    assert markers(decode_frames(path, start=1.5)) == list(range(36, 48))


# --- segments ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", [dict(), dict(fps=5), dict(fps=5, max_frames=7), dict(max_frames=9)])
def test_segments_concatenate_to_the_whole_clips_frames(clip: Path, sampling: dict) -> None:
    whole = decode_frames(clip, **sampling)
    bounds = [None, 0.55, 1.0, 1.37, None]
    parts = [decode_frames(clip, start=a, end=b, **sampling) for a, b in zip(bounds[:-1], bounds[1:])]
    joined = [f for part in parts for f in part]
    assert [f.index for f in joined] == [f.index for f in whole]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(joined, whole))
    assert all(0.55 <= f.timestamp < 1.0 for f in parts[1])


def test_segment_beyond_the_end_is_empty(h264_video: Path) -> None:
    assert decode_frames(h264_video, start=5.0) == []


# --- errors --------------------------------------------------------------------------------------


def test_missing_file_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such video file"):
        decode_frames(tmp_path / "nope.mp4")
    with pytest.raises(InputError, match="no such video file"):
        probe(tmp_path / "nope.mp4")


def test_directory_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a file"):
        decode_frames(tmp_path)


def test_text_file_renamed_mp4_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video\n" * 50)
    with pytest.raises(InputError, match="not a readable video"):
        decode_frames(path)


def test_random_bytes_are_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "noise.webm"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    with pytest.raises(InputError, match="not a readable video"):
        probe(path)


def test_audio_only_file_has_no_video_stream(tmp_path: Path) -> None:
    path = tmp_path / "tone.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(InputError, match="no video stream"):
        decode_frames(path)


def _cut_in_half(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def test_half_an_mp4_cannot_be_opened(h264_video: Path, tmp_path: Path) -> None:
    cut = _cut_in_half(h264_video, tmp_path / "cut.mp4")  # the index (moov) is at the end: gone
    with pytest.raises(InputError, match="truncated"):
        decode_frames(cut)


@pytest.mark.parametrize("strategy", ["auto", "seek", "sequential"])
@pytest.mark.parametrize("sampling", [dict(), dict(fps=2), dict(max_frames=3)])
def test_half_a_webm_is_reported_truncated(vp9_video: Path, tmp_path: Path, strategy: str, sampling: dict) -> None:
    cut = _cut_in_half(vp9_video, tmp_path / "cut.webm")  # opens, and decodes until the bytes run out
    with pytest.raises(InputError, match=r"truncated or corrupt video: .*frames stop at"):
        decode_frames(cut, strategy=strategy, **sampling)


def test_half_a_faststart_mp4_is_reported_truncated(make_video, tmp_path: Path) -> None:
    whole = make_video(faststart=True)  # index first, so the cut file opens and runs out mid-stream
    cut = _cut_in_half(whole, tmp_path / "cut_faststart.mp4")
    with pytest.raises(InputError, match="truncated or corrupt video"):
        decode_frames(cut)


def test_truncated_file_still_serves_frames_before_the_cut(vp9_video: Path, tmp_path: Path) -> None:
    cut = _cut_in_half(vp9_video, tmp_path / "cut.webm")
    assert markers(decode_frames(cut, end=0.5)) == list(range(12))


@pytest.mark.parametrize("kwargs, message", [
    (dict(fps=0), "fps must be > 0"),
    (dict(fps=-2.0), "fps must be > 0"),
    (dict(max_frames=0), "max_frames must be >= 1"),
    (dict(start=-1.0), "start must be >= 0"),
    (dict(start=1.0, end=1.0), "must be after start"),
    (dict(strategy="fast"), "unknown decode strategy"),
])
def test_bad_sampling_arguments_are_input_errors(h264_video: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        decode_frames(h264_video, **kwargs)


# --- writing -------------------------------------------------------------------------------------


def test_write_video_pads_odd_sizes_to_even(tmp_path: Path) -> None:
    path = write_video(tmp_path / "odd.mp4", np.full((3, 47, 63, 3), 90, np.uint8), fps=10)
    info = probe(path)
    assert (info.width, info.height, info.frames) == (64, 48, 3)


def test_write_video_adds_the_codecs_suffix_and_writes_mpeg4(tmp_path: Path) -> None:
    assert write_video(tmp_path / "a", pattern_frames(3), 24, "vp9").suffix == ".webm"
    path = write_video(tmp_path / "b", pattern_frames(6), 24, "mpeg4")
    assert probe(path).codec == "mpeg4"
    assert markers(decode_frames(path)) == list(range(6))


def test_write_video_rejects_bad_frames_and_codecs(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="uint8"):
        write_video(tmp_path / "f.mp4", np.zeros((2, 8, 8, 3), np.float32), 10)
    with pytest.raises(InputError, match="no frames"):
        write_video(tmp_path / "e.mp4", [], 10)
    with pytest.raises(ConfigError, match="unknown codec"):
        write_video(tmp_path / "c.mp4", pattern_frames(2), 10, codec="prores")


# --- benchmark -----------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg CLI not installed (apt-get install -y ffmpeg)")
def test_decode_bench_compares_the_same_frames_with_ffmpeg(h264_video: Path) -> None:
    result = run_decode_bench(h264_video, repeats=1)
    assert result["dense"]["ours_auto"]["frames_out"] == result["dense"]["ffmpeg"]["frames_out"] == 48
    assert result["sparse_1fps"]["ours_auto"]["frames_out"] == result["sparse_1fps"]["ffmpeg"]["frames_out"] == 2
    assert result["dense"]["ratio_wall"] > 0 and result["dense"]["ratio_cpu"] > 0


def test_decode_bench_says_when_ffmpeg_is_missing(h264_video: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no ffmpeg on it
    result = run_decode_bench(h264_video, repeats=1)
    assert result["ffmpeg"].startswith("not installed")
    assert "ffmpeg" not in result["dense"] and result["dense"]["ours_auto"]["frames_out"] == 48
