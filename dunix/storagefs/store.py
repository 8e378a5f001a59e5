"""The local backing store of one host: its part of the file tree, and the metadata beside it.

A host's "local disk folder" (``root``) holds::

    root/tree/             the files this host owns, as plain files: the truth
    root/incoming/         files arriving from peers, under temporary names, until complete
    root/meta.sqlite3      metadata: owner, replica set, allocated inode numbers, folder policy

The tree is the truth: an agent restart keeps every file, and a file in ``tree/`` without a
metadata row is simply owned by this host with no replicas. SQLite runs in WAL mode with
``synchronous=FULL``, so a committed metadata change survives a crash or power loss
(https://www.sqlite.org/wal.html). A file that arrives from elsewhere is written to
``incoming/`` (same file system, so the final ``rename(2)`` is atomic), fsynced, and only
then renamed into ``tree/``; whatever is left in ``incoming/`` at the next start is an
interrupted transfer and is deleted. A half-written file is therefore never visible as
complete.

Plain blocking IO: callers on trio run these methods in a worker thread.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from dunix.errors import ConfigError, StoreError
from dunix.pid.devino import allocated_local, direct_local, make_ino
from dunix.pid.gpid import MAX_NODE_ID

SCHEMA_VERSION = 1
TREE = "tree"
INCOMING = "incoming"
#: copies this host keeps of files other hosts own (dunix/storagefs/replicas.py); never in tree/
REPLICAS = "replicas"
META = "meta.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
-- backing inode numbers too large to use directly, and the number allocated for each
CREATE TABLE IF NOT EXISTS inodes (backing INTEGER PRIMARY KEY, local INTEGER UNIQUE NOT NULL);
-- files whose owner or replica set is not the default (owned here, no replicas)
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY, owner INTEGER NOT NULL, replicas TEXT NOT NULL DEFAULT '');
-- per-folder replication factor (`dunix fs replicas N PATH`); placeholder for part 4
CREATE TABLE IF NOT EXISTS folders (path TEXT PRIMARY KEY, replicas INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class FileMeta:
    """Who owns a file and who holds copies of it."""

    path: str
    owner: int
    replicas: tuple[int, ...] = ()


def clean_relpath(path: str) -> str:
    """A tree path normalised to ``a/b/c`` form; refuses anything that leaves the tree.

    Paths come from peers, so ``..``, empty components and NUL are errors, not things to fix.
    The tree's root is the empty string.
    """
    if "\0" in path:
        raise StoreError(f"path {path!r} holds a NUL byte")
    parts = [p for p in path.strip("/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise StoreError(f"path {path!r} leaves the tree")
    return "/".join(parts)


def _signed64(value: int) -> int:
    """SQLite integers are signed 64-bit; backing inode numbers are unsigned."""
    return value - (1 << 64) if value >= 1 << 63 else value


class MetaStore:
    """The SQLite metadata of one store. Thread-safe: one connection behind a lock."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"metadata store {path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def setting(self, key: str) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM settings WHERE key=?", (key,)).fetchone()
        return None if row is None else int(row[0])

    def set_setting(self, key: str, value: int) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (key, value))

    def allocated_inode(self, backing: int) -> int:
        """The allocated local number of a backing inode, allocating one the first time."""
        key = _signed64(backing)
        with self._transaction() as db:
            row = db.execute("SELECT local FROM inodes WHERE backing=?", (key,)).fetchone()
            if row is not None:
                return int(row[0])
            counter_row = db.execute("SELECT value FROM settings WHERE key='ino_counter'")
            found = counter_row.fetchone()
            counter = 1 if found is None else int(found[0]) + 1
            local = allocated_local(counter)
            db.execute("INSERT OR REPLACE INTO settings VALUES ('ino_counter', ?)", (counter,))
            db.execute("INSERT INTO inodes VALUES (?, ?)", (key, local))
            return local

    def forget_inode(self, backing: int) -> None:
        """Drop the allocated number of a backing inode that no longer exists."""
        with self._transaction() as db:
            db.execute("DELETE FROM inodes WHERE backing=?", (_signed64(backing),))

    def has_file_rows(self) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM files LIMIT 1").fetchone() is not None

    def file_meta(self, path: str, default_owner: int) -> FileMeta:
        with self._lock:
            row = self._db.execute(
                "SELECT owner, replicas FROM files WHERE path=?", (path,)
            ).fetchone()
        if row is None:
            return FileMeta(path, default_owner)
        replicas = tuple(int(r) for r in str(row[1]).split(",") if r)
        return FileMeta(path, int(row[0]), replicas)

    def set_file_meta(self, meta: FileMeta) -> None:
        replicas = ",".join(str(r) for r in meta.replicas)
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO files VALUES (?, ?, ?)", (meta.path, meta.owner, replicas)
            )

    def move_file_meta(self, old: str, new: str) -> None:
        """Follow a rename: the row of ``old`` (and rows under it, for a folder) moves."""
        with self._transaction() as db:
            db.execute("DELETE FROM files WHERE path=?", (new,))
            db.execute("UPDATE files SET path=? WHERE path=?", (new, old))
            prefix = old + "/"
            rows = db.execute(
                "SELECT path FROM files WHERE substr(path, 1, ?)=?", (len(prefix), prefix)
            ).fetchall()
            for (path,) in rows:
                db.execute(
                    "UPDATE files SET path=? WHERE path=?", (new + "/" + path[len(prefix) :], path)
                )

    def drop_file_meta(self, path: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM files WHERE path=?", (path,))

    def folder_replicas(self, path: str) -> int:
        """The replication factor of the nearest folder at or above ``path`` that has one."""
        parts = path.split("/") if path else []
        with self._lock:
            for n in range(len(parts), -1, -1):
                row = self._db.execute(
                    "SELECT replicas FROM folders WHERE path=?", ("/".join(parts[:n]),)
                ).fetchone()
                if row is not None:
                    return int(row[0])
        return 1

    def set_folder_replicas(self, path: str, replicas: int) -> None:
        if replicas < 1:
            raise ConfigError(f"replication factor {replicas} is below 1")
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO folders VALUES (?, ?)", (path, replicas))

    def all_folder_replicas(self) -> dict[str, int]:
        """Every folder's replication factor set with ``dunix fs replicas``."""
        with self._lock:
            rows = self._db.execute("SELECT path, replicas FROM folders").fetchall()
        return {str(path): int(n) for path, n in rows}

    def all_file_meta(self) -> list[FileMeta]:
        """Every non-default row: files owned here with replicas, copies held for others."""
        with self._lock:
            rows = self._db.execute("SELECT path, owner, replicas FROM files").fetchall()
        return [
            FileMeta(str(path), int(owner), tuple(int(r) for r in str(reps).split(",") if r))
            for path, owner, reps in rows
        ]


@dataclass
class IncomingFile:
    """A file being received from a peer: invisible until :meth:`commit`.

    Use as a context manager (commit on a clean exit, abort on an exception) or call
    :meth:`commit` / :meth:`abort` yourself when chunks arrive over time.
    """

    store: LocalStore
    path: str
    temp: Path
    fd: int
    mode: int
    uid: int | None
    gid: int | None
    mtime_ns: int | None
    meta: FileMeta
    #: where it appears (None: its path in the tree; a replica's copy goes to replicas/)
    target: Path | None = None
    done: bool = field(default=False, init=False)

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, offset)
            view, offset = view[written:], offset + written

    def truncate(self, size: int) -> None:
        """Set the final size (a sparse tail needs no zero bytes on the wire)."""
        os.ftruncate(self.fd, size)

    def commit(self) -> None:
        """Make the file visible under its name, complete and durable, with its metadata."""
        if self.done:
            raise StoreError(f"incoming {self.path} already finished")
        self.done = True
        try:
            os.fchmod(self.fd, stat.S_IMODE(self.mode))
            if self.uid is not None or self.gid is not None:
                os.fchown(self.fd, -1 if self.uid is None else self.uid,
                          -1 if self.gid is None else self.gid)  # fmt: skip
            if self.mtime_ns is not None:
                os.utime(self.fd, ns=(self.mtime_ns, self.mtime_ns))
            os.fsync(self.fd)
            target = self.target or self.store.backing_path(self.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(self.temp, target)
            _fsync_dir(target.parent)
        except BaseException:
            self._discard()
            raise
        os.close(self.fd)
        if self.meta.owner != self.store.node_id or self.meta.replicas:
            self.store.meta.set_file_meta(self.meta)
        else:
            self.store.meta.drop_file_meta(self.path)

    def abort(self) -> None:
        if not self.done:
            self.done = True
            self._discard()

    def _discard(self) -> None:
        os.close(self.fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.temp)

    def __enter__(self) -> IncomingFile:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore:
    """One host's local disk folder: the tree it owns, incoming transfers, metadata.

    ``node_id`` is recorded at the first open; reopening the folder as another node is an
    error, because inode numbers and ownership in it are that node's.
    """

    def __init__(self, root: str | os.PathLike[str], node_id: int) -> None:
        if not 1 <= node_id <= MAX_NODE_ID:
            raise ConfigError(f"node id {node_id} outside 1..{MAX_NODE_ID}")
        self.root = Path(root).resolve()
        self.node_id = node_id
        self.tree = self.root / TREE
        self.incoming = self.root / INCOMING
        self.replicas = self.root / REPLICAS
        try:
            self.tree.mkdir(parents=True, exist_ok=True)
            self.incoming.mkdir(exist_ok=True)
            self.replicas.mkdir(exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot prepare store {self.root}: {exc.strerror}") from exc
        self.meta = MetaStore(self.root / META)
        recorded = self.meta.setting("node_id")
        if recorded is None:
            self.meta.set_setting("node_id", node_id)
            self.meta.set_setting("schema", SCHEMA_VERSION)
        elif recorded != node_id:
            self.meta.close()
            raise StoreError(f"store {self.root} belongs to node {recorded}, not {node_id}")
        self.tree_dev = self.tree.stat().st_dev
        self.discarded = self._clear_incoming()

    def close(self) -> None:
        self.meta.close()

    def __enter__(self) -> LocalStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _clear_incoming(self) -> list[str]:
        """Delete transfers a crash interrupted; they were never visible. Returns their names."""
        gone = []
        for entry in os.scandir(self.incoming):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                gone.append(entry.name)
        return gone

    def backing_path(self, path: str) -> Path:
        """Where a tree path lives on the local disk."""
        rel = clean_relpath(path)
        return self.tree / rel if rel else self.tree

    def replica_path(self, path: str) -> Path:
        """Where this host keeps its copy of another host's file (outside the tree)."""
        rel = clean_relpath(path)
        if not rel:
            raise StoreError("the tree's root has no replica")
        return self.replicas / rel

    def promote(self, path: str, replicas: tuple[int, ...]) -> None:
        """This host's copy of ``path`` becomes the file itself: its owner died.

        One rename on the same file system, so the file appears whole or not at all; the
        folders above it are made first (as a merged folder, with the default mode).
        """
        source = self.replica_path(path)
        target = self.backing_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(source, target)
        _fsync_dir(target.parent)
        meta = FileMeta(clean_relpath(path), self.node_id, replicas)
        if replicas:
            self.meta.set_file_meta(meta)
        else:
            self.meta.drop_file_meta(meta.path)

    def relpath_of(self, backing: str | os.PathLike[str]) -> str:
        """The tree path of a backing path (inverse of :meth:`backing_path`)."""
        try:
            rel = Path(backing).relative_to(self.tree).as_posix()
        except ValueError:
            raise StoreError(f"{backing} is outside the store's tree") from None
        return "" if rel == "." else rel

    def local_ino(self, st: os.stat_result) -> int:
        """The stable owner-local inode number of a backing file (see dunix.pid.devino)."""
        if st.st_dev != self.tree_dev:
            raise StoreError("a backing file on another file system than the store's tree")
        local = direct_local(st.st_ino)
        return local if local is not None else self.meta.allocated_inode(st.st_ino)

    def inode_number(self, st: os.stat_result) -> int:
        """The cluster-wide inode number of a backing file owned here."""
        return make_ino(self.node_id, self.local_ino(st))

    def forget(self, st: os.stat_result) -> None:
        """A backing inode is gone for good (last link removed, no longer open)."""
        if direct_local(st.st_ino) is None:
            self.meta.forget_inode(st.st_ino)

    def file_meta(self, path: str) -> FileMeta:
        return self.meta.file_meta(clean_relpath(path), self.node_id)

    def renamed(self, old: str, new: str) -> None:
        """Metadata follows a rename inside the tree (no SQLite write while all is default)."""
        if self.meta.has_file_rows():
            self.meta.move_file_meta(clean_relpath(old), clean_relpath(new))

    def removed(self, path: str) -> None:
        """Metadata follows an unlink or rmdir."""
        if self.meta.has_file_rows():
            self.meta.drop_file_meta(clean_relpath(path))

    def receive(
        self,
        path: str,
        *,
        mode: int = 0o644,
        uid: int | None = None,
        gid: int | None = None,
        mtime_ns: int | None = None,
        owner: int | None = None,
        replicas: tuple[int, ...] = (),
        replica: bool = False,
    ) -> IncomingFile:
        """Start receiving a file that will appear at ``path`` once complete (with
        ``replica``: as this host's copy of another host's file, outside the tree)."""
        rel = clean_relpath(path)
        if not rel:
            raise StoreError("cannot receive a file as the tree's root")
        temp = self.incoming / f"{uuid.uuid4().hex}.part"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        meta = FileMeta(rel, self.node_id if owner is None else owner, replicas)
        target = self.replica_path(rel) if replica else None
        return IncomingFile(self, rel, temp, fd, mode, uid, gid, mtime_ns, meta, target)
