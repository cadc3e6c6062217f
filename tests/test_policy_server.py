"""Policy server and robot client over real zmq sockets on 127.0.0.1."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import zmq

from envs import PICKCOLOR_ID, make_env
from robots.client import PolicyClient, run_episode
from streamprune.models.vla import VLAPolicy
from streamprune.pruning.recipe import build_recipe
from streamprune.transport import wire
from streamprune.transport.policy_server import PolicyServer

IMAGE = 32


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    from streamprune.models.tiny import save_tiny_vla

    return VLAPolicy.load(save_tiny_vla(tmp_path_factory.mktemp("vla") / "p", image_size=IMAGE))


def start_server(policy, bind="tcp://127.0.0.1:0"):
    server = PolicyServer(policy, build_recipe("vla_pruner", retain=0.5), bind, (IMAGE, IMAGE, 3))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


def wait_for(condition, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_two_episodes_through_server(policy):
    server, thread = start_server(policy)
    client = PolicyClient(server.endpoint, action_dim=2, deadline_s=10.0)
    env = make_env(PICKCOLOR_ID, image_size=IMAGE, max_steps=5)
    try:
        results = [run_episode(env, client, seed=s) for s in (0, 1)]
    finally:
        server.stop.set()
        thread.join(5)
        client.close()
    assert [r["steps"] for r in results] and all(1 <= r["steps"] <= 5 for r in results)
    assert all(r["held_steps"] == 0 for r in results)
    assert server.stats.answered == sum(r["steps"] for r in results)
    assert client.stats.timeouts == 0


def test_client_holds_when_server_stops_and_resumes_after_restart(policy):
    server, thread = start_server(policy)
    endpoint = server.endpoint
    client = PolicyClient(endpoint, action_dim=2, deadline_s=20.0)
    image = np.zeros((IMAGE, IMAGE, 3), np.uint8)
    try:
        action, held = client.act(image, "reach the red circle")
        assert not held
        server.stop.set()
        thread.join(5)
        client.deadline_s = 0.3
        action, held = client.act(image, "reach the red circle")
        assert held and np.array_equal(action, np.zeros(2, np.float32))
        assert client.stats.timeouts == 1
        server2, thread2 = start_server(policy, endpoint)
        client.deadline_s = 5.0
        try:
            assert wait_for(lambda: not client.act(image, "reach the red circle")[1])
        finally:
            server2.stop.set()
            thread2.join(5)
    finally:
        client.close()
    assert client.stats.answers >= 2


def test_server_answers_bad_observations_with_errors_and_keeps_serving(policy):
    server, thread = start_server(policy)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)

    def ask(parts):
        sock.send_multipart(parts)
        assert sock.poll(20000)
        return wire.decode(sock.recv_multipart())

    try:
        header, _ = ask(wire.encode(np.zeros((8, 8, 3), np.uint8), kind="obs", seq=1, instruction="reach"))
        assert header["kind"] == "error" and "shape" in header["error"] or "uint8" in header["error"]
        header, _ = ask(wire.encode(np.zeros((IMAGE, IMAGE, 3), np.float32), kind="obs", seq=2, instruction="x"))
        assert header["kind"] == "error"
        header, _ = ask([b"garbage", b"\x00\x01"])
        assert header["kind"] == "error"
        header, _ = ask(wire.encode(np.zeros((IMAGE, IMAGE, 3), np.uint8), kind="obs", seq=3))
        assert header["kind"] == "error" and "instruction" in header["error"]
        header, actions = ask(wire.encode(np.zeros((IMAGE, IMAGE, 3), np.uint8), kind="obs", seq=4,
                                          instruction="reach the red circle"))
        assert header["kind"] == "action" and header["seq"] == 4 and actions.shape == (1, 2)
    finally:
        server.stop.set()
        thread.join(5)
        sock.close(linger=0)
    assert server.stats.errors == 4 and server.stats.answered == 1
