"""storagefs: one file tree for every process on every host (issue 5).

Single-host core so far: :class:`LocalStore` (the host's local disk folder and its SQLite
metadata), the sans-IO peer lookup :class:`Lookup`, and :class:`StorageFS`, the pyfuse3 file
system serving the store with a pluggable :class:`RemoteResolver`, and :class:`PeerResolver`,
the trio driver of the lookup over any message transport. README.md in this folder
says how the agent wires them together.
"""

from dunix.storagefs.fs import MOUNT_OPTIONS, NoPeers, RemoteResolver, StorageFS, serve
from dunix.storagefs.lookup import (
    Action,
    Answer,
    Broadcast,
    Lookup,
    LookupConfig,
    LookupQuery,
    LookupReply,
    NameCreated,
    SendQuery,
    reply_for,
)
from dunix.storagefs.resolver import LookupMessage, PeerResolver
from dunix.storagefs.store import (
    FileMeta,
    IncomingFile,
    LocalStore,
    MetaStore,
    StoreError,
    clean_relpath,
)

__all__ = [
    "MOUNT_OPTIONS",
    "Action",
    "Answer",
    "Broadcast",
    "FileMeta",
    "IncomingFile",
    "LocalStore",
    "Lookup",
    "LookupConfig",
    "LookupMessage",
    "LookupQuery",
    "LookupReply",
    "MetaStore",
    "NameCreated",
    "NoPeers",
    "PeerResolver",
    "RemoteResolver",
    "SendQuery",
    "StorageFS",
    "StoreError",
    "clean_relpath",
    "reply_for",
    "serve",
]
