"""dunix: a cluster of Linux hosts that behaves like one machine for unmodified programs."""

from dunix.errors import (
    AccessDenied,
    AuthenticationFailed,
    ClusterError,
    ConfigError,
    DunixError,
    MigrationFailed,
    NoSuchNode,
    NoSuchProcess,
    PeerUnreachable,
    ProtocolError,
)

__version__ = "0.1.0"

__all__ = [
    "AccessDenied",
    "AuthenticationFailed",
    "ClusterError",
    "ConfigError",
    "DunixError",
    "MigrationFailed",
    "NoSuchNode",
    "NoSuchProcess",
    "PeerUnreachable",
    "ProtocolError",
    "__version__",
]
