"""The wire format (encode/decode) and frames over real zmq sockets on 127.0.0.1."""

from __future__ import annotations

import pickle
import queue
import threading
import time
import tracemalloc
from collections.abc import Callable

import msgpack
import numpy as np
import pytest
import zmq

from streamprune.errors import ConfigError
from streamprune.sources import SyntheticConfig, SyntheticSource, ZmqSource, open_source
from streamprune.transport import Publisher, WireError, decode, encode, run_publisher
from streamprune.types import Frame
from streamprune.videofile import read_marker

RNG = np.random.default_rng(0)


def _header(**over) -> bytes:
    h = {"v": 1, "kind": "frame", "shape": [4, 4, 3], "dtype": "uint8", "ts": 0.0, "seq": 0}
    h.update(over)
    return msgpack.packb(h, use_bin_type=True)


# ---------------------------------------------------------------- encode / decode


@pytest.mark.parametrize(
    "array",
    [
        RNG.integers(0, 256, (48, 64, 3), dtype=np.uint8),
        RNG.standard_normal((2, 7), dtype=np.float32),
        np.arange(5, dtype=">i4"),  # big-endian input comes back as the same values
        np.asfortranarray(RNG.standard_normal((3, 5))),
        np.array(True),
        np.zeros((0, 3), np.float16),
    ],
)
def test_encode_decode_round_trip_keeps_values_shape_and_fields(array: np.ndarray) -> None:
    parts = encode(array, kind="obs", ts=1.5, seq=7, instruction="pick up the cup", extra={"k": [1, 2]})
    header, out = decode(parts)
    assert out.shape == array.shape and out.dtype.name == array.dtype.name
    np.testing.assert_array_equal(out, array)
    assert header["kind"] == "obs" and header["ts"] == 1.5 and header["seq"] == 7
    assert header["instruction"] == "pick up the cup" and header["extra"] == {"k": [1, 2]}


def test_encode_without_array_sends_empty_error_message() -> None:
    header, out = decode(encode(None, kind="error", error="policy crashed"))
    assert header["error"] == "policy crashed" and out.size == 0


def test_decoded_array_is_a_read_only_view() -> None:
    header, out = decode(encode(np.ones((2, 2), np.float32)))
    with pytest.raises(ValueError):
        out[0, 0] = 3


@pytest.mark.parametrize("n_parts", [0, 1, 3])
def test_decode_rejects_wrong_part_count(n_parts: int) -> None:
    parts = (encode(np.zeros(3, np.uint8)) + [b"x"])[:n_parts] if n_parts else []
    with pytest.raises(WireError, match="2 message parts"):
        decode(parts)


@pytest.mark.parametrize(
    "head",
    [
        b"\xc1\xff garbage",  # 0xc1 is never valid msgpack
        msgpack.packb([1, 2, 3]),  # not a map
        msgpack.packb({1: "int key"}),  # strict_map_key: only str keys
        msgpack.packb(msgpack.ExtType(5, b"payload")),  # ext types are refused
        msgpack.packb({"v": 1, "kind": "frame"}),  # reserved keys missing
        _header(v=2),
        _header(kind="shell"),
        _header(seq="0"),
        _header(ts=float("nan")),
        _header(shape=[4, -4, 3]),
        _header(shape="4,4,3"),
        _header(shape=[1] * 9),
        _header(dtype=["uint8"]),
        b"\x00" * 70_000,  # header above the size limit
    ],
)
def test_decode_rejects_malformed_headers(head: bytes) -> None:
    with pytest.raises(WireError):
        decode([head, bytes(48)])


@pytest.mark.parametrize("dtype", ["object", "O", "<U4", "V8", "datetime64[s]", "complex64"])
def test_decode_rejects_dtypes_outside_the_allow_list(dtype: str) -> None:
    with pytest.raises(WireError, match="not allowed"):
        decode([_header(dtype=dtype, shape=[1]), bytes(8)])


def test_decode_respects_a_narrower_allow_list_and_refuses_to_widen_it() -> None:
    parts = encode(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(WireError, match="not allowed"):
        decode(parts, allowed_dtypes={"uint8"})
    with pytest.raises(ValueError):
        decode(parts, allowed_dtypes={"uint8", "object"})


def test_decode_never_unpickles_the_buffer() -> None:
    hit = []

    class Bomb:
        def __reduce__(self):
            return (hit.append, ("unpickled",))

    payload = pickle.dumps(Bomb())
    for dtype in ("object", "O"):
        with pytest.raises(WireError):
            decode([_header(dtype=dtype, shape=[1]), payload])
    assert hit == []


def test_decode_rejects_10gb_claim_before_allocating() -> None:
    head = _header(shape=[100_000, 100_000], dtype="uint8")  # 10 GB
    tracemalloc.start()
    try:
        with pytest.raises(WireError, match="claims 10000000000 bytes"):
            decode([head, bytes(16)])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def test_decode_rejects_buffer_that_disagrees_with_shape() -> None:
    with pytest.raises(WireError, match="needs 48"):
        decode([_header(), bytes(47)])
    with pytest.raises(WireError, match="needs 48"):
        decode([_header(), bytes(49)])


def test_decode_enforces_max_bytes() -> None:
    parts = encode(np.zeros(1000, np.float32))
    decode(parts, max_bytes=4000)
    with pytest.raises(WireError, match="above the 3999-byte limit"):
        decode(parts, max_bytes=3999)


def test_encode_refuses_object_arrays_reserved_fields_and_unknown_kinds() -> None:
    with pytest.raises(ValueError):
        encode(np.array([{}], dtype=object))
    with pytest.raises(ValueError):
        encode(np.zeros(2), shape=[3])
    with pytest.raises(ValueError):
        encode(np.zeros(2), kind="command")


# ---------------------------------------------------------------- zmq sockets


class Collector:
    """Iterates a source on a thread; the test waits on what arrives, with timeouts."""

    def __init__(self, source) -> None:
        self.source = source
        self.frames: queue.Queue[Frame] = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for frame in self.source:
                self.frames.put(frame)
        except BaseException as e:  # surfaced by the test through `error`
            self.error = e

    def until(self, pred: Callable[[Frame], bool], timeout: float = 10.0) -> list[Frame]:
        """Every frame received until (and including) the first one matching `pred`."""
        got, deadline = [], time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0 and self.error is None, f"no matching frame in {timeout}s (error: {self.error})"
            try:
                frame = self.frames.get(timeout=min(remaining, 0.2))
            except queue.Empty:
                continue
            got.append(frame)
            if pred(frame):
                return got

    def close(self) -> None:
        self.source.close()
        self.thread.join(timeout=5)
        assert not self.thread.is_alive()
        assert self.error is None, self.error


def _wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)  # polling interval, not a wait for the event itself


def _image(value: int, h: int = 24, w: int = 32) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


def _is(value: int) -> Callable[[Frame], bool]:
    return lambda f: int(f.image[0, 0, 0]) == value


def _sync(send: Callable[[], None], col: Collector, pred: Callable[[Frame], bool]) -> None:
    """Send until the subscriber has one (zmq drops PUB messages sent before it subscribed)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        send()
        try:
            if pred(col.frames.get(timeout=0.05)):
                return
        except queue.Empty:
            pass
    raise AssertionError("subscriber never received a frame")


@pytest.fixture
def pub_socket():
    sock = zmq.Context.instance().socket(zmq.PUB)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    yield sock, port
    sock.close()


def test_publisher_to_zmq_source_round_trip_keeps_pixels_and_timestamps() -> None:
    with Publisher("tcp://127.0.0.1:*") as pub:
        col = Collector(ZmqSource(pub.endpoint, latest_only=False))
        try:
            _sync(lambda: pub.send(Frame(_image(0), 0.0, 0)), col, _is(0))
            for i in range(1, 11):
                frame = Frame(RNG.integers(1, 256, (24, 32, 3), dtype=np.uint8), timestamp=i / 10, index=i)
                pub.send(frame)
                got = col.until(lambda f: True)  # lockstep: PUB's HWM of 2 drops bursts by design
                np.testing.assert_array_equal(got[-1].image, frame.image)
                assert got[-1].timestamp == pytest.approx(frame.timestamp)
                assert got[-1].image.flags.writeable
        finally:
            col.close()
    assert col.source.stats.frames_read >= 11 and col.source.stats.dropped == 0
    assert col.source.stats.malformed == 0


def test_zmq_source_drops_and_counts_malformed_messages_and_keeps_going(pub_socket) -> None:
    sock, port = pub_socket
    src = ZmqSource(f"tcp://127.0.0.1:{port}", max_bytes=10_000, latest_only=False)
    col = Collector(src)
    try:
        _sync(lambda: sock.send_multipart(encode(_image(0))), col, _is(0))
        bad = [
            [b"\xc1 not msgpack at all", b"\x00" * 10],  # garbage bytes
            [b"only one part"],
            encode(_image(1)) + [b"third part"],
            encode(np.full((24, 32, 3), 1.0, np.float32)),  # wrong dtype for a frame
            [_header(shape=[100_000, 100_000, 1]), b"\x00" * 16],  # claims 10 GB
            encode(np.zeros((24, 32), np.uint8)),  # not RGB
            encode(_image(1), kind="action"),  # not a frame
            encode(_image(1, 100, 100)),  # 30 KB: above this subscriber's 10 KB limit
        ]
        for parts in bad:
            sock.send_multipart(parts)
        sock.send_multipart(encode(_image(77), seq=1))
        got = col.until(_is(77))
        assert [int(f.image[0, 0, 0]) for f in got] == [77]
        sock.send_multipart(encode(_image(78), seq=2))
        col.until(_is(78))
        assert src.stats.malformed == len(bad)
        assert col.thread.is_alive()
    finally:
        col.close()


def test_zmq_source_survives_a_message_far_above_the_limit(pub_socket) -> None:
    """Parts beyond twice the limit make zmq drop the connection unread; it reconnects by itself."""
    sock, port = pub_socket
    src = ZmqSource(f"tcp://127.0.0.1:{port}", max_bytes=10_000, latest_only=False)
    col = Collector(src)
    try:
        _sync(lambda: sock.send_multipart(encode(_image(0))), col, _is(0))
        sock.send_multipart(encode(_image(1, 200, 200)))  # 120 KB
        _sync(lambda: sock.send_multipart(encode(_image(5))), col, _is(5))
        _wait_for(lambda: src.stats.reconnects >= 1)  # the monitor's event may trail the data
    finally:
        col.close()


def test_zmq_source_latest_only_skips_stale_frames_and_counts_them(pub_socket) -> None:
    sock, port = pub_socket
    src = ZmqSource(f"tcp://127.0.0.1:{port}", latest_only=True)
    it = iter(src)
    timer = threading.Timer(10, src.close)  # a hung test ends instead of blocking forever
    timer.start()
    try:
        seq = 0
        stop_sync = threading.Event()

        def sync_sender() -> None:
            nonlocal seq
            while not stop_sync.is_set():
                sock.send_multipart(encode(_image(0), seq=seq))
                seq += 1
                stop_sync.wait(0.02)

        sender = threading.Thread(target=sync_sender)
        sender.start()
        next(it)
        stop_sync.set()
        sender.join()
        burst_start = seq + 100
        n = 30
        for i in range(n):
            sock.send_multipart(encode(_image(1 + i), seq=burst_start + i))
        got = []
        while not got or int(got[-1].image[0, 0, 0]) != n:
            frame = next(it)
            if int(frame.image[0, 0, 0]) > 0:
                got.append(frame)
        values = [int(f.image[0, 0, 0]) for f in got]
        assert values == sorted(set(values)) and values[-1] == n
        assert len(values) < n  # stale frames were skipped ...
        assert src.stats.dropped >= n - len(values)  # ... and counted (plus the gap of 100 seqs)
    finally:
        timer.cancel()
        src.close()
        it.close()


def test_subscriber_keeps_working_when_the_publisher_restarts() -> None:
    ready: queue.Queue[str] = queue.Queue()

    def publish(cfg: SyntheticConfig, bind: str, stop: threading.Event) -> threading.Thread:
        t = threading.Thread(target=run_publisher, args=(SyntheticSource(cfg), bind, stop), kwargs={"on_ready": ready.put})
        t.start()
        return t

    stop1 = threading.Event()
    t1 = publish(SyntheticConfig(width=32, height=24, fps=200), "tcp://127.0.0.1:*", stop1)
    endpoint = ready.get(timeout=10)
    src = ZmqSource(endpoint)
    col = Collector(src)
    try:
        before = col.until(lambda f: f.image.shape[1] == 32)
        stop1.set()
        t1.join(timeout=5)
        assert not t1.is_alive()
        stop2 = threading.Event()
        t2 = publish(SyntheticConfig(width=40, height=24, fps=200, seed=1), endpoint, stop2)
        assert ready.get(timeout=10) == endpoint
        after = col.until(lambda f: f.image.shape[1] == 40)
        stop2.set()
        t2.join(timeout=5)
        ts = [f.timestamp for f in before + after]
        assert all(b > a for a, b in zip(ts, ts[1:]))  # timestamps keep rising across the restart
        _wait_for(lambda: src.stats.reconnects >= 1)
    finally:
        col.close()


def test_run_publisher_streams_a_file_that_a_subscriber_receives_in_order(make_video) -> None:
    path = make_video(frames=30, fps=60.0)
    ready, stop = queue.Queue(), threading.Event()
    t = threading.Thread(
        target=run_publisher, args=(open_source(f"file:{path}", loop=True), "tcp://127.0.0.1:*", stop),
        kwargs={"on_ready": ready.put},
    )
    t.start()
    col = Collector(ZmqSource(ready.get(timeout=10)))
    try:
        count = iter(range(1, 1000))
        got = col.until(lambda f: next(count) == 20)
    finally:
        stop.set()
        t.join(timeout=5)
        col.close()
    markers = [read_marker(f.image) for f in got]
    # a looping clip: markers only move forward (wrapping at 30), never repeat or go back
    steps = [(b - a) % 30 for a, b in zip(markers, markers[1:])]
    assert len(got) == 20 and all(step >= 1 for step in steps)
    assert [f.timestamp for f in got] == sorted({f.timestamp for f in got})
    assert got[0].image.shape == (48, 64, 3)


def test_publisher_refuses_non_loopback_bind_unless_allowed() -> None:
    for bind in ("tcp://0.0.0.0:*", "tcp://*:5555", "tcp://eth0:5555", "tcp://10.1.2.3:5555"):
        with pytest.raises(ConfigError, match="non-loopback"):
            Publisher(bind)
    with Publisher("tcp://0.0.0.0:*", allow_remote=True) as pub:
        assert pub.endpoint.startswith("tcp://0.0.0.0:")
    with Publisher("tcp://localhost:*") as pub:
        assert pub.endpoint.startswith("tcp://localhost:")


def test_run_publisher_returns_promptly_when_stopped_while_the_source_waits() -> None:
    stop, ready = threading.Event(), queue.Queue()
    slow = SyntheticSource(SyntheticConfig(width=16, height=16, fps=0.2))  # one frame per 5 s
    result: list = []
    t = threading.Thread(
        target=lambda: result.append(run_publisher(slow, "tcp://127.0.0.1:*", stop, on_ready=ready.put))
    )
    t.start()
    ready.get(timeout=10)
    start = time.monotonic()
    stop.set()
    t.join(timeout=3)
    assert not t.is_alive() and time.monotonic() - start < 1.0
    assert result[0].frames_sent <= 1  # frame 0 is due at once, frame 1 only after 5 s
