"""The HTTP app of `streamprune serve` (FastAPI on uvicorn): OpenAI's /v1/chat/completions and
/v1/models, live sessions under /v1/streams, /health, and the page at /.

Requests wait in a FIFO queue (an asyncio semaphore of `--max-concurrency`); model work runs in
worker threads, so a slow or vanished client holds no one else up; a streaming client that goes
away stops its answer at the next token."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from streamprune.config.serve import ServeConfig
from streamprune.errors import ConfigError
from streamprune.serve.engine import ChatEngine, ClientGone, RequestAnswer
from streamprune.serve.media import request_frames
from streamprune.serve.protocol import ApiError, ChatRequest, chunk, completion, completion_id, parse_chat, usage
from streamprune.serve.streams import StreamSessions

log = logging.getLogger("streamprune.serve")
ASK_TIMEOUT_S = 60.0  # a stream question waits this long for frames to reach its memory
OPEN_ROUTES = ("/health",)


def _error(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


async def _json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"


def build_app(config: ServeConfig, engine: ChatEngine, sessions: StreamSessions) -> FastAPI:
    app = FastAPI(title="streamprune", docs_url=None, redoc_url=None)
    gate = asyncio.Semaphore(config.max_concurrency)
    max_bytes = int(config.max_media_mb * 1024 * 1024)
    allowed = sessions.allowed

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return _error(err)

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return _error(ApiError(400, f"{where or 'request'}: {first.get('msg', 'invalid')}", where))

    @app.exception_handler(Exception)
    async def server_error(_: Request, err: Exception) -> JSONResponse:
        log.exception("request failed")
        return _error(ApiError(500, f"internal error: {err}", kind="server_error", code="internal_error"))

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if config.api_key and request.url.path not in OPEN_ROUTES:
            scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
            given = given.strip() if scheme.lower() == "bearer" else ""
            given = given or request.query_params.get("api_key", "")  # the page's <img> cannot send headers
            if not hmac.compare_digest(given.encode(), config.api_key.encode()):
                return _error(ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                       code="invalid_api_key"))
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.model_id, "streams": len(sessions.list())}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model", "created": 0,
                                            "owned_by": "streamprune", "family": engine.adapter.family}]}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return resources.files("streamprune.serve").joinpath("page.html").read_text()

    # -- chat ------------------------------------------------------------------------------------
    def check_model(chat: ChatRequest) -> None:
        if chat.model not in (None, "", engine.model_id):
            raise ApiError(404, f"model {chat.model!r} is not served here; GET /v1/models lists "
                                f"{engine.model_id!r}", "model", code="model_not_found")

    def extra_of(answer: RequestAnswer) -> dict[str, Any]:
        return {"streamprune": {"method": answer.method, "retain": answer.retain,
                                "max_visual_tokens": answer.max_visual_tokens, "frames": answer.frames,
                                "timings_ms": answer.timings_ms}}

    def answer_now(chat: ChatRequest, frames, on_token=None) -> RequestAnswer:
        return engine.answer(frames, chat.question, fps=chat.fps or config.fps, method=chat.method,
                             retain=chat.retain, max_visual_tokens=chat.max_visual_tokens,
                             max_new_tokens=chat.max_new_tokens or config.max_new_tokens, seed=chat.seed,
                             on_token=on_token)

    async def from_stream(chat: ChatRequest) -> JSONResponse | StreamingResponse:
        session = sessions.get(chat.stream_id)
        async with gate:
            answer = await run_in_threadpool(session.ask, chat.question, ASK_TIMEOUT_S)
        tokenizer = engine.adapter.tokenizer
        prompt = len(tokenizer(chat.question, add_special_tokens=False).input_ids)
        kept = answer.tokens_after_inner if answer.tokens_after_inner is not None else answer.visual_tokens
        use = usage(prompt + kept, answer.answer_tokens, answer.memory_tokens, kept)
        extra = {"stream_id": session.id, "stream_time": answer.stream_time, "memory_start": answer.memory_start,
                 "streamprune": {"method": session.spec["method"], "latency_ms": round(answer.latency_ms, 3),
                                 "retain": answer.retain}}
        cid = completion_id()
        if not chat.stream:  # a stream answer comes whole: it is built under the memory's snapshot
            return JSONResponse(completion(cid, engine.model_id, answer.text, "stop", use, extra))

        async def events():
            yield _sse(chunk(cid, engine.model_id, {"role": "assistant", "content": answer.text}, extra=extra))
            yield _sse(chunk(cid, engine.model_id, {}, "stop"))
            if chat.include_usage:
                yield _sse(chunk(cid, engine.model_id, None, use=use))
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        chat = parse_chat(await _json_body(request))
        check_model(chat)
        if chat.stream_id is not None:
            return await from_stream(chat)
        async with gate:
            frames = await run_in_threadpool(request_frames, chat.media, chat.fps or config.fps,
                                             chat.num_frames or config.num_frames, max_bytes, allowed)
            engine.recipe(chat.method, chat.retain, chat.max_visual_tokens)  # a bad method is a 400 before SSE
            if not chat.stream:
                answer = await run_in_threadpool(answer_now, chat, frames)
                return JSONResponse(completion(completion_id(), engine.model_id, answer.text, answer.finish_reason,
                                               usage(answer.prompt_tokens, answer.completion_tokens,
                                                     answer.visual_tokens_in, answer.visual_tokens_kept),
                                               extra_of(answer)))
        return StreamingResponse(stream_answer(chat, frames), media_type="text/event-stream")

    async def stream_answer(chat: ChatRequest, frames):
        """SSE: each token's text as it is decoded, then the finish reason (and usage if asked)."""
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue = asyncio.Queue()
        gone = threading.Event()
        cid = completion_id()

        def on_token(token: int) -> None:
            if gone.is_set():
                raise ClientGone()
            loop.call_soon_threadsafe(tokens.put_nowait, token)

        async with gate:
            work = asyncio.ensure_future(run_in_threadpool(answer_now, chat, frames, on_token))
            work.add_done_callback(lambda done: done.cancelled() or done.exception())  # read, even if no one waits
            work.add_done_callback(lambda _: tokens.put_nowait(None))
            try:
                yield _sse(chunk(cid, engine.model_id, {"role": "assistant", "content": ""}))
                ids: list[int] = []
                sent = ""
                while (token := await tokens.get()) is not None:
                    ids.append(token)
                    text = engine.text_of(ids)
                    if text.startswith(sent) and len(text) > len(sent):  # hold back a partial character
                        yield _sse(chunk(cid, engine.model_id, {"content": text[len(sent):]}))
                        sent = text
                try:
                    answer = await work
                except ApiError as err:
                    yield _sse(err.body())
                    return
                if answer.text.startswith(sent) and len(answer.text) > len(sent):
                    yield _sse(chunk(cid, engine.model_id, {"content": answer.text[len(sent):]}))
                yield _sse(chunk(cid, engine.model_id, {}, answer.finish_reason, extra=extra_of(answer)))
                if chat.include_usage:
                    yield _sse(chunk(cid, engine.model_id, None, use=usage(
                        answer.prompt_tokens, answer.completion_tokens, answer.visual_tokens_in,
                        answer.visual_tokens_kept)))
                yield "data: [DONE]\n\n"
            finally:
                gone.set()  # a client that left stops the decode at its next token
                if not work.done():
                    try:
                        await work
                    except (ClientGone, ApiError):
                        pass

    # -- live sessions ---------------------------------------------------------------------------
    @app.post("/v1/streams")
    async def start_stream(request: Request) -> JSONResponse:
        body = await _json_body(request)
        session = await run_in_threadpool(sessions.start, body)
        return JSONResponse(session.describe(), status_code=201)

    @app.get("/v1/streams")
    async def list_streams() -> dict[str, Any]:
        return {"object": "list", "data": [s.describe() for s in sessions.list()]}

    @app.get("/v1/streams/{stream_id}")
    async def get_stream(stream_id: str, since: float | None = None) -> dict[str, Any]:
        return sessions.get(stream_id).describe(history=True, since=since)

    @app.get("/v1/streams/{stream_id}/overlay.png")
    async def overlay(stream_id: str) -> Response:
        drawn = await run_in_threadpool(sessions.get(stream_id).overlay_png)
        if drawn is None:
            raise ApiError(404, f"stream {stream_id} has no frame in memory yet", code="no_frame_yet")
        png, stream_time = drawn
        return Response(png, media_type="image/png",
                        headers={"X-Stream-Time": f"{stream_time:.3f}", "Cache-Control": "no-store"})

    @app.delete("/v1/streams/{stream_id}")
    async def delete_stream(stream_id: str) -> dict[str, Any]:
        await run_in_threadpool(sessions.delete, stream_id)
        return {"id": stream_id, "object": "stream", "deleted": True}

    return app


class Server:
    """The app on uvicorn in a background thread, on a socket bound before it starts (so port 0
    gives a known free port). `stop()` ends it and every stream."""

    def __init__(self, app: FastAPI, sessions: StreamSessions, bound: socket.socket) -> None:
        import uvicorn

        self.sessions, self.socket = sessions, bound
        self.host, self.port = bound.getsockname()[:2]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self._run, name="serve-http", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _run(self) -> None:
        self.server.run(sockets=[self.socket])

    def start(self, timeout: float = 30.0) -> Server:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.02)
        return self

    def wait(self) -> None:
        while self.thread.is_alive():  # short joins: Ctrl-C reaches this thread between them
            self.thread.join(0.5)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sessions.close_all()
        self.socket.close()


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (0: a free port); ConfigError in one line when it cannot be."""
    bound = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    bound.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        bound.bind((host, port))
    except OSError as err:
        bound.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return bound


def create_server(config: ServeConfig, adapter: Any = None) -> Server:
    """Bind, load the model (or take `adapter`) and build the app; `.start()` serves. The socket and
    the recipe are checked first, so a busy port or a bad method fails before a long model load."""
    from streamprune.config import LiveConfig, MemoryConfig
    from streamprune.models import load_model
    from streamprune.pruning.recipe import build_recipe

    build_recipe(config.method, retain=config.retain, max_tokens=config.max_tokens)
    bound = bind(config.host, config.port)
    try:
        if adapter is None:
            adapter = load_model(config.model, config.placement, frames=config.num_frames)
    except BaseException:
        bound.close()
        raise
    model_id = Path(config.model).name if Path(config.model).is_dir() else config.model
    engine = ChatEngine(adapter, model_id, method=config.method, retain=config.retain,
                        max_visual_tokens=config.max_tokens, seed=config.seed)
    allowed = Path(config.allowed_local_media_path).resolve() if config.allowed_local_media_path else None
    base = LiveConfig(source="", model=config.model, method=config.method, retain=config.retain,
                      max_tokens=config.max_tokens, memory=MemoryConfig(), placement=config.placement,
                      max_new_tokens=config.max_new_tokens, seed=config.seed, no_ray=True)
    sessions = StreamSessions(engine, base, config.max_streams, allowed)
    return Server(build_app(config, engine, sessions), sessions, bound)
