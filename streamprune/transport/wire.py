"""The zmq wire format: one multipart message = [msgpack header, raw array buffer].

Frames, robot observations and actions all travel this way, so the format is generic: the header
says what the buffer holds (`shape`, `dtype`, little-endian, C order) and carries a few small
free-form fields (an instruction, an error text). Nothing is ever unpickled: the header is plain
msgpack (no ext types), the buffer is raw bytes viewed through an allow-listed numeric dtype, and
every size is checked against the header before anything is allocated, so a hostile or broken
peer can cost at most one rejected message.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np

from streamprune.errors import InputError

VERSION = 1
KINDS = frozenset({"frame", "obs", "action", "error"})
# Plain numeric dtypes only: no object (pickles), no str/void (variable meaning), no datetimes.
ALLOWED_DTYPES = frozenset(
    {"bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float16", "float32", "float64"}
)
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024
MAX_NDIM = 8
_RESERVED = ("v", "kind", "shape", "dtype", "ts", "seq")
_PLAIN = (type(None), bool, int, float, str, bytes)


class WireError(InputError):
    """A message that is not a valid [header, buffer] pair; the receiver drops and counts it."""


def encode(array: np.ndarray | None, *, kind: str = "frame", ts: float = 0.0, seq: int = 0, **fields: Any) -> list[bytes]:
    """[header, buffer] for `array` (any shape, an allowed dtype; None sends an empty buffer).

    `fields` are extra small header entries (str/number/bool/None/bytes, lists and str-keyed dicts
    of those), e.g. `instruction="pick up the cup"`; they cannot override the reserved keys.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    clash = set(fields) & set(_RESERVED)
    if clash:
        raise ValueError(f"fields {sorted(clash)} are reserved header keys")
    arr = np.zeros(0, np.uint8) if array is None else np.asarray(array)
    if arr.dtype.name not in ALLOWED_DTYPES:
        raise ValueError(f"dtype {arr.dtype} cannot be sent; allowed: {sorted(ALLOWED_DTYPES)}")
    arr = np.asarray(arr, dtype=arr.dtype.newbyteorder("<"), order="C")  # (ascontiguousarray makes 0-d 1-d)
    header = {"v": VERSION, "kind": kind, "shape": list(arr.shape), "dtype": arr.dtype.name, "ts": float(ts), "seq": int(seq)}
    header.update(fields)
    packed = msgpack.packb(header, use_bin_type=True)
    if len(packed) > MAX_HEADER_BYTES:
        raise ValueError(f"header is {len(packed)} bytes, above the {MAX_HEADER_BYTES}-byte limit")
    return [packed, arr.tobytes()]


def _no_ext(code: int, data: bytes) -> Any:
    raise WireError(f"msgpack ext type {code} is not allowed in a header")


def _plain(value: Any, depth: int = 0) -> bool:
    """True if `value` is made only of msgpack's plain types (no Timestamp or other objects)."""
    if depth > 8:
        return False
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, list):
        return all(_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v, depth + 1) for k, v in value.items())
    return False


def decode(
    parts: Sequence[Any],
    max_bytes: int = DEFAULT_MAX_BYTES,
    allowed_dtypes: frozenset[str] | set[str] = ALLOWED_DTYPES,
) -> tuple[dict[str, Any], np.ndarray]:
    """Check and unpack a received message: (header, array viewing the buffer, read-only).

    `parts` are bytes, memoryviews or zmq.Frame objects. Raises WireError for anything other than
    exactly two parts, a header that is not a msgpack map with the reserved keys, a dtype outside
    `allowed_dtypes`, a claimed size above `max_bytes` (checked on the header alone, before the
    buffer is touched) or a buffer whose length does not match shape x itemsize.
    """
    bad = set(allowed_dtypes) - ALLOWED_DTYPES
    if bad:
        raise ValueError(f"dtypes {sorted(bad)} can never be allowed on the wire")
    if len(parts) != 2:
        raise WireError(f"expected 2 message parts (header, buffer), got {len(parts)}")
    head, body = memoryview(parts[0]), memoryview(parts[1])
    if head.nbytes > MAX_HEADER_BYTES:
        raise WireError(f"header is {head.nbytes} bytes, above the {MAX_HEADER_BYTES}-byte limit")
    try:
        header = msgpack.unpackb(head, raw=False, strict_map_key=True, ext_hook=_no_ext, use_list=True)
    except WireError:
        raise
    except Exception as e:  # msgpack raises several unrelated types for garbage input
        raise WireError(f"header is not valid msgpack ({type(e).__name__})") from None
    if not isinstance(header, dict) or not _plain(header):
        raise WireError("header must be a msgpack map of plain values")
    missing = [k for k in _RESERVED if k not in header]
    if missing:
        raise WireError(f"header lacks {missing}")
    if type(header["v"]) is not int or header["v"] != VERSION:
        raise WireError(f"unsupported wire version {str(header['v'])[:20]!r} (this side speaks {VERSION})")
    if not isinstance(header["kind"], str) or header["kind"] not in KINDS:
        raise WireError(f"unknown kind {str(header['kind'])[:20]!r}")
    if not isinstance(header["ts"], (int, float)) or isinstance(header["ts"], bool) or not math.isfinite(header["ts"]):
        raise WireError("ts must be a finite number")
    if not isinstance(header["seq"], int) or isinstance(header["seq"], bool):
        raise WireError("seq must be an integer")
    dtype_name = header["dtype"]
    if not isinstance(dtype_name, str) or dtype_name not in allowed_dtypes:
        raise WireError(f"dtype {dtype_name!r} is not allowed")
    shape = header["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise WireError(f"shape must be a list of at most {MAX_NDIM} non-negative integers")
    dtype = np.dtype(dtype_name).newbyteorder("<")
    nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow, nothing allocated
    if nbytes > max_bytes:
        raise WireError(f"message claims {nbytes} bytes, above the {max_bytes}-byte limit")
    if body.nbytes != nbytes:
        raise WireError(f"buffer is {body.nbytes} bytes but shape {shape} x {dtype_name} needs {nbytes}")
    array = np.frombuffer(body, dtype=dtype).reshape(tuple(shape))
    array.flags.writeable = False
    return header, array
