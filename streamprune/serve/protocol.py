"""The OpenAI chat-completions wire format as `streamprune serve` speaks it: a request body read into
a typed `ChatRequest` (400 with an OpenAI-style error body for a bad field), and the response,
chunk and error bodies. No torch here; the model side is `engine.py`."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from streamprune.config.fields import positive_float, positive_int, retain_ratio, seed_value
from streamprune.errors import ConfigError


class ApiError(Exception):
    """An error a client caused (or a server one, status 5xx), sent as OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class MediaPart:
    """One video_url or image_url part of the user message."""

    kind: str  # "video_url" | "image_url"
    url: str


@dataclass
class ChatRequest:
    """What one chat completion asks for. Sampling and pruning fields not given are None (the
    server's defaults apply); OpenAI's `max_tokens` / `max_completion_tokens` cap the answer, so the
    visual-token cap is `max_visual_tokens`."""

    model: str | None
    question: str
    media: list[MediaPart] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    max_new_tokens: int | None = None
    fps: float | None = None
    num_frames: int | None = None
    method: str | None = None
    retain: float | None = None
    max_visual_tokens: int | None = None
    seed: int | None = None
    stream_id: str | None = None


def flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"expected true or false, got {value!r}")
    return value


def checked_field(body: dict[str, Any], name: str, parse: Callable[[Any], Any]) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and parse is not flag:
        raise ApiError(400, f"'{name}' must be a number, got {value!r}", name)
    try:
        return parse(value)
    except ConfigError as err:
        raise ApiError(400, f"'{name}': {err}", name) from None


def text_field(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise ApiError(400, f"'{name}' must be a string", name)
    return value


def _parts(content: Any, where: str) -> tuple[list[str], list[MediaPart]]:
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or a list of parts", where)
    texts, media = [], []
    for i, part in enumerate(content):
        at = f"{where}.content[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("video_url", "image_url"):
            inner = part.get(kind)
            url = inner.get("url") if isinstance(inner, dict) else inner
            if not isinstance(url, str) or not url:
                raise ApiError(400, f"{at}.{kind}.url must be a non-empty string", at)
            media.append(MediaPart(kind, url))
        else:
            raise ApiError(400, f"{at} must be a text, video_url or image_url part", at)
    return texts, media


def parse_chat(body: Any) -> ChatRequest:
    """Read a /v1/chat/completions body. The question is the last user message's text; its media
    parts are the video. Unknown fields are ignored; temperature and top_p do not apply (answers
    are greedy, as every method's reference evaluation decodes)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    users = [(i, m) for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise ApiError(400, "'messages' has no user message", "messages")
    index, last = users[-1]
    texts, media = _parts(last.get("content"), f"messages[{index}]")
    question = "\n".join(t for t in texts if t.strip()).strip()
    if not question:
        raise ApiError(400, "the last user message has no question text", f"messages[{index}]")
    n = body.get("n", 1)
    if n not in (1, None):
        raise ApiError(400, "only n=1 is supported", "n")
    options = body.get("stream_options") or {}
    chat = ChatRequest(
        model=text_field(body, "model"), question=question, media=media,
        stream=checked_field(body, "stream", flag) or False,
        include_usage=bool(options.get("include_usage", False)) if isinstance(options, dict) else False,
        max_new_tokens=checked_field(body, "max_completion_tokens", positive_int) or checked_field(body, "max_tokens",
                                                                                         positive_int),
        fps=checked_field(body, "fps", positive_float), num_frames=checked_field(body, "num_frames", positive_int),
        method=text_field(body, "method"), retain=checked_field(body, "retain", retain_ratio),
        max_visual_tokens=checked_field(body, "max_visual_tokens", positive_int),
        seed=checked_field(body, "seed", seed_value), stream_id=text_field(body, "stream_id"))
    if chat.stream_id is not None and media:
        raise ApiError(400, "a stream_id request is answered from that stream; send no video with it", "stream_id")
    if chat.stream_id is None and not media:
        raise ApiError(400, "the user message needs a video_url part, image_url parts (the frames of one video), "
                            "or the request a stream_id", f"messages[{index}]")
    return chat


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, visual_in: int, visual_kept: int) -> dict[str, int]:
    """OpenAI's usage plus the visual tokens before pruning and those the LLM attended to."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "visual_tokens_in": visual_in,
            "visual_tokens_kept": visual_kept}


def completion(cid: str, model: str, text: str, finish: str, use: dict[str, int],
               extra: dict[str, Any]) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                         "logprobs": None}],
            "usage": use, **extra}


def chunk(cid: str, model: str, delta: dict[str, Any] | None, finish: str | None = None,
          use: dict[str, int] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One `chat.completion.chunk`; delta None makes the usage-only chunk (no choices)."""
    body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                            "model": model, "choices": []}
    if delta is not None:
        body["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    if use is not None:
        body["usage"] = use
    if extra:
        body.update(extra)
    return body
