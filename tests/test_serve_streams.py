"""Live stream sessions over HTTP (`POST/GET/DELETE /v1/streams`, chat with `stream_id`) on a real
server on 127.0.0.1: answers come from the recent stream, a deleted session's memory is freed."""

from __future__ import annotations

import gc
import json
import time
import urllib.error
import urllib.request
import weakref

import numpy as np
import pytest

from streamprune.config.serve import ServeConfig
from streamprune.data.synthetic_qa import clip_seed, data_version
from streamprune.models.default import TRAINED_DIR, trained_data_version
from streamprune.serve.app import create_server
from streamprune.videofile import write_video

openai = pytest.importorskip("openai")
QUESTION = "what colour is the object that appeared last ?"
DATA = data_version(trained_data_version(TRAINED_DIR))  # the synthetic QA the default model was trained on
CLIP_TOKENS = DATA.NUM_FRAMES * (DATA.SIZE // 8 // 2) ** 2  # one clip's visual tokens (patch 8, 2x2 pooling)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return tmp_path_factory.mktemp("streams")


@pytest.fixture(scope="module")
def server(media):
    running = create_server(ServeConfig(port=0, allowed_local_media_path=str(media), max_streams=2,
                                        max_new_tokens=2)).start()
    yield running
    running.stop()


def call(server, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def stream_time(server, stream_id: str) -> float:
    return call(server, "GET", f"/v1/streams/{stream_id}")[1]["stats"]["stream_time"]


def ask(server, stream_id: str):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)
    return client.chat.completions.create(model="default", extra_body={"stream_id": stream_id},
                                          messages=[{"role": "user", "content": QUESTION}])


def test_two_questions_seconds_apart_are_answered_about_the_recent_stream(server):
    status, stream = call(server, "POST", "/v1/streams", {"source": "synthetic:scene_every=20", "method": "stc",
                                                          "kv_budget": 256})
    assert status == 201 and stream["status"] == "running"
    sid = stream["id"]
    wait_until(lambda: stream_time(server, sid) >= 1.0)
    first = ask(server, sid)
    mark = first.model_extra["stream_time"]
    wait_until(lambda: stream_time(server, sid) >= mark + 3.0)
    now = stream_time(server, sid)
    second = ask(server, sid)
    assert first.choices[0].message.content and second.choices[0].message.content
    assert second.model_extra["stream_time"] >= now - 1.0  # about what the stream showed when asked
    assert second.model_extra["stream_time"] >= mark + 3.0
    assert second.usage.visual_tokens_in <= 256  # the memory's bound
    stats = call(server, "GET", f"/v1/streams/{sid}")[1]
    assert stats["stats"]["answers"] == 2 and stats["history"]
    assert call(server, "DELETE", f"/v1/streams/{sid}") == (200, {"id": sid, "object": "stream", "deleted": True})


def test_a_stream_is_answered_about_its_newest_scene(server, media):
    """Two held-out clips whose last objects differ in colour, played as one real-time H.264 file
    stream with a one-clip memory: once it ended, the answer names the second clip's colour."""
    def last(clip):  # the clip's own answer to QUESTION, None where it does not ask it
        return next((answer for kind, _, answer in clip.questions if kind == "last_colour"), None)

    clips = (DATA.generate_clip(clip_seed("test", i)) for i in range(50))
    first = next(c for c in clips if last(c))
    second = next(c for c in clips if last(c) not in (None, last(first)))
    path = write_video(media / "two_scenes.mp4", np.concatenate([first.frames, second.frames]), fps=8)
    _, stream = call(server, "POST", "/v1/streams", {"source": f"file:{path}", "fps": 8,
                                                     "kv_budget": CLIP_TOKENS})
    sid = stream["id"]
    wait_until(lambda: call(server, "GET", f"/v1/streams/{sid}")[1]["status"] == "ended")
    answer = ask(server, sid)
    assert answer.choices[0].message.content == last(second)
    assert answer.model_extra["memory_start"] >= len(first.frames) / 8 - 1e-6
    call(server, "DELETE", f"/v1/streams/{sid}")


def test_deleting_a_session_frees_its_memory(server):
    _, stream = call(server, "POST", "/v1/streams", {"source": "synthetic:"})
    sid = stream["id"]
    session = server.sessions.get(sid)
    memory = weakref.ref(session.stages.memory.memory)
    wait_until(lambda: stream_time(server, sid) > 0)
    del session
    assert call(server, "DELETE", f"/v1/streams/{sid}")[0] == 200
    gc.collect()
    assert memory() is None
    assert call(server, "GET", f"/v1/streams/{sid}")[0] == 404
    assert call(server, "GET", "/health")[1]["streams"] == 0


def test_bad_sessions_are_400_404_429(server, media):
    assert call(server, "POST", "/v1/streams", {})[0] == 400
    status, body = call(server, "POST", "/v1/streams", {"source": "file:/etc/passwd"})
    assert status == 400 and "not under the allowed media directory" in body["error"]["message"]
    assert call(server, "POST", "/v1/streams", {"source": "nosuch:x"})[0] == 400
    assert call(server, "POST", "/v1/streams", {"source": "synthetic:", "method": "vla_pruner"})[0] == 400
    assert call(server, "DELETE", "/v1/streams/stream-nope")[0] == 404
    with pytest.raises(openai.NotFoundError):
        ask(server, "stream-nope")
    ids = [call(server, "POST", "/v1/streams", {"source": "synthetic:"})[1]["id"] for _ in range(2)]
    status, body = call(server, "POST", "/v1/streams", {"source": "synthetic:"})
    assert status == 429 and body["error"]["code"] == "too_many_streams"
    for sid in ids:
        call(server, "DELETE", f"/v1/streams/{sid}")


def test_history_since_returns_only_newer_samples_and_a_bad_since_is_400(server):
    _, stream = call(server, "POST", "/v1/streams", {"source": "synthetic:", "loop": True})
    sid = stream["id"]
    wait_until(lambda: len(call(server, "GET", f"/v1/streams/{sid}")[1]["history"]) >= 2)
    history = call(server, "GET", f"/v1/streams/{sid}")[1]["history"]
    newer = call(server, "GET", f"/v1/streams/{sid}?since={history[0]['t']}")[1]["history"]
    assert newer and all(h["t"] > history[0]["t"] for h in newer)
    status, body = call(server, "GET", f"/v1/streams/{sid}?since=soon")
    assert status == 400 and body["error"]["param"] == "since"
    assert call(server, "POST", "/v1/streams", {"source": "synthetic:", "loop": "false"})[0] == 400
    call(server, "DELETE", f"/v1/streams/{sid}")


def test_sigterm_stops_the_server_and_its_streams_cleanly():
    import os
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "streamprune.cli", "serve", "--port", "0"],
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stderr.readline()
        assert line.startswith("serving http://127.0.0.1:"), line
        url = line.split()[1]
        request = urllib.request.Request(url + "/v1/streams", data=json.dumps({"source": "synthetic:"}).encode(),
                                         method="POST", headers={"Content-Type": "application/json"})
        assert urllib.request.urlopen(request, timeout=30).status == 201
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        proc.kill()
