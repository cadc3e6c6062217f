"""openpi's msgpack-numpy format: nested maps and lists of plain values and numpy arrays, as msgpack.

Follows `packages/openpi-client/src/openpi_client/msgpack_numpy.py` in Physical-Intelligence/openpi,
so what we pack an openpi client unpacks, and the other way round:

- an array is a map with *bytes* keys: `{b"__ndarray__": True, b"data": its C-order bytes,
  b"dtype": numpy's `dtype.str` ("<f4", "|u1", ...), b"shape": [dims]}`, in that key order;
- a numpy scalar that msgpack cannot pack natively (np.int64, np.bool_, np.float32, ...) is
  `{b"__npgeneric__": True, b"data": its Python value, b"dtype": dtype.str}` (np.float64 and np.str_
  are float and str subclasses, so msgpack packs them as plain values, in openpi as here);
- object, void (structured) and complex dtypes are refused, as openpi refuses them: an object
  array would need pickle, and nothing here is ever unpickled.

Unpacking is stricter than openpi's, because its input comes from the network: no msgpack ext
types, a dtype must be a simple type code (no structured specs), the byte count must match the
shape exactly, and a failure of any kind is one MsgpackNumpyError. As in openpi, a received array is
a read-only view of the message's bytes (no copy).
"""

from __future__ import annotations

import math
import re
from typing import Any

import msgpack
import numpy as np

from streamprune.transport.wire import WireError

REFUSED_KINDS = {"O": "object", "V": "void (structured)", "c": "complex"}
MAX_NDIM = 32
# a simple type code, optionally with a byte order and a datetime unit: "<f4", "|u1", "<M8[ns]", "<U5"
_DTYPE_TEXT = re.compile(r"[<>|=]?[a-zA-Z?][0-9]{0,4}(\[[a-zA-Z0-9]{1,8}\])?")
_PLAIN = (bool, int, float, str, bytes)


class MsgpackNumpyError(WireError):
    """A value that cannot travel in openpi's format, or bytes that are not a message in it."""


def _check_dtype(dtype: np.dtype) -> None:
    if dtype.kind in REFUSED_KINDS:
        raise MsgpackNumpyError(f"dtype {dtype} cannot be sent: object, void (structured) and complex arrays are "
                                "refused (openpi's rule; nothing is pickled)")


def _encode(obj: Any) -> Any:
    """msgpack's `default` hook: the map that stands for an array or a numpy scalar."""
    if isinstance(obj, np.ndarray):
        _check_dtype(obj.dtype)
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        _check_dtype(obj.dtype)
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot pack a {type(obj).__name__}")


def packb(obj: Any) -> bytes:
    """`obj` (maps, lists, plain values, numpy arrays and scalars) as one openpi msgpack-numpy message."""
    try:
        return msgpack.packb(obj, default=_encode, use_bin_type=True)
    except MsgpackNumpyError:
        raise
    except (TypeError, ValueError, OverflowError) as err:
        raise MsgpackNumpyError(f"cannot pack the value: {err}") from None


def _dtype(text: Any) -> np.dtype:
    if not isinstance(text, str) or not _DTYPE_TEXT.fullmatch(text):
        raise MsgpackNumpyError(f"dtype must be a simple numpy type code such as '<f4', got {str(text)[:40]!r}")
    try:
        dtype = np.dtype(text)
    except (TypeError, ValueError):
        raise MsgpackNumpyError(f"unknown dtype {text!r}") from None
    _check_dtype(dtype)
    if dtype.itemsize == 0:
        raise MsgpackNumpyError(f"dtype {text!r} has no size")
    return dtype


def _array(obj: dict) -> np.ndarray:
    data, shape = obj.get(b"data"), obj.get(b"shape")
    dtype = _dtype(obj.get(b"dtype"))
    if not isinstance(data, bytes):
        raise MsgpackNumpyError("an array's data must be bytes")
    if (not isinstance(shape, list) or len(shape) > MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise MsgpackNumpyError(f"an array's shape must be a list of at most {MAX_NDIM} non-negative integers")
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise MsgpackNumpyError(f"array of shape {shape[:8]} and dtype {dtype.str} needs {expected} bytes, "
                                f"got {len(data)}")
    return np.ndarray(shape=tuple(shape), dtype=dtype, buffer=data)


def _scalar(obj: dict) -> np.generic:
    data = obj.get(b"data")
    dtype = _dtype(obj.get(b"dtype"))
    if not isinstance(data, _PLAIN):
        raise MsgpackNumpyError("a numpy scalar's data must be a plain value")
    try:
        return dtype.type(data)
    except (TypeError, ValueError, OverflowError):
        raise MsgpackNumpyError(f"{str(data)[:40]!r} is not a {dtype.str} value") from None


def _decode(obj: dict) -> Any:
    """msgpack's `object_hook`: arrays and numpy scalars back from their maps; other maps as they are."""
    if b"__ndarray__" in obj:
        return _array(obj)
    if b"__npgeneric__" in obj:
        return _scalar(obj)
    return obj


def _no_ext(code: int, data: bytes) -> Any:
    raise MsgpackNumpyError(f"msgpack ext type {code} is not part of the format")


def unpackb(data: Any) -> Any:
    """The value in one message (bytes), or MsgpackNumpyError saying why it is not one."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MsgpackNumpyError(f"a message must be bytes, got {type(data).__name__}")
    try:
        return msgpack.unpackb(data, object_hook=_decode, ext_hook=_no_ext, raw=False, strict_map_key=True)
    except MsgpackNumpyError:
        raise
    except (ValueError, TypeError, KeyError, OverflowError, RecursionError, msgpack.UnpackException) as err:
        raise MsgpackNumpyError(f"not a msgpack-numpy message: {type(err).__name__}: {str(err)[:200]}") from None
