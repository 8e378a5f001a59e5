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

Pull mode (a pipe's read end held by a process elsewhere, ``open_receiver(pull=True)``):
a process that inherited a read end and never reads it must not take anything from the
pipe, so the sender reads only what a reader on the receiving side asked for.

* The receiver opens with ``StreamPull(window)`` instead: the sender is open, with no credit.
* The sender, holding no credit while its fd has data waiting, says ``StreamReady`` once
  (again only after its next grant). The receiver then looks for a reader blocked on its
  side (dunix.fdmove.inventory.blocked_readers) and, when it finds one asking for N bytes,
  sends ``StreamWant(N)``: the sender may send one ``StreamData`` of at most N bytes, as
  the blocked read itself would have taken them, and the want is spent.
* After ``STREAM_AFTER`` wants of at least ``STREAM_MIN_READ`` bytes served in a row the
  reader is taken to be a steady reader: the receiver grants ``STREAM_READS`` reads' worth
  (at most its window) as ``StreamCredit``, and the stream goes on as above with that
  window. A reader that then stops may have taken up to that much (and what its pipe
  holds) beyond what it read: like a local reader's own buffer, only bigger.
* An end (EOF) needs no grant: the sender sends ``StreamEnd`` when its fd is at EOF.

Hand-over (``dunix.fdmove.bulk``): a sender that has carried enough on a credited stream
may send ``StreamBulk(address, key)`` after its last ``StreamData``: the rest of the
stream goes on a connection of its own between two native relays. Both sides are then in
``BULK``: credit, wants and readiness still in flight are ignored, no more ``StreamData``
may come, and each side sends its final word (``StreamEnd``, ``StreamGone``) when its
relay has exited, as above.

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
#: Four frames of relay.DEFAULT_CHUNK (1 MiB), so credit returned in quarters keeps one
#: frame's worth moving while the rest is written (bench/relay_bench.py --cluster).
DEFAULT_WINDOW = 4 * 1024 * 1024
#: how many not yet registered streams may have early credit waiting
MAX_EARLY = 1024
#: pull mode: wants of at least STREAM_MIN_READ bytes served in a row before credit is
#: granted (a reader reading in small pieces, as a shell's `read` does byte by byte so as
#: to leave the rest for others, is served read by read for good)
STREAM_AFTER = 3
STREAM_MIN_READ = 4096
#: pull mode: the credit granted then, in reads of the size last wanted (capped by the window)
STREAM_READS = 4


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


@message
@dataclass(frozen=True)
class StreamPull:
    """A pull-mode receiver's opening: its window, and no credit yet."""

    stream: int
    window: int


@message
@dataclass(frozen=True)
class StreamWant:
    """Pull mode: a reader waits for up to ``nbytes``; the sender may send one StreamData."""

    stream: int
    nbytes: int


@message
@dataclass(frozen=True)
class StreamReady:
    """Pull mode: the sender has data waiting and nothing to send it with."""

    stream: int


@message
@dataclass(frozen=True)
class StreamBulk:
    """The sender moves the rest of the stream to a connection of its own: its relay
    listens at ``address`` (an empty host: the sender's agent address) and proves ``key``
    (dunix.fdmove.bulk). Sent only on the agents' authenticated channel."""

    stream: int
    address: str
    key: bytes


STREAM_MESSAGES: tuple[type[Any], ...] = (
    StreamData, StreamEnd, StreamGone, StreamCredit, StreamPull, StreamWant, StreamReady,
    StreamBulk,
)  # fmt: skip
StreamMessage = (
    StreamData | StreamEnd | StreamGone | StreamCredit | StreamPull | StreamWant | StreamReady
    | StreamBulk
)  # fmt: skip


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
    BULK = "bulk"  # the bytes go on a connection of their own (StreamBulk)


class Event(enum.Enum):
    CREDIT = "credit"  # StreamCredit received
    PULL = "pull"  # StreamPull received (a pull-mode opening)
    WANT = "want"  # StreamWant received
    READY = "ready"  # StreamReady received
    DATA = "data"  # StreamData received
    END = "end"  # StreamEnd received
    GONE = "gone"  # StreamGone received
    LOCAL_EOF = "local-eof"  # sender's fd at EOF, or the agent stops the stream
    LOCAL_GONE = "local-gone"  # receiver's fd refused a write (EPIPE), or the agent stops it
    FLUSHED = "flushed"  # receiver wrote out everything after the end
    FINISH = "finish"  # sender closed its fd after the peer went away
    BULK = "bulk"  # StreamBulk received
    LOCAL_BULK = "local-bulk"  # the sender hands the stream to its native relay


#: (role, state, event) -> next state; a pair missing here is a protocol error if the
#: event came from the peer, and a bug of the relay if it is local.
TRANSITIONS: Mapping[tuple[Role, State, Event], State] = {
    (Role.SEND, State.WAITING, Event.CREDIT): State.OPEN,
    (Role.SEND, State.WAITING, Event.PULL): State.OPEN,
    (Role.SEND, State.WAITING, Event.GONE): State.PEER_GONE,
    (Role.SEND, State.OPEN, Event.WANT): State.OPEN,
    (Role.SEND, State.ENDED, Event.WANT): State.ENDED,  # sent before our end
    (Role.SEND, State.PEER_GONE, Event.WANT): State.PEER_GONE,
    (Role.SEND, State.OPEN, Event.CREDIT): State.OPEN,
    (Role.SEND, State.OPEN, Event.LOCAL_EOF): State.ENDED,
    (Role.SEND, State.OPEN, Event.GONE): State.PEER_GONE,
    (Role.SEND, State.ENDED, Event.CREDIT): State.ENDED,  # credit sent before our end
    (Role.SEND, State.ENDED, Event.GONE): State.CLOSED,
    (Role.SEND, State.PEER_GONE, Event.LOCAL_EOF): State.PEER_GONE,
    (Role.SEND, State.PEER_GONE, Event.FINISH): State.CLOSED,
    (Role.RECEIVE, State.OPEN, Event.DATA): State.OPEN,
    (Role.RECEIVE, State.OPEN, Event.END): State.DRAINING,
    (Role.RECEIVE, State.OPEN, Event.READY): State.OPEN,
    (Role.RECEIVE, State.DRAINING, Event.READY): State.DRAINING,  # sent before its end
    (Role.RECEIVE, State.GONE, Event.READY): State.GONE,
    (Role.RECEIVE, State.OPEN, Event.LOCAL_GONE): State.GONE,
    (Role.RECEIVE, State.DRAINING, Event.FLUSHED): State.CLOSED,
    (Role.RECEIVE, State.DRAINING, Event.LOCAL_GONE): State.CLOSED,
    (Role.RECEIVE, State.GONE, Event.DATA): State.GONE,  # was in flight; dropped
    (Role.RECEIVE, State.GONE, Event.END): State.CLOSED,
    (Role.RECEIVE, State.GONE, Event.LOCAL_GONE): State.GONE,
    # the hand-over; a bulk side's end is LOCAL_EOF / LOCAL_GONE once its relay exited
    (Role.SEND, State.OPEN, Event.LOCAL_BULK): State.BULK,
    (Role.SEND, State.BULK, Event.CREDIT): State.BULK,  # sent before the hand-over
    (Role.SEND, State.BULK, Event.WANT): State.BULK,
    (Role.SEND, State.BULK, Event.GONE): State.PEER_GONE,
    (Role.SEND, State.BULK, Event.LOCAL_EOF): State.ENDED,
    (Role.RECEIVE, State.OPEN, Event.BULK): State.BULK,
    (Role.RECEIVE, State.GONE, Event.BULK): State.GONE,  # crossed our StreamGone
    (Role.RECEIVE, State.BULK, Event.READY): State.BULK,
    (Role.RECEIVE, State.BULK, Event.END): State.DRAINING,
    (Role.RECEIVE, State.BULK, Event.LOCAL_GONE): State.GONE,
}

_FROM_PEER = {
    Event.CREDIT, Event.DATA, Event.END, Event.GONE, Event.PULL, Event.WANT, Event.READY,
    Event.BULK,
}  # fmt: skip


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
    #: pull mode (see the module docstring)
    pull: bool = False
    #: sender: the bytes of the one read the peer's reader waits for (0: none);
    #: receiver: the want it sent and has not seen data for yet
    want: int = 0
    #: sender: said StreamReady since its last grant; receiver: got one since its last want
    ready: bool = False
    #: receiver: big wants served in a row; at STREAM_AFTER credit is granted; sender:
    #: credit grants received
    served: int = 0
    #: receiver: the credit granted to a steady pull reader (0: the window)
    granted: int = 0

    @property
    def probing(self) -> bool:
        """Pull receiver: the peer has data waiting and nothing here asks for it yet, so
        the relay should look for a reader blocked on its fd (and call ``demand``)."""
        return (
            self.pull and self.ready and self.state is State.OPEN
            and not (self.want or self.credit or self.buffered)
        )  # fmt: skip

    @property
    def in_flight(self) -> int:
        """Sender: bytes sent and not yet credited back."""
        if self.role is not Role.SEND or not self.window or (self.pull and not self.served):
            return 0  # a pull sender holds no window until the first one is granted
        return self.window - self.credit

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
        self._early: dict[int, list[StreamCredit | StreamGone | StreamPull]] = {}

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

    def open_receiver(self, stream: int, *, pull: bool = False) -> list[StreamMessage]:
        """Register a stream this side receives on; returns the opening to send: its
        window as credit, or with ``pull`` a ``StreamPull`` (no data until wanted)."""
        if stream in self._early:
            raise ProtocolError(f"stream {stream}: credit from the peer, but it is ours to give")
        info = self._register(stream, Role.RECEIVE, State.OPEN)
        info.window = self.window
        if pull:
            info.pull = True
            return [StreamPull(stream, self.window)]
        info.credit = self.window
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
        """How many bytes the sender may read and send now (0 while waiting for credit).

        A pull-mode want is one read: read it with a single read of at most this much."""
        info = self._local(stream, Role.SEND)
        if info.state is not State.OPEN:
            return 0
        return info.want or info.credit

    def read(self, stream: int, data: bytes) -> list[StreamMessage]:
        """The sender read ``data`` from its fd: the message that carries it."""
        info = self._local(stream, Role.SEND)
        if info.state is not State.OPEN or len(data) > (info.want or info.credit):
            raise RuntimeError(f"stream {stream}: read {len(data)} bytes beyond credit")
        if info.want:
            info.want = 0  # one read per want, whatever it got
        else:
            info.credit -= len(data)
        info.sent += len(data)
        info.max_in_flight = max(info.max_in_flight, info.in_flight)
        return [StreamData(stream, data)]

    def ready(self, stream: int) -> list[StreamMessage]:
        """A pull-mode sender's fd has data and it holds no grant: ``StreamReady``, once
        per grant (nothing if it said so already, holds a grant, or is not pulled)."""
        info = self._local(stream, Role.SEND)
        if not info.pull or info.ready or info.state is not State.OPEN or info.want or info.credit:
            return []
        info.ready = True
        return [StreamReady(stream)]

    def local_eof(self, stream: int) -> list[StreamMessage]:
        """The sender's fd reached EOF, or the agent stops reading it.

        Returns the ``StreamEnd`` to send, or nothing if the peer is already gone (then
        :meth:`finish` sends it). Not allowed before the opening credit: an end must not
        reach a peer that has not registered the stream, so the relay waits for it.
        """
        info = self._local(stream, Role.SEND)
        before = info.state
        self._move(info, Event.LOCAL_EOF)
        return [StreamEnd(stream)] if before in (State.OPEN, State.BULK) else []

    def bulk(self, stream: int, address: str, key: bytes) -> list[StreamMessage]:
        """The sender hands the stream to its relay listening at ``address``: the
        ``StreamBulk`` to send. Only on a credited stream (not while a pull reader's
        want is served read by read) with nothing wanted."""
        info = self._local(stream, Role.SEND)
        if info.state is not State.OPEN or info.want or (info.pull and not info.served):
            raise RuntimeError(f"stream {stream}: no hand-over while {info.state.value}")
        self._move(info, Event.LOCAL_BULK)
        info.credit = 0
        return [StreamBulk(stream, address, key)]

    def finish(self, stream: int) -> list[StreamMessage]:
        """The sender closed its fd after ``StreamGone``: its final ``StreamEnd``."""
        info = self._local(stream, Role.SEND)
        self._move(info, Event.FINISH)
        return [StreamEnd(stream)]

    # -- receiver side -----------------------------------------------------------------

    def demand(self, stream: int, nbytes: int) -> list[StreamMessage]:
        """Pull mode: a reader here blocks reading up to ``nbytes`` (only while
        ``probing``): one want, or, for a steady reader, the whole window as credit."""
        info = self._local(stream, Role.RECEIVE)
        if not info.probing or nbytes <= 0:
            raise RuntimeError(f"stream {stream}: demand of {nbytes} while not probing")
        info.ready = False
        if info.served >= STREAM_AFTER and nbytes >= STREAM_MIN_READ:
            info.granted = min(info.window, STREAM_READS * nbytes)
            info.credit, info.unreturned = info.granted, 0
            return [StreamCredit(stream, info.granted)]
        info.want = min(nbytes, info.window)
        return [StreamWant(stream, info.want)]

    def written(self, stream: int, nbytes: int) -> list[StreamMessage]:
        """The receiver wrote ``nbytes`` into its fd: credit to return, in batches."""
        info = self._local(stream, Role.RECEIVE)
        if nbytes > info.buffered:
            raise RuntimeError(f"stream {stream}: wrote {nbytes} of {info.buffered} held")
        info.buffered -= nbytes
        if info.state is not State.OPEN or (info.pull and not info.granted):
            return []  # a pull stream's wants are not credit: nothing to give back
        info.unreturned += nbytes
        if info.unreturned < max(1, (info.granted or self.window) // 4):
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
        if not isinstance(msg, StreamCredit | StreamGone | StreamPull):
            raise ProtocolError(f"{type(msg).__name__} for unknown stream {msg.stream}")
        if msg.stream <= 0:
            raise ProtocolError(f"stream ids are positive, not {msg.stream}")
        if msg.stream not in self._early and len(self._early) >= MAX_EARLY:
            raise ProtocolError(f"more than {MAX_EARLY} unknown streams credited")
        kept: list[StreamCredit | StreamGone | StreamPull] = self._early.setdefault(msg.stream, [])
        if len(kept) >= 2:  # an opening credit and a gone at most
            raise ProtocolError(f"too many messages for unknown stream {msg.stream}")
        kept.append(msg)

    def _peer_event(self, info: StreamInfo, msg: StreamMessage) -> None:
        if isinstance(msg, StreamCredit):
            self._credit(info, msg.nbytes)
        elif isinstance(msg, StreamPull):
            self._pull(info, msg.window)
        elif isinstance(msg, StreamWant):
            self._want(info, msg.nbytes)
        elif isinstance(msg, StreamReady):
            self._move(info, Event.READY)
            info.ready = True
        elif isinstance(msg, StreamData):
            self._data(info, len(msg.data))
        elif isinstance(msg, StreamEnd):
            self._move(info, Event.END)
        elif isinstance(msg, StreamBulk):
            self._move(info, Event.BULK)
        else:
            self._move(info, Event.GONE)

    def _credit(self, info: StreamInfo, nbytes: int) -> None:
        if nbytes <= 0:
            raise ProtocolError(f"stream {info.id}: credit of {nbytes}")
        if info.state is State.BULK:
            return self._move(info, Event.CREDIT)
        opening = info.state is State.WAITING
        self._move(info, Event.CREDIT)
        info.ready = False
        if info.pull:
            info.served += 1  # the sender's count of window grants (see in_flight)
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

    def _pull(self, info: StreamInfo, window: int) -> None:
        if window <= 0:
            raise ProtocolError(f"stream {info.id}: window of {window}")
        self._move(info, Event.PULL)
        info.window, info.credit, info.pull = window, 0, True

    def _want(self, info: StreamInfo, nbytes: int) -> None:
        if info.state is State.BULK and 0 < nbytes <= info.window:
            return self._move(info, Event.WANT)
        if not info.pull or info.want or info.credit or not 0 < nbytes <= info.window:
            raise ProtocolError(
                f"stream {info.id}: want of {nbytes} (pull {info.pull}, want {info.want}, "
                f"credit {info.credit}, window {info.window})"
            )
        self._move(info, Event.WANT)
        info.want, info.ready = nbytes, False

    def _data(self, info: StreamInfo, nbytes: int) -> None:
        if info.want and info.role is Role.RECEIVE:
            self._move(info, Event.DATA)
            if nbytes > info.want:
                raise ProtocolError(f"stream {info.id}: {nbytes} bytes beyond want {info.want}")
            info.served = info.served + 1 if info.want >= STREAM_MIN_READ else 0
            info.want = 0
            info.received += nbytes
            if info.state is State.OPEN:
                info.buffered += nbytes
                info.max_buffered = max(info.max_buffered, info.buffered)
            return
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
