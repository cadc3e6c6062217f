"""Configs of `streamprune serve` (the OpenAI-compatible video API) and `streamprune bench serve`."""

from __future__ import annotations

from dataclasses import dataclass, field

from streamprune.config.fields import (max_tokens_option, method_option, model_option, option, positive_float,
                                       positive_int, retain_option, seed_option)
from streamprune.config.schema import DeviceConfig
from streamprune.errors import ConfigError


def port_number(text: object) -> int:
    try:
        port = int(str(text))
    except ValueError:
        raise ConfigError(f"port must be an integer in [0, 65535], got {text!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"port must be in [0, 65535], got {port}")
    return port


@dataclass
class ServeConfig:
    """`streamprune serve`: an OpenAI-compatible HTTP API (POST /v1/chat/completions with video_url or
    image_url frames; pruning chosen per request), live stream sessions (/v1/streams) answered from
    bounded memory, and a web page at / to watch a stream, its kept tokens and ask questions."""

    model: str = model_option()
    host: str = option("127.0.0.1", "address to bind (default 127.0.0.1, this machine only)")
    port: int = option(8000, "TCP port (default 8000; 0 picks a free one)", parse=port_number)
    api_key: str | None = option(None, "require `Authorization: Bearer KEY` on every route but /health",
                                 metavar="KEY")
    allowed_local_media_path: str | None = option(None, "directory whose files requests may name as file:// "
                                                        "video URLs or file: stream sources (default: none)",
                                                  metavar="DIR")
    method: str = method_option()
    retain: float | None = retain_option()
    max_tokens: int | None = max_tokens_option()
    fps: float = option(1.0, "frames sampled per second of a video_url (default 1; a request's `fps` wins)",
                        parse=positive_float)
    num_frames: int = option(16, "at most N frames per video, evenly spaced (default 16; a request's "
                                 "`num_frames` wins)", parse=positive_int, metavar="N")
    max_new_tokens: int = option(64, "answer length cap when a request sets no max_tokens (default 64)",
                                 parse=positive_int, metavar="K")
    max_concurrency: int = option(8, "requests handled at once; the rest wait in a queue (default 8)",
                                  parse=positive_int, metavar="N")
    max_streams: int = option(4, "live stream sessions open at once (default 4)", parse=positive_int, metavar="N")
    max_media_mb: float = option(512.0, "largest video or image a request may send or link (default 512 MB)",
                                 parse=positive_float, metavar="MB")
    seed: int = seed_option()
    placement: DeviceConfig = field(default_factory=DeviceConfig)


@dataclass
class BenchServeConfig:
    """`streamprune bench serve`: start the server in this process and send REQUESTS chat completions
    about one encoded clip over HTTP, first one at a time, then CONCURRENCY at a time: requests/s,
    p50/p99 latency, errors, and the throughput ratio of the two runs."""

    model: str = model_option()
    requests: int = option(32, "requests to send (default 32)", parse=positive_int, metavar="N")
    concurrency: int = option(32, "requests in flight at once (default 32)", parse=positive_int, metavar="N")
    max_concurrency: int = option(8, "the server's --max-concurrency (default 8)", parse=positive_int,
                                  metavar="N")
    method: str = method_option("stc")
    retain: float | None = retain_option()
    num_frames: int = option(8, "frames per request (default 8)", parse=positive_int, metavar="N")
    max_new_tokens: int = option(8, "answer length per request (default 8)", parse=positive_int, metavar="K")
    threads: int = option(1, "torch threads of the model (default 1)", parse=positive_int)
    video: str | None = option(None, "clip every request asks about (default: a held-out synthetic clip, "
                                     "H.264-encoded for this run)", metavar="FILE")
    json: str | None = option(None, "write the results as JSON", metavar="FILE")
    plot: str | None = option(None, "write latency per request, one run after the other, as PNG", metavar="FILE")
    placement: DeviceConfig = field(default_factory=DeviceConfig)
