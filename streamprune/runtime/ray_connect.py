"""Connect to a Ray cluster (`--ray-address`) within a bounded time, or fail in one line.

`ray.init(address=...)` at an address where no cluster answers waits for minutes: its GCS client
retries, 30 s an attempt, whether the port is closed, filtered or held by some other server. So
the address is resolved and probed first: a TCP connection and an HTTP/2 SETTINGS exchange, which
every gRPC server answers (a Ray GCS and a Ray client server are gRPC servers), both within
PROBE_TIMEOUT_S. Only an address that passes reaches `ray.init`.
"""

from __future__ import annotations

import logging
import socket

from streamprune.errors import ConfigError

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0
# the HTTP/2 client preface and an empty SETTINGS frame; a gRPC server replies with its SETTINGS
_HTTP2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_SETTINGS = 4


def resolve_address(address: str) -> tuple[str, int]:
    """(host, port) of a Ray address: HOST:PORT, ray://HOST:PORT, or 'auto' (RAY_ADDRESS or the
    cluster `ray start` last started on this machine)."""
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            found = canonicalize_bootstrap_address("auto")
        except (ConnectionError, ValueError):
            found = None
        if not found:
            raise ConfigError("--ray-address auto: no Ray cluster runs on this machine "
                              "(start one with `ray start --head`, or give HOST:PORT)")
        address = found
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--ray-address must be auto or HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def probe(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> None:
    """A ConfigError unless a gRPC server answers at host:port within `timeout` seconds."""
    where = f"{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(_HTTP2_HELLO)
            reply = b""
            while len(reply) < 9:  # one frame header
                chunk = sock.recv(9 - len(reply))
                if not chunk:
                    break
                reply += chunk
    except TimeoutError:
        raise ConfigError(f"no Ray cluster answers at {where} within {timeout:g} s") from None
    except OSError as err:
        raise ConfigError(f"no Ray cluster at {where}: {err.strerror or err}") from None
    if len(reply) < 9 or reply[3] != _SETTINGS:
        raise ConfigError(f"{where} answers, but not as a Ray cluster (no gRPC server there)")


def init_ray(address: str | None, **options) -> bool:
    """`ray.init` on `address` (None: a new local instance) after `probe`; True if this call
    started or joined Ray (so should shut it down), False if Ray was already initialised here."""
    import ray

    if address:
        probe(*resolve_address(address))
    if ray.is_initialized():
        log.info("using the Ray instance already initialised in this process")
        return False
    try:
        ray.init(address=address or "local", **options)
    except (ConnectionError, ValueError, RuntimeError) as err:
        text = str(err).strip()
        raise ConfigError(f"cannot start or reach Ray at {address or 'a new local instance'}: "
                          f"{text.splitlines()[0] if text else type(err).__name__}") from None
    return True
