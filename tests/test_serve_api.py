"""`streamprune serve` through the `openai` client against a real server on 127.0.0.1: video_url and
frames-list requests (answers equal to `ask`), SSE, per-request pruning, usage, OpenAI-style errors,
the API key, and 32 requests at once."""

from __future__ import annotations

import asyncio
import base64
import functools
import http.server
import io
import json
import shutil
import threading
import urllib.request

import pytest

from streamprune.cli import main
from streamprune.config.serve import ServeConfig
from streamprune.decode import decode_frames
from streamprune.serve.app import create_server

openai = pytest.importorskip("openai")
QUESTION = "what colour is the object that appeared last ?"
KEY = "sk-test"


@pytest.fixture(scope="module")
def media(tmp_path_factory, h264_video):
    root = tmp_path_factory.mktemp("media")
    shutil.copy(h264_video, root / "clip.mp4")
    (root / "not_a_video.mp4").write_bytes(b"\x00not a video" * 100)
    return root


@pytest.fixture(scope="module")
def server(media):
    running = create_server(ServeConfig(port=0, api_key=KEY, allowed_local_media_path=str(media),
                                        max_new_tokens=8)).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def video_part(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


def ask_json(video, *flags) -> dict:
    import contextlib

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["ask", str(video), "-q", QUESTION, "--json", "--max-new-tokens", "8", *flags]) == 0
    return json.loads(out.getvalue())


def chat(client, parts, **extra):
    return client.chat.completions.create(model="default", messages=[
        {"role": "user", "content": [*parts, {"type": "text", "text": QUESTION}]}], extra_body=extra or None)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["default"]
    with urllib.request.urlopen(f"{server.url}/health") as response:  # /health needs no key
        assert json.load(response)["status"] == "ok"


def test_video_url_answer_equals_ask(client, media):
    expected = ask_json(media / "clip.mp4", "--method", "stc", "--retain", "0.5")
    reply = chat(client, [video_part(f"file://{media / 'clip.mp4'}")], method="stc", retain=0.5)
    assert reply.choices[0].message.content == expected["answer"]
    assert reply.usage.visual_tokens_in == expected["visual_tokens_in"]
    assert reply.usage.visual_tokens_kept == expected["visual_tokens_kept"] < expected["visual_tokens_in"]
    assert reply.usage.completion_tokens >= 1
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.usage.prompt_tokens > reply.usage.visual_tokens_kept  # the question's text tokens too


def test_frames_list_answer_equals_ask_on_the_same_frames(client, media):
    """PNG frames are lossless: the server sees exactly the frames `ask` decoded."""
    from PIL import Image

    frames = decode_frames(media / "clip.mp4", fps=1.0, max_frames=16)
    parts = []
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray(frame.image).save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        parts.append({"type": "image_url", "image_url": {"url": url}})
    for method, retain in (("none", None), ("divprune", 0.25)):
        flags = ["--method", method] + (["--retain", str(retain)] if retain else [])
        expected = ask_json(media / "clip.mp4", *flags)
        reply = chat(client, parts, method=method, **({"retain": retain} if retain else {}))
        assert reply.choices[0].message.content == expected["answer"]
        assert reply.usage.visual_tokens_kept == expected["visual_tokens_kept"]
        assert reply.model_extra["streamprune"]["frames"] == len(frames) == expected["frames"]


def test_http_video_url_is_fetched(client, media):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(media))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        by_http = chat(client, [video_part(f"{base}/clip.mp4")])
        by_file = chat(client, [video_part(f"file://{media / 'clip.mp4'}")])
        assert by_http.choices[0].message.content == by_file.choices[0].message.content
        with pytest.raises(openai.BadRequestError, match="HTTP 404"):
            chat(client, [video_part(f"{base}/missing.mp4")])
        from PIL import Image

        frames = decode_frames(media / "clip.mp4", fps=4.0, max_frames=4)
        for i, frame in enumerate(frames):
            Image.fromarray(frame.image).save(media / f"frame{i}.png")
        parts = [{"type": "image_url", "image_url": {"url": f"{base}/frame{i}.png"}} for i in range(len(frames))]
        by_urls = chat(client, parts)
        assert by_urls.model_extra["streamprune"]["frames"] == len(frames) == 4 and by_urls.choices[0].message.content
    finally:
        httpd.shutdown()


def test_per_request_method_overrides_the_server_default(client, media):
    part = video_part(f"file://{media / 'clip.mp4'}")
    plain = chat(client, [part])
    pruned = chat(client, [part], method="fastv", retain=0.25)
    assert plain.model_extra["streamprune"]["method"] == "none"
    assert plain.usage.visual_tokens_kept == plain.usage.visual_tokens_in
    assert pruned.model_extra["streamprune"]["method"] == "fastv"
    assert pruned.usage.visual_tokens_kept == round(0.25 * pruned.usage.visual_tokens_in)


def test_sse_stream_carries_the_same_answer_and_usage(client, media):
    part = video_part(f"file://{media / 'clip.mp4'}")
    whole = chat(client, [part], method="stc", retain=0.5)
    events = list(client.chat.completions.create(
        model="default", stream=True, stream_options={"include_usage": True},
        extra_body={"method": "stc", "retain": 0.5},
        messages=[{"role": "user", "content": [part, {"type": "text", "text": QUESTION}]}]))
    text = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    assert text == whole.choices[0].message.content
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] in ("stop", "length")
    assert events[-1].usage.visual_tokens_kept == whole.usage.visual_tokens_kept
    assert events[-1].usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.parametrize("parts, extra, message", [
    ([video_part("file:///etc/passwd")], {}, "not under the allowed media directory"),
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}], {}, "not an image"),
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}], {}, "not valid base64"),
    ([video_part("ftp://example.org/x.mp4")], {}, "unsupported URL scheme"),
    ([], {}, "needs a video_url part"),
    (None, {"retain": 2.0}, "'retain'"),
    (None, {"method": "no_such_method"}, "no_such_method"),
    (None, {"num_frames": 0}, "'num_frames'"),
])
def test_bad_requests_are_openai_400s(client, media, parts, extra, message):
    parts = [video_part(f"file://{media / 'clip.mp4'}")] if parts is None else parts
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, parts, **extra)
    error = caught.value.body
    assert caught.value.status_code == 400 and message in error["message"]
    assert error["type"] == "invalid_request_error"


def test_undecodable_video_is_a_400(client, media):
    with pytest.raises(openai.BadRequestError, match="video_url"):
        chat(client, [video_part(f"file://{media / 'not_a_video.mp4'}")])


def test_wrong_or_missing_key_is_401(server):
    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key or "x", max_retries=0,
                            default_headers={} if key else {"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as caught:
            bad.models.list()
        assert caught.value.body["code"] == "invalid_api_key"


def test_32_concurrent_requests_all_complete(server, media):
    """32 requests at once (the server handles 8 at a time, the rest queue): none fails, none is
    lost, each gets the answer a lone request gets."""
    part = video_part(f"file://{media / 'clip.mp4'}")
    lone = chat(openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0), [part])

    async def burst():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)
        messages = [{"role": "user", "content": [part, {"type": "text", "text": QUESTION}]}]
        return await asyncio.gather(*(client.chat.completions.create(model="default", messages=messages)
                                      for _ in range(32)))

    replies = asyncio.run(burst())
    assert len({r.id for r in replies}) == 32
    assert {r.choices[0].message.content for r in replies} == {lone.choices[0].message.content}


def test_bench_serve_reports_both_runs(tmp_path, capsys):
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--requests", "4", "--concurrency", "4", "--json", str(out),
                 "--plot", str(tmp_path / "serve.png")]) == 0
    result = json.loads(out.read_text())
    assert [r["concurrency"] for r in result["runs"]] == [1, 4]
    assert all(r["errors"] == 0 and r["completed"] == 4 and len(r["latency_ms"]) == 4 for r in result["runs"])
    assert result["throughput_ratio"] > 0 and (tmp_path / "serve.png").stat().st_size > 0
    assert "throughput ratio" in capsys.readouterr().out


def test_slow_and_vanished_clients_hold_no_one_up(server, client, media):
    """A client that sends half a request and stalls, and one that leaves mid-stream: the others are
    answered meanwhile, and the model is free again once the vanished client's decode stopped."""
    import socket
    import time
    from urllib.parse import urlsplit

    address = urlsplit(server.url)
    part = video_part(f"file://{media / 'clip.mp4'}")
    stalled = socket.create_connection((address.hostname, address.port))
    stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 5000\r\n\r\n{\"mess")
    body = json.dumps({"stream": True, "messages": [{"role": "user", "content": [part, {"type": "text",
                                                                                          "text": QUESTION}]}]})
    leaving = socket.create_connection((address.hostname, address.port))
    leaving.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
    assert leaving.recv(64).startswith(b"HTTP/1.1 200")
    leaving.close()
    try:
        for _ in range(3):
            assert chat(client, [part]).choices[0].message.content
        deadline = time.monotonic() + 30
        while server.sessions.engine.lock.locked():
            assert time.monotonic() < deadline, "the model stayed busy after its client left"
            time.sleep(0.05)
    finally:
        stalled.close()


def test_unknown_and_sampling_fields_are_ignored(client, media):
    part = video_part(f"file://{media / 'clip.mp4'}")
    plain = chat(client, [part])
    other = chat(client, [part], temperature=0.7, top_p=0.9, user="me", frobnicate={"x": 1})
    assert other.choices[0].message.content == plain.choices[0].message.content
