"""Whatever arrives on the network, the zmq frame decoder and the policy server's request decoder
never raise: every message is either a valid frame / request or counted as dropped (malformed).
Random bytes, random msgpack headers, and valid messages with one field broken."""

from __future__ import annotations

from types import SimpleNamespace

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamprune.sources.zmq_source import ZmqSource
from streamprune.transport import wire
from streamprune.transport.policy_server import PolicyServer

IMAGE = (8, 8, 3)
FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
shapes = st.lists(st.integers(-2, 12), max_size=4) | plain
headers = st.fixed_dictionaries(
    {"v": st.sampled_from([1, 2, "1"]) | plain, "kind": st.sampled_from(sorted(wire.KINDS)) | plain,
     "shape": shapes, "dtype": st.sampled_from(["uint8", "float32", "object", "<U4"]) | plain,
     "ts": st.floats() | plain, "seq": st.integers(-5, 2**64 - 1) | plain},
    optional={"instruction": st.text(max_size=30) | plain, "episode": st.integers(-3, 2**64 - 1) | plain})


def _valid(kind: str, shape: tuple[int, ...], **fields) -> st.SearchStrategy[list[bytes]]:
    return st.builds(lambda data, seq, ts: wire.encode(np.frombuffer(data, np.uint8).reshape(shape), kind=kind,
                                                       seq=seq, ts=ts, **fields),
                     st.binary(min_size=int(np.prod(shape)), max_size=int(np.prod(shape))),
                     st.integers(0, 2**40), st.floats(0, 1e6))


def _broken(message: list[bytes], how: str, where: int) -> list[bytes]:
    """One way of damaging a valid [header, buffer] message."""
    header, body = message
    if how == "truncate":
        return [header, body[: where % max(1, len(body))]]
    if how == "flip":
        position = where % len(header)
        return [header[:position] + bytes([header[position] ^ 0xFF]) + header[position + 1:], body]
    if how == "parts":
        return [header, body, b"x"][: where % 4]
    return [msgpack.packb({**msgpack.unpackb(header), "seq": -where}), body]


def messages(kind: str, **fields) -> st.SearchStrategy[list[bytes]]:
    valid = st.one_of(*(_valid(kind, shape, **fields) for shape in ((4, 5, 3), IMAGE, (2, 2, 1))))
    return st.one_of(
        st.lists(st.binary(max_size=64), max_size=4),
        st.tuples(headers.map(lambda h: msgpack.packb(h, use_bin_type=True)), st.binary(max_size=300)).map(list),
        valid,
        st.builds(_broken, valid, st.sampled_from(["truncate", "flip", "parts", "seq"]), st.integers(0, 10**6)),
    )


@pytest.fixture(scope="module")
def source():
    return ZmqSource("tcp://127.0.0.1:9")  # never connected: only its decoder is used


@FUZZ
@given(parts=messages("frame"))
def test_zmq_frame_decoder_accepts_only_frames_and_counts_the_rest(source, parts):
    before = source.stats.malformed
    frame = source.accept(parts)
    if frame is None:
        assert source.stats.malformed == before + 1
    else:
        header, image = frame
        assert source.stats.malformed == before
        assert header["kind"] == "frame" and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert image.size > 0 and isinstance(header["seq"], int) and np.isfinite(header["ts"])


class _Policy:
    """Stands in for a VLA: any valid observation gets a zero action."""

    def reset(self, recipe, ctx) -> None:
        pass

    def act(self, image, instruction, recipe, ctx):
        assert image.shape == IMAGE and image.dtype == np.uint8 and instruction.strip()
        return SimpleNamespace(action=np.zeros(2, np.float32), latency_ms=1.0, visual_tokens_kept=1,
                               visual_tokens_in=1)


@pytest.fixture(scope="module")
def server():
    server = PolicyServer(_Policy(), None, "inproc://wire-fuzz", IMAGE)
    yield server
    server.socket.close(linger=0)


@FUZZ
@given(parts=messages("obs", instruction="reach the red cube", episode=3) | messages("obs"),
       identity=st.binary(min_size=1, max_size=8))
def test_policy_server_answers_every_request_and_counts_the_malformed(server, parts, identity):
    before = (server.stats.answered, server.stats.malformed, server.stats.errors)
    reply = server.handle(identity, parts)
    header, payload = wire.decode(reply)  # every reply is itself a valid message
    answered, malformed, errors = server.stats.answered, server.stats.malformed, server.stats.errors
    if header["kind"] == "action":
        assert (answered, malformed, errors) == (before[0] + 1, before[1], before[2])
        assert payload.shape == (1, 2)
    else:
        assert header["kind"] == "error" and isinstance(header["error"], str)
        assert (answered, malformed, errors) == (before[0], before[1] + 1, before[2] + 1)
