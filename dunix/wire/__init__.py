"""The wire layer: framing, typed messages and (in later modules) authenticated transport."""

from dunix.wire._codec import (
    DEFAULT_MAX_FRAME,
    FrameDecoder,
    decode,
    encode,
    frame,
    message,
    registered,
)

__all__ = [
    "DEFAULT_MAX_FRAME",
    "FrameDecoder",
    "decode",
    "encode",
    "frame",
    "message",
    "registered",
]
