"""The wire layer: typed messages, framing, the handshake and the authenticated transport.

Everything a caller needs is re-exported here; the ``_x`` modules behind it are private.
"""

from dunix.wire._codec import (
    DEFAULT_MAX_FRAME,
    FrameDecoder,
    decode,
    encode,
    frame,
    message,
    registered,
)
from dunix.wire._handshake import (
    WIRE_VERSION,
    ErrorReply,
    Hello,
    PeerInfo,
    Welcome,
    check_hello,
    check_welcome,
)
from dunix.wire._tls import TLSIdentity, keygen, peer_identity
from dunix.wire._transport import (
    Channel,
    Handler,
    PeerCred,
    format_address,
    listener_addresses,
    open_channel,
    open_unix_channel,
    parse_address,
    serve_tls,
    serve_unix,
)

__all__ = [
    "DEFAULT_MAX_FRAME",
    "WIRE_VERSION",
    "Channel",
    "ErrorReply",
    "FrameDecoder",
    "Handler",
    "Hello",
    "PeerCred",
    "PeerInfo",
    "TLSIdentity",
    "Welcome",
    "check_hello",
    "check_welcome",
    "decode",
    "encode",
    "format_address",
    "frame",
    "keygen",
    "listener_addresses",
    "message",
    "open_channel",
    "open_unix_channel",
    "parse_address",
    "peer_identity",
    "registered",
    "serve_tls",
    "serve_unix",
]
