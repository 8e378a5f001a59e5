"""Property tests of the sans-IO codec: what goes in comes out, and bad bytes only ever
raise ``ProtocolError`` (a peer must not be able to make us raise anything else)."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
from dataclasses import dataclass
from typing import Any, Literal

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dunix.errors import FrameTooLarge, ProtocolError
from dunix.wire import DEFAULT_MAX_FRAME, FrameDecoder, decode, encode, frame, message
from dunix.wire._codec import HEADER, MSG_EXT


@message
@dataclass(frozen=True)
class CodecTestLeaf:
    name: str
    n: int
    blob: bytes
    ratio: float
    flag: bool
    opt: int | None


@message
@dataclass(frozen=True)
class CodecTestTree:
    label: str
    leaves: tuple[CodecTestLeaf, ...]
    tags: dict[str, int]
    pair: tuple[int, str]
    child: CodecTestTree | None


class CodecTestColor(enum.IntEnum):
    RED = 1
    BLUE = 2


@message
@dataclass(frozen=True)
class CodecTestKinds:
    color: CodecTestColor
    mode: Literal["a", "b"]
    nums: list[int]
    anything: Any
    bare: tuple  # type: ignore[type-arg]


ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
leaves = st.builds(
    CodecTestLeaf,
    name=st.text(max_size=20),
    n=ints,
    blob=st.binary(max_size=40),
    ratio=st.floats(allow_nan=False),
    flag=st.booleans(),
    opt=st.none() | ints,
)
trees: st.SearchStrategy[CodecTestTree] = st.deferred(
    lambda: st.builds(
        CodecTestTree,
        label=st.text(max_size=10),
        leaves=st.lists(leaves, max_size=3).map(tuple),
        tags=st.dictionaries(st.text(max_size=5), ints, max_size=3),
        pair=st.tuples(ints, st.text(max_size=5)),
        child=st.none() | trees,
    )
)
messages = leaves | trees

# plain msgpack values that are not messages
plain = st.recursive(
    st.none() | st.booleans() | ints | st.floats() | st.text(max_size=10) | st.binary(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=10,
)


def _ext(name: str, values: list[Any]) -> bytes:
    body = msgpack.packb([name, values], use_bin_type=True)
    return msgpack.packb(msgpack.ExtType(MSG_EXT, body), use_bin_type=True)  # type: ignore[no-any-return]


@given(messages)
def test_round_trip(msg: Any) -> None:
    back = decode(encode(msg))
    assert back == msg
    while isinstance(back, CodecTestTree):  # declared tuples come back as tuples, not lists
        assert type(back.leaves) is tuple and type(back.pair) is tuple
        back = back.child
    assert FrameDecoder().feed(frame(msg)) == [msg]


@given(st.lists(messages, max_size=6), st.data())
def test_any_split_decodes_the_same(msgs: list[Any], data: st.DataObject) -> None:
    stream = b"".join(frame(m) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    decoder = FrameDecoder()
    out: list[Any] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        out += decoder.feed(stream[start:end])
    assert out == msgs
    assert decoder.buffered == 0


@given(st.binary(max_size=200))
def test_garbage_payload_raises_only_protocol_error(payload: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode(payload)


@given(messages, st.data())
def test_mutated_payload_raises_only_protocol_error(msg: Any, data: st.DataObject) -> None:
    """Random bytes rarely get past the outer layer; damaged real messages go deeper."""
    payload = bytearray(encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(payload) - 1))
        payload[i] = data.draw(st.integers(0, 255))
    with contextlib.suppress(ProtocolError):
        back = decode(bytes(payload))
        assert type(back) in (CodecTestLeaf, CodecTestTree)


@given(st.binary(max_size=300), st.integers(1, 64))
def test_garbage_stream_raises_only_protocol_error(data: bytes, chunk: int) -> None:
    decoder = FrameDecoder(max_frame=100)
    try:
        for i in range(0, len(data), chunk):
            decoder.feed(data[i : i + chunk])
    except ProtocolError:
        pass


@given(messages, st.data())
def test_truncated_payload_raises(msg: Any, data: st.DataObject) -> None:
    payload = encode(msg)
    cut = data.draw(st.integers(0, len(payload) - 1))
    with pytest.raises(ProtocolError):
        decode(payload[:cut])


@given(plain)
def test_plain_value_is_not_a_message(value: Any) -> None:
    with pytest.raises(ProtocolError):
        decode(msgpack.packb(value, use_bin_type=True))


@given(leaves, st.data())
def test_wrong_field_type_raises(leaf: CodecTestLeaf, data: st.DataObject) -> None:
    values = [getattr(leaf, f.name) for f in dataclasses.fields(leaf)]
    i = data.draw(st.integers(0, len(values) - 1))
    # a list fits none of the leaf's field types
    values[i] = data.draw(st.lists(ints, max_size=2))
    with pytest.raises(ProtocolError):
        decode(_ext("CodecTestLeaf", values))


@pytest.mark.parametrize(
    "payload",
    [
        _ext("CodecTestLeaf", ["a", 1]),  # too few fields
        _ext("NoSuchMessage", []),  # unknown type
        _ext("CodecTestLeaf", ["a", True, b"", 1.0, False, None]),  # bool is no int
        _ext("CodecTestTree", ["t", [], {}, [1], None]),  # pair of wrong length
        _ext("CodecTestTree", ["t", [["x"]], {}, [1, "a"], None]),  # leaf that is a list
        msgpack.packb(msgpack.ExtType(7, b"\x90")),  # unknown ext code
        msgpack.packb(msgpack.ExtType(MSG_EXT, msgpack.packb("just a string"))),
        encode(CodecTestLeaf("a", 1, b"", 1.0, False, None)) + b"\x00",  # trailing bytes
    ],
)
def test_malformed_messages_raise(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(payload)


def test_enums_literals_lists_and_any() -> None:
    msg = CodecTestKinds(CodecTestColor.BLUE, "b", [1, 2], {"x": [1]}, (1, "a"))
    back = decode(encode(msg))
    assert back == msg and back.color is CodecTestColor.BLUE and type(back.bare) is tuple
    for values in (
        [3, "a", [], None, []],  # no such enum member
        [1, "c", [], None, []],  # not one of the literals
        [1, "a", ["x"], None, []],  # list of the wrong items
        [1, "a", [], None, "not a tuple"],
    ):
        with pytest.raises(ProtocolError):
            decode(_ext("CodecTestKinds", values))


def test_int_widens_to_float() -> None:
    assert decode(_ext("CodecTestLeaf", ["a", 1, b"", 2, False, None])).ratio == 2.0


@given(st.integers(101, 2**32 - 1))
def test_oversized_frame_raises_frame_too_large(length: int) -> None:
    decoder = FrameDecoder(max_frame=100)
    with pytest.raises(FrameTooLarge):
        decoder.feed(HEADER.pack(length))  # refused on the header alone, before any body


def test_default_limit() -> None:
    with pytest.raises(FrameTooLarge):
        FrameDecoder().feed(HEADER.pack(DEFAULT_MAX_FRAME + 1))


@given(messages)
def test_decoder_poisoned_after_error(msg: Any) -> None:
    decoder = FrameDecoder()
    bad = b"\xc1"  # a byte msgpack never uses
    with pytest.raises(ProtocolError):
        decoder.feed(HEADER.pack(len(bad)) + bad)
    with pytest.raises(ProtocolError):
        decoder.feed(frame(msg))  # framing is lost: even good data is refused now


def test_message_must_be_frozen_dataclass() -> None:
    class NotADataclass:
        pass

    @dataclass
    class Mutable:
        x: int

    with pytest.raises(TypeError):
        message(NotADataclass)
    with pytest.raises(TypeError):
        message(Mutable)


def test_unregistered_message_cannot_be_encoded() -> None:
    @dataclass(frozen=True)
    class Stray:
        x: int

    with pytest.raises(TypeError):
        encode(Stray(1))
