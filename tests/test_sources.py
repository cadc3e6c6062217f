"""Frame sources on real inputs: encoded files (PyAV), an HTTP server, generated streams."""

from __future__ import annotations

import http.server
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from streamprune.errors import ConfigError, InputError
from streamprune.sources import Backoff, FrameSource, SyntheticConfig, SyntheticSource, open_source
from streamprune.sources.av_source import AVSource, url_source
from streamprune.types import Frame
from streamprune.videofile import read_marker


def _iter_with_watchdog(source: FrameSource, timeout: float) -> Iterator[Frame]:
    """Iterate `source`; a watchdog closes it after `timeout` s so a hung source fails the test."""
    watchdog = threading.Timer(timeout, source.close)
    watchdog.start()
    try:
        yield from source
    finally:
        watchdog.cancel()
        source.close()


def _take(source: FrameSource, n: int, timeout: float = 20.0) -> list[Frame]:
    """The first n frames (fewer if the source ends)."""
    frames = []
    for frame in _iter_with_watchdog(source, timeout):
        frames.append(frame)
        if len(frames) == n:
            break
    return frames


def _rising(frames: list[Frame]) -> bool:
    ts = [f.timestamp for f in frames]
    return all(b > a for a, b in zip(ts, ts[1:])) and [f.index for f in frames] == list(range(len(frames)))


# ---------------------------------------------------------------- files


def test_file_source_yields_every_frame_in_order_with_rising_timestamps(h264_video: Path) -> None:
    src = open_source(f"file:{h264_video}", realtime=False)
    frames = list(src)
    assert [read_marker(f.image) for f in frames] == list(range(48))
    assert frames[0].image.shape == (48, 64, 3) and frames[0].image.dtype == np.uint8
    assert _rising(frames)
    np.testing.assert_allclose([f.timestamp for f in frames], np.arange(48) / 24, atol=1e-6)
    assert src.stats.frames_read == 48 and src.stats.malformed == 0


def test_file_source_plays_at_the_files_frame_rate(make_video) -> None:
    path = make_video(frames=12, fps=24.0)  # 0.5 s of video
    start = time.monotonic()
    frames = list(open_source(str(path)))  # a bare path is a file source; realtime by default
    wall = time.monotonic() - start
    assert len(frames) == 12
    assert wall >= 0.8 * 12 / 24


def test_file_source_loops_with_timestamps_that_keep_rising(make_video) -> None:
    path = make_video(frames=10, fps=20.0)
    frames = _take(open_source(f"file:{path}", loop=True, realtime=False), 35)
    assert [read_marker(f.image) for f in frames] == [i % 10 for i in range(35)]
    assert _rising(frames)
    gaps = np.diff([f.timestamp for f in frames])
    np.testing.assert_allclose(gaps, 1 / 20, atol=1e-6)  # the loop seam is one frame interval too


def test_looping_file_that_disappears_is_retried_with_backoff_until_it_is_back(make_video, tmp_path: Path) -> None:
    path = make_video(frames=6, fps=30.0)
    hidden = tmp_path / "hidden.mp4"
    src = AVSource(str(path), live=False, loop=True, realtime=False, backoff=Backoff(initial=0.02, factor=2, cap=0.1))

    def restore_after_retries() -> None:
        deadline = time.monotonic() + 10
        while src.stats.reconnects < 3 and time.monotonic() < deadline:
            time.sleep(0.005)  # polling interval
        shutil.move(hidden, path)

    frames, restorer = [], threading.Thread(target=restore_after_retries)
    for frame in _iter_with_watchdog(src, 20):
        frames.append(frame)
        if len(frames) == 6:  # first pass done: take the file away before the loop re-opens it
            shutil.move(path, hidden)
            restorer.start()
        if len(frames) == 12:
            break
    restorer.join()
    assert [read_marker(f.image) for f in frames] == list(range(6)) * 2
    assert src.stats.reconnects >= 3 and _rising(frames)


# ---------------------------------------------------------------- spec errors


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("file:/nonexistent/clip.mp4", "no such video file"),
        ("/nonexistent/clip.mp4", "no such video file"),
        ("ftp://example.com/a.mp4", "unknown source"),
        ("webcam:0", "unknown source"),
        ("camera:99", "no camera at /dev/video99"),
        ("camera:front", "device number"),
        ("zmq://127.0.0.1", "zmq://HOST:PORT"),
        ("zmq://127.0.0.1:notaport", "zmq://HOST:PORT"),
        ("rtsp:///stream", "has no host"),
        ("synthetic:width=abc", "needs a number"),
        ("synthetic:colour=red", "not one of"),
        ("synthetic:width=2", "out of range"),
    ],
)
def test_open_source_rejects_bad_specs_with_one_line_input_error(spec: str, message: str) -> None:
    with pytest.raises(InputError, match=message) as err:
        open_source(spec)
    assert "\n" not in str(err.value)


def test_open_source_rejects_a_file_that_is_not_a_video(tmp_path: Path) -> None:
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all\n" * 100)
    with pytest.raises(InputError, match="cannot read"):
        open_source(f"file:{text}")


def test_open_source_rejects_loop_on_live_sources() -> None:
    with pytest.raises(ConfigError, match="--loop"):
        open_source("zmq://127.0.0.1:5555", loop=True)


def test_open_source_builds_each_kind_without_connecting() -> None:
    assert isinstance(open_source("rtsp://127.0.0.1:1/cam"), AVSource)  # nothing listens: no error yet
    assert type(open_source("zmq://localhost:5555")).__name__ == "ZmqSource"
    assert isinstance(open_source("synthetic:"), SyntheticSource)


# ---------------------------------------------------------------- reconnects


def test_backoff_doubles_from_initial_caps_and_resets() -> None:
    b = Backoff(initial=0.1, factor=2.0, cap=1.0)
    assert [b.next_delay() for _ in range(7)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])
    b.reset()
    assert b.next_delay() == pytest.approx(0.1)


class _FlakyServer(http.server.ThreadingHTTPServer):
    """Serves one file over HTTP, answering 503 to the first `failures` requests."""

    def __init__(self, path: Path, failures: int) -> None:
        self.path, self.failures, self.requests = path, failures, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(time.monotonic())
                if len(server.requests) <= server.failures:
                    self.send_error(503)
                    return
                body = server.path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "video/mp2t")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


def test_url_source_retries_with_backoff_then_streams_and_reconnects_at_the_end(make_video) -> None:
    clip = make_video(frames=8, fps=25.0, name="live.ts")  # MPEG-TS: streamable, no seeking
    server = _FlakyServer(clip, failures=3)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        backoff = Backoff(initial=0.05, factor=2.0, cap=0.15)
        src = url_source(f"http://127.0.0.1:{server.server_port}/live.ts", realtime=False, timeout=5.0, backoff=backoff)
        frames = _take(src, 8 + 4)  # one full pass, then the stream "ends" and is re-opened
    finally:
        server.shutdown()
        server.server_close()
    assert [read_marker(f.image) for f in frames] == list(range(8)) + list(range(4))
    assert _rising(frames)
    assert src.stats.reconnects == 4  # 3 refusals + 1 after the end of the first pass
    gaps = np.diff(server.requests[:4])
    assert all(g >= 0.9 * d for g, d in zip(gaps, [0.05, 0.1, 0.15]))  # 0.05, 0.1, then capped


# ---------------------------------------------------------------- synthetic


def test_synthetic_source_is_deterministic() -> None:
    a = _take(open_source("synthetic:width=64,height=48,seed=3,noise=4", realtime=False), 20)
    b = _take(open_source("synthetic:width=64,height=48,seed=3,noise=4", realtime=False), 20)
    c = _take(open_source("synthetic:width=64,height=48,seed=4,noise=4", realtime=False), 20)
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    assert not np.array_equal(a[0].image, c[0].image)


def test_synthetic_scene_changes_every_k_frames() -> None:
    frames = _take(open_source("synthetic:width=96,height=64,scene_every=10,frames=30", realtime=False), 100)
    assert len(frames) == 30 and _rising(frames)
    diffs = [np.abs(x.image.astype(int) - y.image.astype(int)).mean() for x, y in zip(frames, frames[1:])]
    cuts = {9, 19}  # diffs[i] compares frames i and i+1
    assert min(diffs[i] for i in cuts) > 3 * max(d for i, d in enumerate(diffs) if i not in cuts)


def test_synthetic_shapes_move_within_a_scene() -> None:
    frames = _take(open_source("synthetic:width=96,height=64", realtime=False), 5)
    assert not np.array_equal(frames[0].image, frames[4].image)


def test_synthetic_loop_repeats_content_with_rising_timestamps() -> None:
    frames = _take(open_source("synthetic:width=32,height=24,frames=5,fps=10", loop=True, realtime=False), 12)
    assert all(np.array_equal(frames[i].image, frames[i % 5].image) for i in range(12))
    np.testing.assert_allclose([f.timestamp for f in frames], np.arange(12) / 10)


def test_synthetic_source_paces_to_fps_in_realtime_and_runs_ahead_otherwise() -> None:
    start = time.monotonic()
    assert len(list(open_source("synthetic:width=32,height=24,frames=10,fps=40"))) == 10
    assert time.monotonic() - start >= 0.8 * 9 / 40
    src = SyntheticSource(SyntheticConfig(width=320, height=240, frames=120, scene_every=30), realtime=False)
    start = time.monotonic()
    assert len(list(src)) == 120
    assert 120 / (time.monotonic() - start) > 60  # well above a camera's 30 fps, even on 2 busy cores


def test_closing_a_source_from_another_thread_ends_its_iteration() -> None:
    src = open_source("synthetic:width=16,height=16,fps=0.5")  # next frame due in 2 s
    it = iter(src)
    next(it)
    threading.Timer(0.05, src.close).start()
    start = time.monotonic()
    assert next(it, None) is None
    assert time.monotonic() - start < 1.0
