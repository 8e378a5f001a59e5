"""Sans-IO connection handshake: who is on the other end, and do we speak the same wire.

The connecting side sends one :class:`Hello`; the accepting side answers :class:`Welcome`
or :class:`ErrorReply` and then hangs up. What the peer *claims* in its Hello is checked
against what the transport *proved*: the certificate's role and common name for TLS, the
kernel's word for a local unix socket. The table of what may claim what is
``ALLOWED_ROLES``; the transport only supplies the proven facts.

``Hello``, ``Welcome`` and ``ErrorReply`` must keep their shape in every wire version, so
that a peer with another version can still be told so (``VersionMismatch``) instead of
failing to decode.
"""

from __future__ import annotations

from dataclasses import dataclass

from dunix.errors import (
    ERROR_TYPES,
    AuthenticationFailed,
    DunixError,
    ProtocolError,
    VersionMismatch,
    error_from_wire,
)
from dunix.wire._codec import message

WIRE_VERSION = 1

#: proven role of the transport -> the role its Hello must claim
ALLOWED_ROLES: dict[str, str] = {
    "node": "node",  # TLS, node certificate: an agent
    "client": "client",  # TLS, client certificate: a remote CLI or library
    "local": "local",  # unix control socket: the kernel vouches via SO_PEERCRED
}


@message
@dataclass(frozen=True)
class Hello:
    """First message of the connecting side.

    ``address`` is the sender's own listen address ("host:port") for nodes, so a peer can
    call back; "" for clients.
    """

    version: int
    role: str
    name: str
    address: str


@message
@dataclass(frozen=True)
class Welcome:
    """The accepting side's yes; ``name`` is its node name."""

    version: int
    name: str


@message
@dataclass(frozen=True)
class ErrorReply:
    """An error crossing the wire: ``kind`` is a ``dunix.errors`` class name."""

    kind: str
    message: str

    @classmethod
    def from_exc(cls, exc: BaseException) -> ErrorReply:
        """Name the most specific known error class, so the peer rebuilds the same type.

        An error class defined outside ``dunix.errors`` travels as its nearest known base;
        anything that is not a ``DunixError`` at all is an internal failure of this side.
        """
        if isinstance(exc, DunixError):
            for klass in type(exc).__mro__:
                if ERROR_TYPES.get(klass.__name__) is klass:
                    return cls(klass.__name__, str(exc))
        return cls("RemoteError", f"{type(exc).__name__}: {exc}")

    def to_exc(self) -> DunixError:
        return error_from_wire(self.kind, self.message)


@dataclass(frozen=True)
class PeerInfo:
    """What the accepting side knows about a peer after a good Hello."""

    name: str
    role: str
    address: str


def check_hello(
    received: object, *, proven_role: str, proven_name: str, local_name: str
) -> tuple[PeerInfo, Welcome]:
    """Accept or refuse a peer's first message.

    ``proven_role`` and ``proven_name`` come from the transport (certificate OU and CN, or
    "local" and "" for the unix socket). The peer's name is the proven one when there is
    one; a local peer's Hello name is only informational (authorise it by uid).
    Raises ``VersionMismatch``, ``AuthenticationFailed`` or ``ProtocolError``; send the
    refusal back as ``ErrorReply.from_exc``.
    """
    if not isinstance(received, Hello):
        raise ProtocolError(f"expected Hello, got {type(received).__name__}")
    if received.version != WIRE_VERSION:
        raise VersionMismatch(
            f"peer speaks wire version {received.version}, this side {WIRE_VERSION}"
        )
    allowed = ALLOWED_ROLES.get(proven_role)
    if allowed is None or received.role != allowed:
        raise AuthenticationFailed(f"a {proven_role!r} peer may not act as role {received.role!r}")
    if proven_role == "node" and received.name != proven_name:
        raise AuthenticationFailed(
            f"node certificate is for {proven_name!r}, Hello claims {received.name!r}"
        )
    peer = PeerInfo(proven_name or received.name, proven_role, received.address)
    return peer, Welcome(WIRE_VERSION, local_name)


def check_welcome(received: object) -> Welcome:
    """The connecting side's check of the answer; an ``ErrorReply`` raises its error."""
    if isinstance(received, ErrorReply):
        raise received.to_exc()
    if not isinstance(received, Welcome):
        raise ProtocolError(f"expected Welcome, got {type(received).__name__}")
    if received.version != WIRE_VERSION:
        raise VersionMismatch(
            f"peer speaks wire version {received.version}, this side {WIRE_VERSION}"
        )
    return received
