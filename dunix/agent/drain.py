"""After a process ended: its relays carry what it left, for as long as bytes move.

A guest's exit goes home only after its output streams relayed what its pipes held when
it ended, and the home's deputy ends only after its receivers wrote what arrived before
that exit (the same channel carries both, in order). A fixed wait cut the output of a
process whose reader was slow; waiting for each stream's end would let a child that
keeps the pipe open (``cmd &`` writing on) hold its parent's exit forever. So: wait while
any byte moves, count only what was there at the exit, and give up after ``DRAIN_IDLE``
seconds without progress.
"""

from __future__ import annotations

import fcntl
import os
import struct
import termios

import trio

from dunix.fdmove import StreamEndpoint
from dunix.fdmove.streams import State as StreamState
from dunix.fdmove.streams import StreamInfo

#: this long without a byte moving ends the wait (the rest is cut)
DRAIN_IDLE = 2.0
#: how often the counters are looked at; also how long a stream that reached its target
#: without ending waits before it counts as flushed
DRAIN_POLL = 0.05


def _stream(endpoint: StreamEndpoint) -> StreamInfo | None:
    try:
        return endpoint.hub.mux.info(endpoint.stream)
    except KeyError:  # forgotten: it has said its last word
        return None


def _queued(endpoint: StreamEndpoint) -> int:
    """Bytes waiting in a sender's fd (FIONREAD; 0 when it cannot tell)."""
    try:
        fd = endpoint.duplicate()
    except OSError:
        return 0
    try:
        raw = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return 0
    finally:
        os.close(fd)
    return int(struct.unpack("i", raw)[0])


def _handed_over(endpoint: StreamEndpoint, info: StreamInfo) -> bool:
    """Whether the stream may have gone to the native relay (dunix/fdmove/bulk.py), whose
    bytes the mux does not count: then only its end says it is flushed."""
    bulk = getattr(endpoint.hub, "bulk", None)
    after = getattr(bulk, "after", None)
    return isinstance(after, int) and info.sent + info.received >= after


def _target(endpoint: StreamEndpoint) -> int:
    """What ``endpoint`` must have relayed to be flushed: a sender, what it sent plus what
    waits in its fd now; a receiver, what it received so far (the peer sends a process's
    exit after its data, on the same channel)."""
    info = _stream(endpoint)
    if info is None:
        return 0
    return info.sent + _queued(endpoint) if endpoint.sending else info.received


def _flushed(endpoint: StreamEndpoint, target: int) -> bool:
    if not endpoint.running:
        return True
    info = _stream(endpoint)
    if info is None:
        return True
    if _handed_over(endpoint, info):
        return False
    if endpoint.sending:
        return info.sent >= target
    # written all it had; once the end came it closes its fd (EOF) at once: wait for that
    return info.received - info.buffered >= target and info.state is StreamState.OPEN


def _progress(endpoints: list[StreamEndpoint]) -> tuple[tuple[int, ...], ...]:
    out = []
    for endpoint in endpoints:
        info = _stream(endpoint)
        if info is not None and endpoint.running:
            out.append((info.sent, info.received, info.buffered, info.unreturned))
    return tuple(out)


async def flush(endpoints: list[StreamEndpoint], idle: float = DRAIN_IDLE) -> bool:
    """Wait until ``endpoints`` relayed what their process left when it ended (``_target``),
    as long as bytes move (a slow reader at the far end), however long; False once none
    moved for ``idle`` seconds. Bytes written later (by a child that keeps the fd) do not
    hold it: an endpoint that reached its target counts once it stayed there for
    ``DRAIN_POLL`` without ending (its end is the usual sign: a sender's last send
    is then on the link, ahead of the exit the caller sends next; a sender that counted
    bytes may still be on its way to the link's lock for a few scheduler turns)."""
    targets = {id(e): _target(e) for e in endpoints}
    reached: dict[int, float] = {}
    last: tuple[tuple[int, ...], ...] | None = None
    quiet_since = trio.current_time()
    while True:
        now = trio.current_time()
        left = []
        for e in endpoints:
            if not e.running or e.finished.is_set():
                continue
            if _flushed(e, targets.get(id(e), 0)):
                if now - reached.setdefault(id(e), now) >= DRAIN_POLL:
                    continue
            else:
                reached.pop(id(e), None)
            left.append(e)
        if not left:
            return True
        state = _progress(endpoints)
        if state != last:
            last, quiet_since = state, now
        elif now - quiet_since >= idle:
            return False
        with trio.move_on_after(DRAIN_POLL):
            await left[0].finished.wait()
