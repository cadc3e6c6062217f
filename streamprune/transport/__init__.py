"""zmq transport: the [msgpack header, raw buffer] wire format and the frame publisher."""

from streamprune.transport.wire import ALLOWED_DTYPES, DEFAULT_MAX_BYTES, WireError, decode, encode
from streamprune.transport.zmq_frames import Publisher, run_publisher

__all__ = ["ALLOWED_DTYPES", "DEFAULT_MAX_BYTES", "Publisher", "WireError", "decode", "encode", "run_publisher"]
