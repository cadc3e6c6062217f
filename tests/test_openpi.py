"""openpi's websocket protocol: msgpack-numpy, the server in front of the embedded VLA, the
openpi-style client, chunk aggregation against a slow server, and serve-policy's flags. Real
sockets on 127.0.0.1, the real default policy."""

from __future__ import annotations

import pickle
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import msgpack
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect
from websockets.sync.server import serve

from envs import make_env
from robots.chunking import ActionQueue, ChunkingConfig
from robots.openpi_client import OpenPIClient, OpenPIError, openpi_observation, run_chunked_episode
from streamprune.cli import main
from streamprune.config import DEFAULT_ENV, DEFAULT_VLA_MODEL
from streamprune.pruning.base import PruneContext
from streamprune.pruning.recipe import build_recipe
from streamprune.runtime.robot import load_policy, policy_image_size
from streamprune.transport import msgpack_numpy
from streamprune.transport.msgpack_numpy import MsgpackNumpyError
from streamprune.transport.openpi_server import OpenPIServer

METHOD, RETAIN = "vla_pruner", 0.5


@pytest.fixture(scope="module")
def policy():
    return load_policy(DEFAULT_VLA_MODEL)  # what run_serve loads


def start(server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def server(policy):
    size = policy_image_size(policy)
    server = OpenPIServer(policy, build_recipe(METHOD, retain=RETAIN), "ws://127.0.0.1:0", (size, size, 3))
    thread = start(server)
    yield server
    server.shutdown()
    thread.join(10)


# --- msgpack-numpy ------------------------------------------------------------------------------

def test_msgpack_numpy_round_trips_nested_arrays_dtypes_and_shapes():
    arrays = {name: (np.arange(24) % 7).astype(name).reshape(2, 3, 4)
              for name in ("bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
                           "float16", "float32", "float64", ">f4", ">i8")}
    arrays["scalar0d"] = np.array(3.5, np.float32)
    arrays["empty"] = np.zeros((0, 5), np.uint8)
    arrays["strided"] = np.arange(12, dtype=np.int32).reshape(3, 4).T  # not C-contiguous
    arrays["text"] = np.array(["ab", "cde"])
    value = {"arrays": arrays, "nested": [{"deep": [arrays["uint8"], {"x": arrays["float32"]}]}],
             "i64": np.int64(-7), "f32": np.float32(1.25), "b": np.bool_(True), "plain": [1, 2.5, "s", b"raw", None]}
    back = msgpack_numpy.unpackb(msgpack_numpy.packb(value))
    for name, arr in arrays.items():
        got = back["arrays"][name]
        assert got.dtype == arr.dtype and got.shape == arr.shape and np.array_equal(got, arr), name
    assert np.array_equal(back["nested"][0]["deep"][1]["x"], arrays["float32"])
    for key, scalar in (("i64", np.int64(-7)), ("f32", np.float32(1.25)), ("b", np.bool_(True))):
        assert type(back[key]) is type(scalar) and back[key] == scalar
    assert back["plain"] == [1, 2.5, "s", b"raw", None]


@pytest.mark.parametrize("value", [np.array([object()], dtype=object), np.zeros(2, dtype=[("a", "<i4")]),
                                   np.zeros(2, np.complex64), np.complex128(1j), np.zeros(3, "V4")])
def test_msgpack_numpy_refuses_object_void_and_complex_dtypes(value):
    with pytest.raises(MsgpackNumpyError, match="refused"):
        msgpack_numpy.packb({"x": value})


@pytest.mark.parametrize("dtype", ["|O", "<c8", "|V4", "[('a', '<i4')]", "i4,O", "<f4 ", "O8"])
def test_msgpack_numpy_refuses_those_dtypes_when_unpacking_too(dtype):
    message = msgpack.packb({b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": dtype, b"shape": [1]})
    with pytest.raises(MsgpackNumpyError):
        msgpack_numpy.unpackb(message)


def test_msgpack_numpy_packs_in_openpis_exact_byte_layout():
    # openpi_client/msgpack_numpy.py pack_array: {b"__ndarray__": True, b"data": tobytes(),
    # b"dtype": dtype.str, b"shape": shape}, bytes keys packed as msgpack bin, dtype.str as str
    expected = (b"\x84"                                # map of 4
                b"\xc4\x0b__ndarray__" b"\xc3"         # bin8 key -> true
                b"\xc4\x04data" b"\xc4\x02\x01\x02"    # -> bin8 of the 2 bytes
                b"\xc4\x05dtype" b"\xa3|u1"            # -> str "|u1"
                b"\xc4\x05shape" b"\x91\x02")          # -> [2]
    assert msgpack_numpy.packb(np.array([1, 2], np.uint8)) == expected
    floats = np.array([[1.0], [-2.0]], np.float32)
    assert msgpack_numpy.packb(floats) == msgpack.packb(
        {b"__ndarray__": True, b"data": floats.tobytes(), b"dtype": "<f4", b"shape": [2, 1]}, use_bin_type=True)
    scalar = b"\x83\xc4\x0d__npgeneric__\xc3\xc4\x04data\x07\xc4\x05dtype\xa3<i8"
    assert msgpack_numpy.packb(np.int64(7)) == scalar
    back = msgpack_numpy.unpackb(expected)
    assert back.dtype == np.uint8 and back.tolist() == [1, 2] and not back.flags.writeable
    assert msgpack_numpy.unpackb(scalar) == np.int64(7)


class Trap:
    """Unpickling this would create the marker file: proof that nothing ever unpickles."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("payload", [b"", b"\xc1", b"\x92\x01", b"\x81\xa1a", b"\xd4\x05\x00", b"\xde\xff\xff",
                                     msgpack.packb({b"__ndarray__": True, b"data": b"abc", b"dtype": "<f4",
                                                    b"shape": [1]}),
                                     msgpack.packb({b"__ndarray__": True, b"data": b"", b"dtype": "<f4",
                                                    b"shape": [-1]}),
                                     "text, not bytes"])
def test_msgpack_numpy_unpack_refuses_malformed_messages(payload):
    with pytest.raises(MsgpackNumpyError):
        msgpack_numpy.unpackb(payload)


def test_a_pickle_payload_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        try:
            msgpack_numpy.unpackb(pickle.dumps({"observation/image": Trap(marker)}, protocol=protocol))
        except MsgpackNumpyError:
            pass
    assert not marker.exists()


# --- the server with the openpi-style client -----------------------------------------------------

def test_pickcolor_episode_through_the_openpi_server_matches_the_in_process_policy(server, policy):
    client = OpenPIClient(server.endpoint)
    size = policy_image_size(policy)
    meta = client.metadata
    assert (meta["action_dim"], meta["chunk_size"], meta["image_shape"]) == (2, 1, [size, size, 3])
    assert (meta["method"], meta["retain"]) == (METHOD, RETAIN)
    env = make_env(DEFAULT_ENV)
    obs, _ = env.reset(seed=3)
    seen, done, steps = [], False, 0
    try:
        while not done:
            reply = client.infer(openpi_observation(obs, episode=1))
            actions = reply["actions"]
            assert actions.shape == (1, 2) and actions.dtype == np.float32
            assert reply["server_timing"]["infer_ms"] > 0 and reply["policy_timing"]["infer_ms"] > 0
            assert ("prev_total_ms" in reply["server_timing"]) == (steps > 0)  # openpi: from the second on
            seen.append((obs["image"], obs["instruction"], actions[0]))
            obs, _, terminated, truncated, info = env.step(actions[0])
            done, steps = terminated or truncated, steps + 1
    finally:
        client.close()
    assert steps == len(seen) <= env.unwrapped.config.max_steps
    # the same observations through the policy in this process, fresh episode state: the same actions
    recipe, ctx = build_recipe(METHOD, retain=RETAIN), PruneContext()
    policy.reset(recipe, ctx)
    for image, instruction, action in seen:
        np.testing.assert_array_equal(policy.act(image, instruction, recipe, ctx).action, action)


def test_chunked_loop_plays_a_pickcolor_episode_against_the_real_server(server):
    client = OpenPIClient(server.endpoint)
    env = make_env(DEFAULT_ENV)
    try:
        result = run_chunked_episode(env, client, seed=3, episode=2, control_hz=40)
    finally:
        client.close()
    assert 1 <= result["steps"] <= env.unwrapped.config.max_steps and result["request_errors"] == 0
    assert result["chunks"] >= 1 and result["latency_ms_p50"] > 0


def good_obs(server):
    return msgpack_numpy.packb({"observation/image": np.zeros(server.image_shape, np.uint8),
                                "prompt": "reach the red circle"})


def test_malformed_requests_get_an_error_and_the_connection_still_answers(server, tmp_path):
    marker = tmp_path / "unpickled"
    bad = {b"garbage": b"\xc1\xff\x00garbage",
           b"pickle": pickle.dumps({"observation/image": Trap(marker)}),
           b"missing image": msgpack_numpy.packb({"prompt": "reach the red circle"}),
           b"missing prompt": msgpack_numpy.packb({"observation/image": np.zeros(server.image_shape, np.uint8)}),
           b"wrong shape": msgpack_numpy.packb({"image": np.zeros((5, 5, 3), np.uint8), "prompt": "x"}),
           b"not a map": msgpack_numpy.packb([1, 2, 3]),
           "a text frame": "{}"}
    before = server.stats.malformed
    with connect(server.endpoint, compression=None, max_size=None) as ws:
        assert msgpack_numpy.unpackb(ws.recv(timeout=10))["action_dim"] == 2
        for what, message in bad.items():
            ws.send(message)
            reply = ws.recv(timeout=10)
            assert isinstance(reply, str) and reply.startswith("bad request:"), (what, reply)
            ws.send(good_obs(server))
            answer = msgpack_numpy.unpackb(ws.recv(timeout=10))
            assert answer["actions"].shape == (1, 2), what
    assert server.stats.malformed == before + len(bad) and not marker.exists()
    with urllib.request.urlopen(server.endpoint.replace("ws://", "http://") + "/healthz", timeout=10) as response:
        assert response.status == 200 and response.read() == b"OK\n"


def test_a_chw_image_is_read_as_hwc_and_an_oversized_message_closes_only_its_connection(server):
    image = np.random.default_rng(0).integers(0, 256, server.image_shape, dtype=np.uint8)
    client = OpenPIClient(server.endpoint)
    try:  # a new episode number each: no pruning history, so the same image gives the same action
        hwc = client.infer({"observation/image": image, "prompt": "reach the red circle", "episode": 10})
        chw = client.infer({"observation/image": image.transpose(2, 0, 1), "prompt": "reach the red circle",
                            "episode": 11})
        np.testing.assert_array_equal(hwc["actions"], chw["actions"])
        with pytest.raises(OpenPIError, match="1009"):
            client.infer({"observation/image": np.zeros(17 * 2**20, np.uint8), "prompt": "too big"})
    finally:
        client.close()
    with connect(server.endpoint, compression=None) as ws:  # the server goes on
        ws.recv(timeout=10)
        ws.send(good_obs(server))
        assert msgpack_numpy.unpackb(ws.recv(timeout=10))["actions"].shape == (1, 2)


class Failing:
    """A policy whose every step raises, for openpi's error path."""

    def reset(self, recipe, ctx):
        pass

    def act(self, image, instruction, recipe, ctx):
        raise RuntimeError("the model broke")


def test_a_failing_policy_sends_the_traceback_closes_1011_and_the_server_goes_on():
    server = OpenPIServer(Failing(), None, "ws://127.0.0.1:0", (8, 8, 3), metadata={"action_dim": 2})
    thread = start(server)
    obs = {"observation/image": np.zeros((8, 8, 3), np.uint8), "prompt": "go"}
    try:
        for _ in range(2):  # a second connection after the first one failed
            client = OpenPIClient(server.endpoint)
            with pytest.raises(OpenPIError, match="RuntimeError: the model broke"):
                client.infer(obs)
            with pytest.raises(OpenPIError, match="1011"):
                client.infer(obs)
            client.close()
    finally:
        server.shutdown()
        thread.join(10)
    assert server.stats.errors == 2 and server.stats.malformed == 0


# --- chunk aggregation ---------------------------------------------------------------------------

def chunk(values):
    return np.array([[v, -v] for v in values], np.float64)


@pytest.mark.parametrize("rule", ["replace", "average", "weighted"])
def test_overlapping_chunks_merge_by_time_step_under_the_named_rule(rule):
    queue = ActionQueue(ChunkingConfig(chunk_size=4, aggregate=rule))
    a, b, c = [1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0], [100.0, 200.0, 300.0, 400.0]
    queue.merge(chunk(a), asked_at=0)                   # steps 0..3
    assert queue.pop()[0] == 1.0 and queue.pop()[0] == 2.0
    queue.merge(chunk(b), asked_at=1)                   # steps 1..4: 1 is past, 2 and 3 overlap a's
    queue.merge(chunk(c), asked_at=3)                   # steps 3..6: 3 overlaps a's and b's, 4 b's
    assert queue.stats.stale_actions == 1 and queue.stats.merged_actions == 4
    got = [queue.pop()[0] for _ in range(5)]            # steps 2..6
    step2, step3, step4 = {
        "replace": (20.0, 100.0, 200.0),
        "average": ((3 + 20) / 2, (4 + 30 + 100) / 3, (40 + 200) / 2),
        "weighted": (0.3 * 3 + 0.7 * 20, 0.3 * (0.3 * 4 + 0.7 * 30) + 0.7 * 100, 0.3 * 40 + 0.7 * 200),
    }[rule]
    np.testing.assert_allclose(got, [step2, step3, step4, 300.0, 400.0], rtol=1e-6)
    assert queue.pop() is None and queue.stats.starved_steps == 1


def test_chunking_config_refuses_bad_values():
    from streamprune.errors import ConfigError

    for bad in ({"chunk_size": 0}, {"chunk_size": 4, "threshold": 1.5}, {"chunk_size": 4, "aggregate": "mean"}):
        with pytest.raises(ConfigError):
            ChunkingConfig(**bad)


class SlowServer:
    """openpi's protocol by hand (websockets + msgpack-numpy only): metadata, then a chunk of
    `chunk_size` zero actions `delay_s` after each request."""

    def __init__(self, chunk_size, delay_s):
        self.chunk_size, self.delay_s = chunk_size, delay_s
        self.server = serve(self.handle, "127.0.0.1", 0, compression=None)
        self.endpoint = f"ws://127.0.0.1:{self.server.socket.getsockname()[1]}"
        self.thread = start(self.server)

    def handle(self, ws):
        ws.send(msgpack_numpy.packb({"action_dim": 2, "chunk_size": self.chunk_size}))
        try:
            for message in ws:
                msgpack_numpy.unpackb(message)
                time.sleep(self.delay_s)  # the model's latency
                ws.send(msgpack_numpy.packb({"actions": np.zeros((self.chunk_size, 2), np.float32)}))
        except ConnectionClosed:
            pass

    def close(self):
        self.server.shutdown()
        self.thread.join(10)


def chunked_run(chunk_size, delay_s, threshold, steps=40, hz=40.0):
    slow = SlowServer(chunk_size, delay_s)
    client = OpenPIClient(slow.endpoint)
    env = make_env(DEFAULT_ENV, max_steps=steps)  # zero actions never reach the target: a full episode
    try:
        return run_chunked_episode(env, client, ChunkingConfig(chunk_size=chunk_size, threshold=threshold), seed=0,
                                   control_hz=hz)
    finally:
        client.close()
        slow.close()


def test_queue_never_starves_when_the_threshold_covers_the_server_delay():
    # asks with 6 of 10 actions queued: 150 ms of actions at 40 Hz against a 40 ms reply
    result = chunked_run(chunk_size=10, delay_s=0.04, threshold=0.6)
    assert result["steps"] == 40 and result["starved_steps"] == 0 and result["queue_size_min"] >= 1
    assert result["chunks"] >= 40 // 10 and result["merged_actions"] > 0
    assert 40 <= result["latency_ms_p50"] <= result["latency_ms_p99"]


def test_starved_steps_are_counted_when_the_server_is_slower_than_the_queue():
    # 4 actions last 100 ms at 40 Hz; a reply takes 150 ms and is asked for with 2 left
    result = chunked_run(chunk_size=4, delay_s=0.15, threshold=0.5)
    assert result["steps"] == 40 and result["starved_steps"] > 0 and result["queue_size_min"] == 0
    assert result["starved_steps"] == result["queue_sizes"].count(0)  # a chunk never leaves a gap
    assert result["latency_ms_p50"] >= 150


# --- serve-policy --protocol openpi --------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("argv, message", [
    (["--protocol", "grpc"], "--protocol must be one of zmq, openpi"),
    (["--protocol", "openpi", "--bind", "tcp://127.0.0.1:5555"], "listens on ws://HOST:PORT"),
    (["--protocol", "openpi", "--bind", "ws://127.0.0.1:notaport"], "port in [0, 65535]"),
    (["--protocol", "openpi", "--bind", "ws://127.0.0.1:70000"], "port in [0, 65535]"),
    (["--protocol", "openpi", "--bind", "ws://0.0.0.0:8000"], "not a loopback address"),
    (["--bind", "ws://127.0.0.1:8000"], "add --protocol openpi"),
])
def test_serve_policy_bad_protocol_or_bind_is_one_line_exit_2(argv, message, capsys):
    try:
        code = main(["serve-policy", *argv])
    except SystemExit as exit_:  # argparse's own check of a flag value
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_serve_policy_port_in_use_is_one_line_exit_2(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code = main(["serve-policy", "--protocol", "openpi", "--bind", f"ws://127.0.0.1:{taken.getsockname()[1]}"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot bind" in err and err.count("\n") == 1, err


def test_serve_policy_protocol_openpi_answers_an_openpi_client():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "streamprune.cli", "serve-policy", "--protocol", "openpi",
                             "--bind", f"ws://127.0.0.1:{port}", "--method", METHOD, "--retain", str(RETAIN)],
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:  # the server says where it listens once it does
            lines.append(line)
            if line.startswith("serving"):
                break
        assert f"on ws://127.0.0.1:{port}" in lines[-1], lines
        client = OpenPIClient(f"ws://127.0.0.1:{port}")
        assert client.metadata["policy"] == DEFAULT_VLA_MODEL and client.metadata["method"] == METHOD
        env = make_env(DEFAULT_ENV)
        obs, _ = env.reset(seed=0)
        assert client.infer(openpi_observation(obs, episode=0))["actions"].shape == (1, 2)
        client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
