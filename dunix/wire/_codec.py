"""Sans-IO wire codec: typed messages to length-prefixed msgpack frames and back.

A message is a frozen dataclass registered with :func:`message`. On the wire it is a
msgpack ext value (code ``MSG_EXT``) holding ``[type name, field values in order]``, so
nested messages (a gossip packet carrying member updates) cost a name and their values,
not their field names. A frame is a 4-byte big-endian length followed by one encoded
message. Nothing here touches a socket: bytes go in, messages come out (as h11 does).
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from typing import Any, TypeVar

import msgpack

from dunix.errors import FrameTooLarge, ProtocolError

MSG_EXT = 1
HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME = 16 * 1024 * 1024

T = TypeVar("T")

_REGISTRY: dict[str, type[Any]] = {}
_FIELDS: dict[type[Any], tuple[str, ...]] = {}


def message(cls: type[T]) -> type[T]:
    """Register a frozen dataclass as a wire message under its class name."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} is not a dataclass")
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen:
        raise TypeError(f"{cls.__name__} must be a frozen dataclass")
    name = cls.__name__
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise TypeError(f"two wire messages are named {name}")
    _REGISTRY[name] = cls
    _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return cls


def registered() -> dict[str, type[Any]]:
    """The registered message types by wire name (a copy)."""
    return dict(_REGISTRY)


def _default(obj: Any) -> Any:
    fields = _FIELDS.get(type(obj))
    if fields is None:
        raise TypeError(f"cannot encode {type(obj).__name__}: not a registered message")
    body = [type(obj).__name__, [getattr(obj, f) for f in fields]]
    return msgpack.ExtType(MSG_EXT, msgpack.packb(body, default=_default, use_bin_type=True))


def _ext_hook(code: int, data: bytes) -> Any:
    if code != MSG_EXT:
        raise ProtocolError(f"unknown msgpack ext code {code}")
    body = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    if not (isinstance(body, list) and len(body) == 2 and isinstance(body[0], str)):
        raise ProtocolError("malformed message body")
    name, values = body
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ProtocolError(f"unknown message type {name!r}")
    fields = _FIELDS[cls]
    if not isinstance(values, list) or len(values) != len(fields):
        raise ProtocolError(f"{name}: expected {len(fields)} fields")
    try:
        return cls(*_retuple(values, cls))
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"{name}: {exc}") from exc


def _retuple(values: list[Any], cls: type[Any]) -> list[Any]:
    """msgpack returns lists; fields declared as tuples get tuples back (hashable, frozen)."""
    out = []
    for f, v in zip(dataclasses.fields(cls), values, strict=True):
        ann = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        out.append(tuple(v) if isinstance(v, list) and ann.startswith("tuple") else v)
    return out


def encode(msg: Any) -> bytes:
    """Encode one registered message (no length prefix)."""
    return msgpack.packb(msg, default=_default, use_bin_type=True)  # type: ignore[no-any-return]


def decode(payload: bytes) -> Any:
    """Decode one message; anything but a single registered message is a ProtocolError."""
    try:
        obj = msgpack.unpackb(payload, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"undecodable payload: {exc}") from exc
    if type(obj) not in _FIELDS:
        raise ProtocolError("payload is not a message")
    return obj


def frame(msg: Any) -> bytes:
    """One message as a frame: 4-byte big-endian length, then the payload."""
    payload = encode(msg)
    return HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Turns a byte stream into messages; refuses frames above ``max_frame`` bytes.

    After an error the decoder is poisoned: the stream has lost framing and the
    connection must be closed.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._broken: ProtocolError | None = None

    def feed(self, data: bytes) -> list[Any]:
        if self._broken is not None:
            raise self._broken
        self._buf += data
        out: list[Any] = []
        try:
            while len(self._buf) >= HEADER.size:
                (length,) = HEADER.unpack_from(self._buf)
                if length > self.max_frame:
                    raise FrameTooLarge(f"frame of {length} bytes exceeds {self.max_frame}")
                if len(self._buf) < HEADER.size + length:
                    break
                payload = bytes(self._buf[HEADER.size : HEADER.size + length])
                del self._buf[: HEADER.size + length]
                out.append(decode(payload))
        except ProtocolError as exc:
            self._broken = exc
            raise
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)


Encoder = Callable[[Any], bytes]
