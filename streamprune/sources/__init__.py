"""Frame sources: everything the pipeline can watch, behind one iterator interface.

`open_source(spec)` picks the source from a one-word spec:
  file:PATH (or a bare path)     a video file played at its own frame rate (`loop` to repeat)
  camera:N                       V4L2 camera /dev/videoN
  rtsp://... http(s)://...       a network stream
  zmq://HOST:PORT                frames from a streamprune publisher
  synthetic:[k=v,...]            generated moving shapes (see SyntheticConfig)
  gym:ENV_ID                     a gymnasium env's camera under its scripted expert (GymEnvSource)
"""

from __future__ import annotations

from urllib.parse import urlsplit

from streamprune.errors import ConfigError, InputError
from streamprune.sources.av_source import URL_SCHEMES, AVSource, camera_source, file_source, url_source
from streamprune.sources.base import Backoff, FrameSource, SourceStats
from streamprune.sources.synthetic import SyntheticConfig, SyntheticSource
from streamprune.sources.zmq_source import ZmqSource

__all__ = [
    "AVSource",
    "Backoff",
    "FrameSource",
    "SourceStats",
    "SyntheticConfig",
    "SyntheticSource",
    "ZmqSource",
    "open_source",
]


def open_source(spec: str, loop: bool = False, realtime: bool = True) -> FrameSource:
    """The FrameSource for `spec`. Raises InputError now for an unknown scheme or a missing file.

    `realtime=False` reads files, synthetic streams and URLs as fast as they decode (a camera or a
    zmq stream comes at its own pace either way). `loop` applies to files and synthetic streams.
    """
    scheme, sep, rest = spec.partition(":")
    if not sep or (len(scheme) == 1 and scheme.isalpha()):  # a bare path (or a Windows drive letter)
        scheme, rest = "file", spec
    scheme = scheme.lower()
    if loop and scheme not in ("file", "synthetic"):
        raise ConfigError(f"--loop applies to file: and synthetic: sources, not {scheme}:")
    if scheme == "file":
        return file_source(rest, loop=loop, realtime=realtime)
    if scheme == "synthetic":
        return SyntheticSource(SyntheticConfig.parse(rest), loop=loop, realtime=realtime)
    if scheme == "camera":
        return camera_source(rest, realtime=realtime)
    if scheme == "gym":
        from streamprune.sources.gym_env import GymEnvSource

        return GymEnvSource(rest, realtime=realtime)
    if scheme in URL_SCHEMES:
        if not urlsplit(spec).hostname:
            raise InputError(f"{spec!r} has no host")
        return url_source(spec, realtime=realtime)
    if scheme == "zmq":
        parts = urlsplit(spec)
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None:
            raise InputError(f"{spec!r} must be zmq://HOST:PORT")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        return ZmqSource(f"tcp://{host}:{port}")
    raise InputError(
        f"unknown source {spec!r}: use file:PATH, camera:N, rtsp://, http(s)://, zmq://HOST:PORT, synthetic: or gym:ENV_ID"
    )
