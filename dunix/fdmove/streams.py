"""Sans-IO byte streams multiplexed over one agent-to-agent channel.

A stream carries the bytes of one local fd one way: the *sending* side reads its fd and
sends ``StreamData``; the *receiving* side writes them into its fd. A read-write fd (a tty,
a socket) is two streams. Both agents register the stream under the same id, one as
sender and one as receiver, in any order.

Protocol, per stream (the channel keeps order):

* The receiver opens with ``StreamCredit(window)``: that first grant announces its window.
  The sender sends nothing before it, so data never reaches a side that has not
  registered the stream yet. Credits that reach a sender before it has registered the
  stream are kept until it does (at most ``MAX_EARLY`` such streams).
* The sender never has more than the window in flight (sent, not yet credited back); the
  receiver returns credit as it writes bytes out, in batches of a quarter window.
* Each side ends with exactly one final message: the sender ``StreamEnd`` (its fd reached
  EOF, or it stopped because the receiver went away), the receiver ``StreamGone`` (it has
  written everything after an end, or its reader went away: EPIPE). A side forgets the
  stream once it has sent and received its final message, so ids are never reused: the
  ids a side allocates are odd or even (``StreamMux(odd=...)``) and increase.

Anything else from the peer (data beyond credit, credit above the window, data or an end
for a stream nobody registered) is a ``ProtocolError``: the channel must be closed.

Nothing here does IO: the relay (``dunix.fdmove.relay``) reports what happened to its fd
and sends the messages the methods return, in the order returned.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dunix.errors import ProtocolError
from dunix.wire import message

#: the default receive window per stream: what a slow reader can make its agent hold.
#: 1 MiB measured as fast as 2 or 4 MiB over loopback TLS (bench/relay_bench.py).
DEFAULT_WINDOW = 1024 * 1024
#: how many not yet registered streams may have early credit waiting
MAX_EARLY = 1024


@message
@dataclass(frozen=True)
class StreamData:
    stream: int
    data: bytes


@message
@dataclass(frozen=True)
class StreamEnd:
    """Sender's final word: no more data (EOF, or it stopped after ``StreamGone``)."""

    stream: int


@message
@dataclass(frozen=True)
class StreamGone:
    """Receiver's final word: it will write no more (its reader went away, or all written)."""

    stream: int


@message
@dataclass(frozen=True)
class StreamCredit:
    """The receiver grants ``nbytes`` more; the first one of a stream is its window."""

    stream: int
    nbytes: int


STREAM_MESSAGES: tuple[type[Any], ...] = (StreamData, StreamEnd, StreamGone, StreamCredit)
StreamMessage = StreamData | StreamEnd | StreamGone | StreamCredit


class Role(enum.Enum):
    SEND = "send"  # reads the local fd
    RECEIVE = "receive"  # writes the local fd


class State(enum.Enum):
    WAITING = "waiting"  # sender: registered, the receiver's opening credit not here yet
    OPEN = "open"  # data flows
    ENDED = "ended"  # sender: sent StreamEnd, waits for StreamGone
    PEER_GONE = "peer-gone"  # sender: got StreamGone; must close its fd and send StreamEnd
    DRAINING = "draining"  # receiver: got StreamEnd, still writing out what it holds
    GONE = "gone"  # receiver: sent StreamGone (EPIPE or stopped), waits for StreamEnd
    CLOSED = "closed"  # both final messages exchanged; forgotten


class Event(enum.Enum):
    CREDIT = "credit"  # StreamCredit received
    DATA = "data"  # StreamData received
    END = "end"  # StreamEnd received
    GONE = "gone"  # StreamGone received
    LOCAL_EOF = "local-eof"  # sender's fd at EOF, or the agent stops the stream
    LOCAL_GONE = "local-gone"  # receiver's fd refused a write (EPIPE), or the agent stops it
    FLUSHED = "flushed"  # receiver wrote out everything after the end
    FINISH = "finish"  # sender closed its fd after the peer went away


#: (role, state, event) -> next state; a pair missing here is a protocol error if the
#: event came from the peer, and a bug of the relay if it is local.
TRANSITIONS: Mapping[tuple[Role, State, Event], State] = {
    (Role.SEND, State.WAITING, Event.CREDIT): State.OPEN,
    (Role.SEND, State.WAITING, Event.GONE): State.PEER_GONE,
    (Role.SEND, State.OPEN, Event.CREDIT): State.OPEN,
    (Role.SEND, State.OPEN, Event.LOCAL_EOF): State.ENDED,
    (Role.SEND, State.OPEN, Event.GONE): State.PEER_GONE,
    (Role.SEND, State.ENDED, Event.CREDIT): State.ENDED,  # credit sent before our end
    (Role.SEND, State.ENDED, Event.GONE): State.CLOSED,
    (Role.SEND, State.PEER_GONE, Event.LOCAL_EOF): State.PEER_GONE,
    (Role.SEND, State.PEER_GONE, Event.FINISH): State.CLOSED,
    (Role.RECEIVE, State.OPEN, Event.DATA): State.OPEN,
    (Role.RECEIVE, State.OPEN, Event.END): State.DRAINING,
    (Role.RECEIVE, State.OPEN, Event.LOCAL_GONE): State.GONE,
    (Role.RECEIVE, State.DRAINING, Event.FLUSHED): State.CLOSED,
    (Role.RECEIVE, State.DRAINING, Event.LOCAL_GONE): State.CLOSED,
    (Role.RECEIVE, State.GONE, Event.DATA): State.GONE,  # was in flight; dropped
    (Role.RECEIVE, State.GONE, Event.END): State.CLOSED,
    (Role.RECEIVE, State.GONE, Event.LOCAL_GONE): State.GONE,
}

_FROM_PEER = {Event.CREDIT, Event.DATA, Event.END, Event.GONE}


@dataclass
class StreamInfo:
    """What the mux knows of one stream (read-only for callers)."""

    id: int
    role: Role
    state: State
    window: int = 0
    #: sender: bytes it may still send; receiver: bytes the peer may still send
    credit: int = 0
    #: receiver: bytes received and not yet reported written
    buffered: int = 0
    #: receiver: bytes written but not yet credited back
    unreturned: int = 0
    #: high-water marks, for tests and statistics
    max_in_flight: int = 0
    max_buffered: int = 0
    sent: int = 0
    received: int = 0

    @property
    def in_flight(self) -> int:
        """Sender: bytes sent and not yet credited back."""
        return self.window - self.credit if self.role is Role.SEND and self.window else 0

    @property
    def done(self) -> bool:
        """The local fd has no more work: nothing to send or to write."""
        return self.state in (State.ENDED, State.GONE, State.CLOSED)


class StreamMux:
    """The state of every stream of one peer link, and the credit accounting.

    ``odd`` picks which ids :meth:`allocate` hands out; the two sides of a link must pick
    differently (:func:`odd_side` decides it from the two node names).
    """

    def __init__(
        self, *, odd: bool, window: int = DEFAULT_WINDOW, first: int | None = None
    ) -> None:
        if window <= 0:
            raise ValueError("window must be positive")
        if first is not None and (first <= 0 or first % 2 != (1 if odd else 0)):
            raise ValueError(
                f"first stream id {first} is not a positive {'odd' if odd else 'even'} id"
            )
        self.window = window
        self._next = first if first is not None else 1 if odd else 2
        self._streams: dict[int, StreamInfo] = {}
        self._early: dict[int, list[StreamCredit | StreamGone]] = {}

    # -- registry ----------------------------------------------------------------------

    def allocate(self) -> int:
        """A fresh stream id of this side's parity, never handed out before."""
        stream = self._next
        self._next += 2
        return stream

    def __contains__(self, stream: int) -> bool:
        return stream in self._streams

    def __len__(self) -> int:
        return len(self._streams)

    def info(self, stream: int) -> StreamInfo:
        try:
            return self._streams[stream]
        except KeyError:
            raise KeyError(f"no stream {stream}") from None

    def open_sender(self, stream: int) -> None:
        """Register a stream this side sends on; early credit from the peer applies now."""
        info = self._register(stream, Role.SEND, State.WAITING)
        for msg in self._early.pop(stream, []):
            self._peer_event(info, msg)

    def open_receiver(self, stream: int) -> list[StreamMessage]:
        """Register a stream this side receives on; returns the opening credit to send."""
        if stream in self._early:
            raise ProtocolError(f"stream {stream}: credit from the peer, but it is ours to give")
        info = self._register(stream, Role.RECEIVE, State.OPEN)
        info.window = info.credit = self.window
        return [StreamCredit(stream, self.window)]

    def _register(self, stream: int, role: Role, state: State) -> StreamInfo:
        if stream <= 0:
            raise ValueError(f"stream ids are positive, not {stream}")
        if stream in self._streams:
            raise ValueError(f"stream {stream} is already open")
        info = self._streams[stream] = StreamInfo(stream, role, state)
        return info

    # -- transitions -------------------------------------------------------------------

    def _move(self, info: StreamInfo, event: Event) -> None:
        new = TRANSITIONS.get((info.role, info.state, event))
        if new is None:
            what = f"stream {info.id} ({info.role.value}, {info.state.value}): unexpected"
            if event in _FROM_PEER:
                raise ProtocolError(f"{what} {event.value} from the peer")
            raise RuntimeError(f"{what} local {event.value}")
        info.state = new
        if new is State.CLOSED:
            del self._streams[info.id]

    def _local(self, stream: int, role: Role) -> StreamInfo:
        info = self.info(stream)
        if info.role is not role:
            raise RuntimeError(f"stream {stream} is a {info.role.value} stream")
        return info

    # -- sender side: what happened to the local fd ------------------------------------

    def sendable(self, stream: int) -> int:
        """How many bytes the sender may read and send now (0 while waiting for credit)."""
        info = self._local(stream, Role.SEND)
        return info.credit if info.state is State.OPEN else 0

    def read(self, stream: int, data: bytes) -> list[StreamMessage]:
        """The sender read ``data`` from its fd: the message that carries it."""
        info = self._local(stream, Role.SEND)
        if info.state is not State.OPEN or len(data) > info.credit:
            raise RuntimeError(f"stream {stream}: read {len(data)} bytes beyond credit")
        info.credit -= len(data)
        info.sent += len(data)
        info.max_in_flight = max(info.max_in_flight, info.in_flight)
        return [StreamData(stream, data)]

    def local_eof(self, stream: int) -> list[StreamMessage]:
        """The sender's fd reached EOF, or the agent stops reading it.

        Returns the ``StreamEnd`` to send, or nothing if the peer is already gone (then
        :meth:`finish` sends it). Not allowed before the opening credit: an end must not
        reach a peer that has not registered the stream, so the relay waits for it.
        """
        info = self._local(stream, Role.SEND)
        before = info.state
        self._move(info, Event.LOCAL_EOF)
        return [StreamEnd(stream)] if before is State.OPEN else []

    def finish(self, stream: int) -> list[StreamMessage]:
        """The sender closed its fd after ``StreamGone``: its final ``StreamEnd``."""
        info = self._local(stream, Role.SEND)
        self._move(info, Event.FINISH)
        return [StreamEnd(stream)]

    # -- receiver side -----------------------------------------------------------------

    def written(self, stream: int, nbytes: int) -> list[StreamMessage]:
        """The receiver wrote ``nbytes`` into its fd: credit to return, in batches."""
        info = self._local(stream, Role.RECEIVE)
        if nbytes > info.buffered:
            raise RuntimeError(f"stream {stream}: wrote {nbytes} of {info.buffered} held")
        info.buffered -= nbytes
        if info.state is not State.OPEN:
            return []
        info.unreturned += nbytes
        if info.unreturned < max(1, self.window // 4):
            return []
        grant, info.unreturned = info.unreturned, 0
        info.credit += grant
        return [StreamCredit(stream, grant)]

    def local_gone(self, stream: int) -> list[StreamMessage]:
        """The receiver's fd refused a write (EPIPE), or the agent stops writing it."""
        info = self._local(stream, Role.RECEIVE)
        before = info.state
        info.buffered = 0
        self._move(info, Event.LOCAL_GONE)
        return [] if before is State.GONE else [StreamGone(stream)]

    def flushed(self, stream: int) -> list[StreamMessage]:
        """The receiver wrote out everything after the peer's end: its final word."""
        info = self._local(stream, Role.RECEIVE)
        if info.buffered:
            raise RuntimeError(f"stream {stream}: {info.buffered} bytes still held")
        self._move(info, Event.FLUSHED)
        return [StreamGone(stream)]

    # -- messages from the peer --------------------------------------------------------

    def receive(self, msg: StreamMessage) -> StreamInfo | None:
        """Apply a message from the peer; returns the stream's info (None: kept for later).

        The caller wakes the stream's relay afterwards: new data to write, credit to send
        with, an end, or a peer that went away.
        """
        info = self._streams.get(msg.stream)
        if info is None:
            self._keep_early(msg)
            return None
        self._peer_event(info, msg)
        return info

    def _keep_early(self, msg: StreamMessage) -> None:
        if not isinstance(msg, StreamCredit | StreamGone):
            raise ProtocolError(f"{type(msg).__name__} for unknown stream {msg.stream}")
        if msg.stream <= 0:
            raise ProtocolError(f"stream ids are positive, not {msg.stream}")
        if msg.stream not in self._early and len(self._early) >= MAX_EARLY:
            raise ProtocolError(f"more than {MAX_EARLY} unknown streams credited")
        kept = self._early.setdefault(msg.stream, [])
        if len(kept) >= 2:  # an opening credit and a gone at most
            raise ProtocolError(f"too many messages for unknown stream {msg.stream}")
        kept.append(msg)

    def _peer_event(self, info: StreamInfo, msg: StreamMessage) -> None:
        if isinstance(msg, StreamCredit):
            self._credit(info, msg.nbytes)
        elif isinstance(msg, StreamData):
            self._data(info, len(msg.data))
        elif isinstance(msg, StreamEnd):
            self._move(info, Event.END)
        else:
            self._move(info, Event.GONE)

    def _credit(self, info: StreamInfo, nbytes: int) -> None:
        if nbytes <= 0:
            raise ProtocolError(f"stream {info.id}: credit of {nbytes}")
        opening = info.state is State.WAITING
        self._move(info, Event.CREDIT)
        if opening:
            info.window = info.credit = nbytes
            return
        if info.state is State.OPEN:
            if info.credit + nbytes > info.window:
                raise ProtocolError(
                    f"stream {info.id}: credit overflow ({info.credit} + {nbytes} "
                    f"> window {info.window})"
                )
            info.credit += nbytes

    def _data(self, info: StreamInfo, nbytes: int) -> None:
        self._move(info, Event.DATA)
        if nbytes > info.credit:
            raise ProtocolError(f"stream {info.id}: {nbytes} bytes beyond credit {info.credit}")
        info.credit -= nbytes
        info.received += nbytes
        if info.state is State.OPEN:
            info.buffered += nbytes
            info.max_buffered = max(info.max_buffered, info.buffered)
        info.max_in_flight = max(info.max_in_flight, info.window - info.credit)

    def streams(self) -> list[StreamInfo]:
        return list(self._streams.values())


def fresh_first(odd: bool) -> int:
    """A random first stream id of the given parity, for a mux that replaces another.

    When a link breaks, or the peer's agent restarts, one side starts a new mux while the
    other may still hold streams of the old one; ids counted again from 1 would collide
    with those ("stream 1 is already open"). Starting at a random point of a 2**41 space
    makes such a reuse as unlikely as a lost frame going unnoticed.
    """
    return secrets.randbelow(1 << 40) * 2 + (1 if odd else 2)


def odd_side(local_name: str, peer_name: str) -> bool:
    """Which parity of stream ids this node allocates on its link with ``peer_name``.

    Any rule works as long as the two ends disagree; comparing names needs no knowledge
    of who dialled whom.
    """
    if local_name == peer_name:
        raise ValueError("a link needs two different node names")
    return local_name < peer_name
