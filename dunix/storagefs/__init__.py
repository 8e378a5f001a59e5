"""storagefs: one file tree for every process on every host (issue 5).

Single-host core so far: :class:`LocalStore` (the host's local disk folder and its SQLite
metadata), the sans-IO peer lookup :class:`Lookup`, and :class:`PeerResolver`, its trio
driver over any message transport. The FUSE side (``StorageFS``, ``serve``,
``RemoteResolver``) is imported from ``dunix.storagefs.fs`` on its own, so importing this
package does not load pyfuse3 and ``python -m dunix.storagefs.fs`` runs cleanly. README.md
in this folder says how the agent wires them together.
"""

from dunix.errors import StoreError
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
from dunix.storagefs.peerfiles import FileReply, FileRequest, FileServer, PeerFiles
from dunix.storagefs.resolver import LookupMessage, PeerResolver
from dunix.storagefs.store import (
    FileMeta,
    IncomingFile,
    LocalStore,
    MetaStore,
    clean_relpath,
)

__all__ = [
    "Action",
    "Answer",
    "Broadcast",
    "FileMeta",
    "FileReply",
    "FileRequest",
    "FileServer",
    "IncomingFile",
    "LocalStore",
    "Lookup",
    "LookupConfig",
    "LookupMessage",
    "LookupQuery",
    "LookupReply",
    "MetaStore",
    "NameCreated",
    "PeerFiles",
    "PeerResolver",
    "SendQuery",
    "StoreError",
    "clean_relpath",
    "reply_for",
]
