"""`streamprune serve`: the OpenAI-compatible video API (see streamprune/serve/).

    streamprune serve --port 8000 --allowed-local-media-path ~/videos
    curl localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "file:///home/me/videos/clip.mp4"}},
        {"type": "text", "text": "what moves?"}]}], "method": "stc", "retain": 0.25}'
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

from streamprune.config.serve import ServeConfig
from streamprune.errors import ConfigError

log = logging.getLogger("streamprune.serve")


def run(config: ServeConfig) -> int:
    from streamprune.serve.app import create_server

    if config.allowed_local_media_path and not Path(config.allowed_local_media_path).is_dir():
        raise ConfigError(f"--allowed-local-media-path {config.allowed_local_media_path} is not a directory")
    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        log.warning("serving on %s without --api-key: anyone who reaches this address can use the model",
                    config.host)
    server = create_server(config).start()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a service manager's stop: as Ctrl-C
    sys.stderr.write(f"serving {server.url} (OpenAI API at {server.url}/v1, page at {server.url}/); "
                     "Ctrl-C stops\n")
    try:
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    sys.stderr.write("stopped\n")
    return 0
