"""fd forwarding: relays that carry a local fd's bytes as streams over a peer link.

``streams`` is the sans-IO protocol (messages, per-stream states, credit); ``relay``
drives it with trio for real fds. See ``docs/run.md`` ("Agent side").
"""

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
    STREAM_MESSAGES,
    TRANSITIONS,
    Event,
    Role,
    State,
    StreamCredit,
    StreamData,
    StreamEnd,
    StreamGone,
    StreamInfo,
    StreamMessage,
    StreamMux,
    odd_side,
)

__all__ = [
    "DEFAULT_CHUNK",
    "DEFAULT_WINDOW",
    "PIPE_SIZE",
    "STREAM_MESSAGES",
    "TRANSITIONS",
    "Event",
    "Outcome",
    "Role",
    "Send",
    "State",
    "StreamCredit",
    "StreamData",
    "StreamEnd",
    "StreamEndpoint",
    "StreamGone",
    "StreamHub",
    "StreamInfo",
    "StreamMessage",
    "StreamMux",
    "odd_side",
]
