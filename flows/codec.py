"""The one codec module: JSON (orjson) on the wire, MessagePack (msgpack) inside.

Every decode failure is raised as :class:`DecodeError` chained ``from`` the
library's own exception, so callers catch exactly one type.
"""

from __future__ import annotations

from typing import Any

import msgpack
import orjson

__all__ = [
    "DecodeError",
    "EncodeError",
    "json_dumps",
    "json_loads",
    "pack",
    "unpack",
]


class DecodeError(ValueError):
    """Bytes that are not a valid document of the expected format."""


class EncodeError(ValueError):
    """A value that cannot be encoded (wrong type, NaN, too deep, ...)."""


_JSON_OPTS = orjson.OPT_SORT_KEYS


def json_loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Parse one JSON document; raise :class:`DecodeError` if it is not one."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"invalid JSON: {exc.msg}") from exc


def json_dumps(value: Any) -> bytes:
    """Encode to compact JSON bytes with sorted keys (stable, byte-identical output)."""
    try:
        return orjson.dumps(value, option=_JSON_OPTS)
    except (orjson.JSONEncodeError, TypeError) as exc:
        raise EncodeError(f"cannot encode JSON: {exc}") from exc


def pack(value: Any) -> bytes:
    """Encode a value as MessagePack (for values only touchstream reads back)."""
    try:
        return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(f"cannot encode MessagePack: {exc}") from exc


def _msgpack_problem(exc: Exception) -> str:
    # Some msgpack exceptions carry no message: name the problem instead.
    if isinstance(exc, msgpack.ExtraData):
        return "extra data after the document"
    if isinstance(exc, msgpack.StackError):
        return "nested too deeply"
    if isinstance(exc, msgpack.FormatError):
        return "a reserved or invalid type byte"
    if isinstance(exc, UnicodeDecodeError):
        return f"a string is not valid UTF-8 (byte {exc.start})"
    return str(exc) or type(exc).__name__


def unpack(data: bytes | bytearray | memoryview) -> Any:
    """Decode one MessagePack document; raise :class:`DecodeError` on bad input.

    Map keys must be strings (or bytes); strings must be valid UTF-8; nesting is
    bounded by msgpack's own stack (1024 levels); lengths beyond the data are errors.
    """
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (
        msgpack.ExtraData,
        msgpack.FormatError,
        msgpack.StackError,
        ValueError,
        TypeError,
    ) as exc:
        raise DecodeError(f"invalid MessagePack: {_msgpack_problem(exc)}") from exc
