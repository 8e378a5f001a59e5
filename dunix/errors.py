"""The one error family of dunix.

Every failure a caller can act on is a ``DunixError``. Subclasses say whose fault it is
and what to do; they cross the wire by class name (``ErrorReply.kind``) and come out as
the same type on the other side (see ``dunix.wire``). OS, TLS and CRIU errors are
translated into these at the edge where they happen and nowhere else.
"""

from __future__ import annotations


class DunixError(Exception):
    """Base of every error dunix raises on purpose."""

    #: exit code the CLI uses when this error ends a command
    exit_code = 1


class ConfigError(DunixError):
    """A configuration file, flag or environment value is wrong (the caller's fault)."""

    exit_code = 2


class ProtocolError(DunixError):
    """The peer sent something that is not valid dunix wire data."""


class FrameTooLarge(ProtocolError):
    """A frame announced a length above the configured limit."""


class VersionMismatch(ProtocolError):
    """The peer speaks a wire version this side does not."""


class AuthenticationFailed(DunixError):
    """The peer could not prove who it is (certificate, credentials)."""

    exit_code = 77


class AccessDenied(DunixError):
    """The caller is known but not allowed to do this."""

    exit_code = 77


class PeerUnreachable(DunixError):
    """A node or agent could not be reached, or the connection broke."""

    exit_code = 69


class NoSuchNode(DunixError):
    """No member of the cluster has that name."""

    exit_code = 3


class NoSuchProcess(DunixError):
    """No managed process has that gpid."""

    exit_code = 3


class MigrationFailed(DunixError):
    """A move did not happen; the process still runs where it was."""


class ClusterError(DunixError):
    """Setting up or tearing down the local simulated cluster failed."""


class FdCaptureFailed(DunixError):
    """Taking a process's fd (pidfd_getfd) failed for a reason other than rights or exit."""


class RemoteError(DunixError):
    """A peer reported an error of a kind this side does not know."""


class StoreError(DunixError):
    """A storagefs local store is unusable (wrong node, bad path, damaged metadata)."""


class TracerRefused(DunixError):
    """A job's tracer could not release, seize or deputize a process; it says why."""


ERROR_TYPES: dict[str, type[DunixError]] = {
    cls.__name__: cls
    for cls in (
        DunixError,
        ConfigError,
        ProtocolError,
        FrameTooLarge,
        VersionMismatch,
        AuthenticationFailed,
        AccessDenied,
        PeerUnreachable,
        NoSuchNode,
        NoSuchProcess,
        MigrationFailed,
        ClusterError,
        FdCaptureFailed,
        RemoteError,
        StoreError,
        TracerRefused,
    )
}


def error_from_wire(kind: str, message: str) -> DunixError:
    """Rebuild an error that crossed the wire as ``(class name, message)``."""
    cls = ERROR_TYPES.get(kind, RemoteError)
    return cls(message)
