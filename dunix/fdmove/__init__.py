"""fd forwarding: relays that carry a local fd's bytes as streams over a peer link.

``streams`` is the sans-IO protocol (messages, per-stream states, credit); ``relay``
drives it with trio for real fds. See ``docs/run.md`` ("Agent side").

How an agent uses it, per peer channel::

    hub = StreamHub(channel.send, odd=odd_side(my_name, channel.peer_name))
    await nursery.start(hub.run)
    async for msg in channel:              # the one task reading the channel
        if hub.deliver(msg):               # never blocks; ProtocolError: close channel
            continue
        ...                                # other traffic
    hub.link_lost()                        # channel ended or broke: fds close, LOST

Each relayed fd is one stream one way; the home side allocates the ids (``hub.allocate()``)
and names them in RemoteExec. Home, with duplicates of the deputy's fds (``shared=True``:
their open file descriptions may be shared, so they are never made non-blocking)::

    hub.open_sender(s0, stdin_dup, shared=True)     # the process reads fd 0
    hub.open_receiver(s1, stdout_dup, shared=True)  # the process writes fd 1

Peer, with new pipes whose other ends become the process's fds (owned, ``shared=False``)::

    r, w = os.pipe(); hub.open_receiver(s0, w)      # process gets r as fd 0
    r, w = os.pipe(); hub.open_sender(s1, r)        # process gets w as fd 1

A pipe's read end held by a process elsewhere is pulled: the peer opens its receiver
with ``pull=`` a function that says how many bytes readers blocked on it ask for, and the
home reads only that (see ``streams``: a process that never reads takes nothing).

A read-write fd (a tty) is two streams on two fds of one socket (``socket.socketpair()``
on the peer, ``os.dup`` of the duplicate at home). ``await endpoint.wait()`` returns the
``Outcome`` once the endpoint has closed its fd; ``endpoint.stop()`` ends it early.
"""

from dunix.fdmove.bulk import BulkRelay
from dunix.fdmove.relay import (
    DEFAULT_CHUNK,
    PIPE_SIZE,
    Outcome,
    Send,
    StreamEndpoint,
    StreamHub,
)
from dunix.fdmove.streams import (
    DEFAULT_WINDOW,
    STREAM_AFTER,
    STREAM_MESSAGES,
    STREAM_MIN_READ,
    TRANSITIONS,
    Event,
    Role,
    State,
    StreamBulk,
    StreamCredit,
    StreamData,
    StreamEnd,
    StreamGone,
    StreamInfo,
    StreamMessage,
    StreamMux,
    StreamPull,
    StreamReady,
    StreamWant,
    odd_side,
)

__all__ = [
    "DEFAULT_CHUNK",
    "DEFAULT_WINDOW",
    "PIPE_SIZE",
    "STREAM_AFTER",
    "STREAM_MESSAGES",
    "STREAM_MIN_READ",
    "TRANSITIONS",
    "BulkRelay",
    "Event",
    "Outcome",
    "Role",
    "Send",
    "State",
    "StreamBulk",
    "StreamCredit",
    "StreamData",
    "StreamEnd",
    "StreamEndpoint",
    "StreamGone",
    "StreamHub",
    "StreamInfo",
    "StreamMessage",
    "StreamMux",
    "StreamPull",
    "StreamReady",
    "StreamWant",
    "odd_side",
]
