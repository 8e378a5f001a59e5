"""Sans-IO wire codec: typed messages to length-prefixed msgpack frames and back.

A message is a frozen dataclass registered with :func:`message`. On the wire it is a
msgpack ext value (code ``MSG_EXT``) holding ``[type name, field values in order]``, so
nested messages (a gossip packet carrying member updates) cost a name and their values,
not their field names. A frame is a 4-byte big-endian length followed by one encoded
message. Nothing here touches a socket: bytes go in, messages come out (as h11 does).
"""

from __future__ import annotations

import dataclasses
import enum
import struct
import types
import typing
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
Convert = Callable[[Any], Any]
_CONVERTERS: dict[type[Any], tuple[Convert, ...] | None] = {}


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
    checks = _converters(cls)
    try:
        args = values if checks is None else [c(v) for c, v in zip(checks, values, strict=True)]
    except ProtocolError as exc:
        raise ProtocolError(f"{name}: {exc}") from exc
    try:
        return cls(*args)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"{name}: {exc}") from exc


def _converters(cls: type[Any]) -> tuple[Convert, ...] | None:
    """Per-field checkers of a message class, built once at its first decode.

    Built then, not at registration, because a message may name another one defined later
    in its module. A class whose annotations cannot be resolved even then (a name imported
    only under ``TYPE_CHECKING``, a class local to a function) is decoded unchecked.
    """
    if cls not in _CONVERTERS:
        try:
            hints = typing.get_type_hints(cls)
        except Exception:
            _CONVERTERS[cls] = None
        else:
            _CONVERTERS[cls] = tuple(_compile(hints.get(f, Any)) for f in _FIELDS[cls])
    return _CONVERTERS[cls]


def _identity(value: Any) -> Any:
    return value


def _compile(hint: Any) -> Convert:
    """A function that checks a decoded value against an annotation and returns it.

    msgpack knows no tuples and the dataclass constructor checks no types, so without this
    a peer could put a string where an int belongs and the error would surface far away;
    lists come back as the declared tuples. Annotations not understood here pass as they
    are. Compiled once per class, because a 1,000-member gossip reply is decoded often.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return _identity
    if hint is None or hint is type(None):
        return _compile_scalar(type(None))
    if origin is typing.Union or origin is types.UnionType:
        return _compile_union(hint, args)
    if origin is typing.Literal:
        return _compile_literal(args)
    if origin is dict:
        return _compile_dict(args)
    if origin in (tuple, list):
        return _compile_sequence(origin, args)
    if isinstance(hint, type):
        return _compile_scalar(hint)
    return _identity


def _compile_union(hint: Any, args: tuple[Any, ...]) -> Convert:
    nullable = type(None) in args
    subs = [_compile(a) for a in args if a is not type(None)]

    def union(value: Any) -> Any:
        if value is None and nullable:
            return None
        for sub in subs:
            try:
                return sub(value)
            except ProtocolError:
                continue
        raise ProtocolError(f"{type(value).__name__} matches none of {hint}")

    return union


def _compile_literal(allowed: tuple[Any, ...]) -> Convert:
    def literal(value: Any) -> Any:
        if value in allowed:
            return value
        raise ProtocolError(f"{value!r} is not one of {allowed}")

    return literal


def _compile_dict(args: tuple[Any, ...]) -> Convert:
    key, val = (_compile(args[0]), _compile(args[1])) if args else (_identity, _identity)

    def mapping(value: Any) -> Any:
        if not isinstance(value, dict):
            raise ProtocolError(f"expected dict, got {type(value).__name__}")
        return {key(k): val(v) for k, v in value.items()}

    return mapping


def _compile_sequence(origin: type[Any], args: tuple[Any, ...]) -> Convert:
    if origin is list or (len(args) == 2 and args[1] is Ellipsis):
        item = _compile(args[0]) if args else _identity

        def homogeneous(value: Any) -> Any:
            if not isinstance(value, list | tuple):
                raise ProtocolError(f"expected {origin.__name__}, got {type(value).__name__}")
            return origin(item(v) for v in value)

        return homogeneous
    items = [] if args == ((),) else [_compile(a) for a in args]  # tuple[()] is empty

    def fixed(value: Any) -> Any:
        if not isinstance(value, list | tuple) or len(value) != len(items):
            raise ProtocolError(f"expected a tuple of {len(items)}, got {value!r:.40}")
        return tuple(check(v) for check, v in zip(items, value, strict=True))

    return fixed if args else _compile_scalar(origin)


def _compile_scalar(hint: type[Any]) -> Convert:
    if issubclass(hint, enum.Enum):

        def member(value: Any) -> Any:
            try:
                return hint(value)
            except ValueError as exc:
                raise ProtocolError(str(exc)) from exc

        return member

    def scalar(value: Any) -> Any:
        kind = type(value)
        if kind is hint:
            return value
        if hint is float and kind is int:
            return float(value)
        if hint in (tuple, list) and kind in (list, tuple):
            return hint(value)
        if (kind is bool and hint in (int, float)) or not isinstance(value, hint):
            raise ProtocolError(f"expected {hint.__name__}, got {kind.__name__}")  # bool: no int
        return value

    return scalar


def encode(msg: Any) -> bytes:
    """Encode one registered message (no length prefix)."""
    return msgpack.packb(msg, default=_default, use_bin_type=True)  # type: ignore[no-any-return]


def decode(payload: bytes | memoryview) -> Any:
    """Decode one message; anything but a single registered message is a ProtocolError."""
    try:
        obj = msgpack.unpackb(payload, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"undecodable payload: {type(exc).__name__}: {exc}") from exc
    if type(obj) not in _FIELDS:
        raise ProtocolError("payload is not a message")
    return obj


def _ext_header(size: int) -> bytes:
    """The msgpack header of an ext value of ``size`` bytes and code MSG_EXT, in the
    format msgpack itself picks (fixext, ext 8, 16 or 32: the msgpack spec, "ext format
    family"), so a frame built in pieces is byte for byte what ``encode`` gives."""
    fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}.get(size)
    if fixed is not None:
        return bytes((fixed, MSG_EXT))
    if size < 1 << 8:
        return struct.pack(">BBb", 0xC7, size, MSG_EXT)
    if size < 1 << 16:
        return struct.pack(">BHb", 0xC8, size, MSG_EXT)
    return struct.pack(">BIb", 0xC9, size, MSG_EXT)


def frame(msg: Any) -> bytes:
    """One message as a frame: 4-byte big-endian length, then the payload.

    Built from its pieces with one join: packing the message's ext value whole would copy
    a large bytes field (a stream's data) twice more, a third of a relay's time.
    """
    fields = _FIELDS.get(type(msg))
    if fields is None:
        payload = encode(msg)  # raises the TypeError for an unregistered type
        return HEADER.pack(len(payload)) + payload
    body = msgpack.packb(
        [type(msg).__name__, [getattr(msg, f) for f in fields]],
        default=_default,
        use_bin_type=True,
    )
    head = _ext_header(len(body))
    return b"".join((HEADER.pack(len(head) + len(body)), head, body))


class FrameDecoder:
    """Turns a byte stream into messages; refuses frames above ``max_frame`` bytes.

    After an error the decoder is poisoned: the stream has lost framing and the
    connection must be closed.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._broken: ProtocolError | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> list[Any]:
        """The messages completed by ``data``. Whole frames are decoded where they lie
        (a memoryview, no copy); only a partial frame is kept, in one buffer."""
        if self._broken is not None:
            raise self._broken
        if self._buf:
            self._buf += data
            data = self._buf
        view = memoryview(data)
        out: list[Any] = []
        at = 0
        try:
            while len(view) - at >= HEADER.size:
                (length,) = HEADER.unpack_from(view, at)
                if length > self.max_frame:
                    raise FrameTooLarge(f"frame of {length} bytes exceeds {self.max_frame}")
                end = at + HEADER.size + length
                if len(view) < end:
                    break
                out.append(decode(view[at + HEADER.size : end]))
                at = end
        except ProtocolError as exc:
            self._broken = exc
            raise
        finally:
            view.release()
        if data is self._buf:
            del self._buf[:at]
        else:
            self._buf = bytearray(data[at:])
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)


Encoder = Callable[[Any], bytes]
