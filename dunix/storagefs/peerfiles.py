"""Files owned by a peer: the request/reply protocol, its caller side and its owner side.

A host serves the kernel's requests for a file another host owns by asking that owner,
naming the file by its tree path (``build/foo.o``): the owner's local disk folder is the
truth, and a path is what both sides agree on without shared state. Contents move in large
blocks (``BLOCK``, 1 MiB) so there is no per-byte Python work; the caller keeps a small
read-ahead window per open file (see ``fs.py``).

- :class:`PeerFiles` (caller side): ``await call(owner, op, ...)`` sends one
  :class:`FileRequest` and waits for its :class:`FileReply`. An owner that cannot be
  reached, dies meanwhile (``peer_gone``) or stays silent past the timeout gives
  :class:`~dunix.errors.PeerUnreachable` (EIO for the caller), never "no such file"; an
  errno from the owner comes back as the same ``OSError``.
- :class:`FileServer` (owner side): carries out a request on the local store and answers.
  Open files are kept per (origin, handle) and closed when their origin goes.

The transport is the agent's reliable per-peer link (``JobLinks``); nothing here knows
sockets, so tests wire a caller and a server together in memory.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import stat
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from dunix.errors import DunixError, PeerUnreachable, StoreError
from dunix.storagefs import _syscalls
from dunix.storagefs.store import LocalStore, clean_relpath
from dunix.wire import message

log = logging.getLogger(__name__)

#: bytes per read request to an owner (and the read-ahead unit)
BLOCK = 1 << 20
#: open flags that make no sense when reopening an existing file by its path
_OPEN_DROP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW
#: the tuple form of a stat result (see :func:`stat_tuple`)
ATTR_FIELDS = (
    "ino", "mode", "nlink", "uid", "gid", "rdev", "size", "blksize", "blocks",
    "atime_ns", "mtime_ns", "ctime_ns",
)  # fmt: skip
OPS = frozenset(
    {"stat", "open", "read", "write", "release", "fsync", "setattr", "readlink", "unlink",
     "rmdir", "rename", "link", "listdir", "getxattr", "setxattr", "listxattr", "removexattr",
     "lock", "bulk"}
)  # fmt: skip


@message
@dataclass(frozen=True)
class FileRequest:
    """One operation on a file of the receiving host, named by its tree path or handle.

    ``setattr`` holds (size, mode, uid, gid, atime_ns, mtime_ns), None for "leave it".
    """

    request_id: int
    origin: int
    op: str
    path: str = ""
    path2: str = ""
    handle: int = 0
    offset: int = 0
    size: int = 0
    flags: int = 0
    data: bytes = b""
    setattr: tuple[int | None, ...] = ()


@message
@dataclass(frozen=True)
class FileReply:
    """The owner's answer; ``error`` is an errno (0: success)."""

    request_id: int
    node: int
    error: int = 0
    attrs: tuple[int, ...] = ()
    data: bytes = b""
    handle: int = 0
    size: int = 0
    entries: tuple[tuple[str, tuple[int, ...]], ...] = ()
    #: the answer to ``bulk``: "NAME HOST PORT" of the owner's bulk lane (see bulk.py)
    bulk: str = ""


FileMessage = FileRequest | FileReply
Send = Callable[[int, FileMessage], Awaitable[None]]
#: the owner's lock arbiter: (inode number, request) -> (errno, attrs), see locks.py
LockServe = Callable[[int, "FileRequest"], Awaitable[tuple[int, tuple[int, ...]]]]


def stat_tuple(st: os.stat_result, ino: int) -> tuple[int, ...]:
    """A stat result as it crosses the wire, with the cluster-wide inode number."""
    return (
        ino, st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_rdev, st.st_size,
        st.st_blksize, st.st_blocks, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns,
    )  # fmt: skip


def attr_ino(attrs: tuple[int, ...]) -> int:
    return attrs[0]


def attr_mode(attrs: tuple[int, ...]) -> int:
    return attrs[1]


@dataclass
class _Waiter:
    peer: int
    done: trio.Event = field(default_factory=trio.Event)
    reply: FileReply | None = None
    gone: bool = False


class PeerFiles:
    """The caller side: requests to owners and the matching of their replies."""

    def __init__(self, node_id: int, send: Send, timeout: float = 10.0) -> None:
        self.node_id = node_id
        self._send = send
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._waiting: dict[int, _Waiter] = {}

    async def call(self, peer: int, op: str, **fields: object) -> FileReply:
        """Ask ``peer`` to do ``op``; raises the owner's OSError, or PeerUnreachable."""
        request_id = next(self._ids)
        if isinstance(fields.get("data"), tuple):  # a write's pieces (bulk.Pieces)
            fields["data"] = b"".join(fields["data"])  # type: ignore[arg-type]
        waiter = self._waiting[request_id] = _Waiter(peer)
        try:
            request = FileRequest(request_id, self.node_id, op, **fields)  # type: ignore[arg-type]
            try:
                await self._send(peer, request)
            except (DunixError, OSError) as exc:
                raise PeerUnreachable(f"node {peer}: {exc}") from None
            with trio.move_on_after(self.timeout):
                await waiter.done.wait()
        finally:
            self._waiting.pop(request_id, None)
        if waiter.gone:
            raise PeerUnreachable(f"node {peer} left while asked to {op}")
        if waiter.reply is None:
            raise PeerUnreachable(f"node {peer} did not answer {op} within {self.timeout}s")
        if waiter.reply.error:
            code = waiter.reply.error
            raise OSError(code, os.strerror(code))
        return waiter.reply

    def received(self, reply: FileReply) -> None:
        waiter = self._waiting.get(reply.request_id)
        if waiter is not None and waiter.peer == reply.node and not waiter.done.is_set():
            waiter.reply = reply
            waiter.done.set()

    def peer_gone(self, peer: int) -> None:
        for waiter in self._waiting.values():
            if waiter.peer == peer and not waiter.done.is_set():
                waiter.gone = True
                waiter.done.set()


class FileServer:
    """The owner side: requests from peers carried out on the local store.

    ``changed(path, contents)`` is called after a peer changed ``path`` here (contents:
    True when file data changed, False when names did), so the FUSE side can drop what the
    local kernel cached; ``created(path)`` after a name appeared (rename or link target).
    ``locks`` decides peers' lock requests (``op="lock"``, see locks.py); without it they
    get ENOLCK.
    """

    def __init__(
        self,
        store: LocalStore,
        created: Callable[[str], None] = lambda path: None,
        changed: Callable[[str, bool], None] = lambda path, contents: None,
        locks: LockServe | None = None,
    ) -> None:
        self.store = store
        self._locks = locks
        self._created = created
        self._changed = changed
        self._handles: dict[tuple[int, int], tuple[int, str]] = {}
        #: taken to close a handle's descriptor and to duplicate one for the bulk lane's
        #: threads (so a release never closes a number a bulk read is about to use)
        self._fd_lock = threading.Lock()
        #: where this host's bulk lane listens ("NAME HOST PORT"), empty if it has none
        self.bulk_address = ""
        self._next_handle = itertools.count(1)
        #: ops served elsewhere (replicas.OPS -> Replicas.serve), and a hook run after each
        #: successful op (the owner's replication of what a peer changed)
        self.extra_ops: dict[str, Callable[[FileRequest], Awaitable[FileReply]]] = {}
        self.after: Callable[[FileRequest, FileReply], Awaitable[None]] | None = None

    @property
    def node_id(self) -> int:
        return self.store.node_id

    def open_handles(self) -> int:
        return len(self._handles)

    def opened(self, origin: int, handle: int) -> tuple[int, str] | None:
        """(descriptor, tree path) of a file ``origin`` has open here."""
        return self._handles.get((origin, handle))

    def dup_handle(self, origin: int, handle: int) -> tuple[int, str] | None:
        """A duplicate of the descriptor of a file ``origin`` has open here, and its tree
        path; the caller closes it. Safe from any thread (the bulk lane's)."""
        with self._fd_lock:
            entry = self._handles.get((origin, handle))
            if entry is None:
                return None
            return os.dup(entry[0]), entry[1]

    def _close(self, key: tuple[int, int]) -> None:
        with self._fd_lock:
            entry = self._handles.pop(key, None)
            if entry is not None:
                os.close(entry[0])

    def peer_gone(self, origin: int) -> None:
        """Close what ``origin`` had open: it cannot release it any more."""
        for key in [k for k in self._handles if k[0] == origin]:
            self._close(key)

    def close(self) -> None:
        for key in list(self._handles):
            self._close(key)

    async def handle(self, req: FileRequest) -> FileReply:
        """Carry out one request; every failure becomes an errno in the reply."""
        extra = self.extra_ops.get(req.op)
        if extra is not None:
            return await extra(req)
        if req.op not in OPS:
            return FileReply(req.request_id, self.node_id, errno.ENOSYS)
        try:
            reply: FileReply = await getattr(self, f"_op_{req.op}")(req)
            if self.after is not None and not reply.error:
                await self.after(req, reply)
            return reply
        except OSError as exc:
            return FileReply(req.request_id, self.node_id, exc.errno or errno.EIO)
        except StoreError as exc:
            log.warning("storagefs: refused %s from node %d: %s", req.op, req.origin, exc)
            return FileReply(req.request_id, self.node_id, errno.EINVAL)

    # --- helpers --------------------------------------------------------------------------

    def _backing(self, path: str) -> str:
        """The backing path of a peer's tree path, refusing one that leaves the tree.

        A kernel resolves symlinks itself, so a peer never needs a folder of the path to be
        a symlink; one that is (pointing outside the tree) would let the peer reach any file
        here. The last component is never followed (lstat, O_NOFOLLOW, O_PATH below).
        """
        backing = self.store.backing_path(path)
        if backing == self.store.tree:
            return str(backing)  # the root (a listing of it): its parent is the store itself
        parent = os.path.realpath(backing.parent)
        tree = str(self.store.tree)
        if parent != tree and not parent.startswith(tree + os.sep):
            raise StoreError(f"path {path!r} leaves the tree through a symlink")
        return str(backing)

    def _attrs(self, st: os.stat_result) -> tuple[int, ...]:
        return stat_tuple(st, self.store.inode_number(st))

    def _fd(self, req: FileRequest) -> int:
        entry = self._handles.get((req.origin, req.handle))
        if entry is None:
            raise OSError(errno.EBADF, "no such open file")
        return entry[0]

    def _ok(self, req: FileRequest, **fields: object) -> FileReply:
        return FileReply(req.request_id, self.node_id, 0, **fields)  # type: ignore[arg-type]

    def _make_parents(self, path: str) -> None:
        """Create the folders above ``path`` that this host does not have yet (merged tree)."""
        parent = os.path.dirname(self._backing(path))
        os.makedirs(parent, mode=0o755, exist_ok=True)

    # --- operations -----------------------------------------------------------------------

    async def _op_stat(self, req: FileRequest) -> FileReply:
        return self._ok(req, attrs=self._attrs(os.lstat(self._backing(req.path))))

    async def _op_open(self, req: FileRequest) -> FileReply:
        flags = (req.flags & ~_OPEN_DROP) | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(self._backing(req.path), flags)
        handle = next(self._next_handle)
        self._handles[(req.origin, handle)] = (fd, clean_relpath(req.path))
        return self._ok(req, handle=handle, attrs=self._attrs(os.fstat(fd)))

    async def _op_read(self, req: FileRequest) -> FileReply:
        fd = self._fd(req)
        data = await trio.to_thread.run_sync(os.pread, fd, min(req.size, BLOCK * 4), req.offset)
        return self._ok(req, data=data)

    async def _op_write(self, req: FileRequest) -> FileReply:
        fd = self._fd(req)
        written = await trio.to_thread.run_sync(os.pwrite, fd, req.data, req.offset)
        self._changed(self._handles[(req.origin, req.handle)][1], True)
        return self._ok(req, size=written)

    async def _op_release(self, req: FileRequest) -> FileReply:
        self._close((req.origin, req.handle))
        return self._ok(req)

    async def _op_bulk(self, req: FileRequest) -> FileReply:
        """Where this host's bulk lane listens (bulk.py); EOPNOTSUPP: it has none."""
        if not self.bulk_address:
            raise OSError(errno.EOPNOTSUPP, "no bulk lane here")
        return self._ok(req, bulk=self.bulk_address)

    async def _op_fsync(self, req: FileRequest) -> FileReply:
        fd = self._fd(req)
        await trio.to_thread.run_sync(os.fdatasync if req.flags else os.fsync, fd)
        return self._ok(req)

    async def _op_setattr(self, req: FileRequest) -> FileReply:
        size, mode, uid, gid, atime, mtime = req.setattr
        path = self._backing(req.path)
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            proc = f"/proc/self/fd/{fd}"
            if size is not None:
                entry = self._handles.get((req.origin, req.handle)) if req.handle else None
                if entry is not None:
                    os.ftruncate(entry[0], size)
                else:
                    os.truncate(proc, size)
            if mode is not None:
                if stat.S_ISLNK(os.fstat(fd).st_mode):
                    raise OSError(errno.EOPNOTSUPP, "chmod of a symlink")
                os.chmod(proc, stat.S_IMODE(mode))
            if uid is not None or gid is not None:
                _syscalls.chown_fd(fd, -1 if uid is None else uid, -1 if gid is None else gid)
            if atime is not None or mtime is not None:
                _syscalls.utimens_fd(fd, atime, mtime)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        self._changed(clean_relpath(req.path), size is not None)
        return self._ok(req, attrs=self._attrs(st))

    async def _op_readlink(self, req: FileRequest) -> FileReply:
        return self._ok(req, data=os.fsencode(os.readlink(self._backing(req.path))))

    async def _op_unlink(self, req: FileRequest) -> FileReply:
        backing = self._backing(req.path)
        os.lstat(backing)  # ENOENT before anything is dropped
        self._changed(clean_relpath(req.path), True)  # other links of it: their link count
        os.unlink(backing)
        self.store.removed(req.path)
        self._changed(clean_relpath(req.path), False)
        return self._ok(req)

    async def _op_rmdir(self, req: FileRequest) -> FileReply:
        os.rmdir(self._backing(req.path))
        self.store.removed(req.path)
        self._changed(clean_relpath(req.path), False)
        return self._ok(req)

    async def _op_rename(self, req: FileRequest) -> FileReply:
        """Rename inside this owner's tree, creating the target's folders as needed."""
        old, new = self._backing(req.path), self._backing(req.path2)
        self._make_parents(req.path2)
        _syscalls.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), req.flags)
        if not req.flags & _syscalls.RENAME_EXCHANGE:
            self.store.renamed(req.path, req.path2)
        self._changed(clean_relpath(req.path), False)
        self._changed(clean_relpath(req.path2), False)
        self._created(clean_relpath(req.path2))
        return self._ok(req, attrs=self._attrs(os.lstat(new)))

    async def _op_link(self, req: FileRequest) -> FileReply:
        self._make_parents(req.path2)
        os.link(self._backing(req.path), self._backing(req.path2), follow_symlinks=False)
        self._changed(clean_relpath(req.path), True)  # its link count, in our kernel's cache
        self._changed(clean_relpath(req.path2), False)
        self._created(clean_relpath(req.path2))
        return self._ok(req, attrs=self._attrs(os.lstat(self._backing(req.path2))))

    async def _op_listdir(self, req: FileRequest) -> FileReply:
        """The names in a folder of this host, with their attributes (ENOENT: none here)."""
        folder = self._backing(req.path)
        entries = []
        with os.scandir(folder) as it:
            for entry in it:
                with contextlib.suppress(FileNotFoundError):
                    st = entry.stat(follow_symlinks=False)
                    entries.append((entry.name, self._attrs(st)))
        return self._ok(req, entries=tuple(entries))

    async def _op_lock(self, req: FileRequest) -> FileReply:
        """A lock on a file of this host, decided here (fields: see locks.py)."""
        if self._locks is None:
            raise OSError(errno.ENOLCK, "no lock arbiter here")
        key = self.store.inode_number(os.lstat(self._backing(req.path)))
        error, attrs = await self._locks(key, req)
        if error:
            raise OSError(error, os.strerror(error))
        return self._ok(req, attrs=attrs)

    # --- extended attributes: name in ``path2``, value in ``data`` -------------------------

    def _xattr_target(self, req: FileRequest, missing: int) -> str:
        """A path reaching the file's xattrs; a symlink has none here (as in fs.py)."""
        backing = self._backing(req.path)
        if stat.S_ISLNK(os.lstat(backing).st_mode):
            raise OSError(missing, os.strerror(missing))
        return backing

    async def _op_getxattr(self, req: FileRequest) -> FileReply:
        value = os.getxattr(self._xattr_target(req, errno.ENODATA), req.path2)
        return self._ok(req, data=value)

    async def _op_setxattr(self, req: FileRequest) -> FileReply:
        os.setxattr(self._xattr_target(req, errno.EPERM), req.path2, req.data, req.flags)
        return self._ok(req)

    async def _op_listxattr(self, req: FileRequest) -> FileReply:
        try:
            names = os.listxattr(self._xattr_target(req, errno.ENODATA))
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise
            names = []
        return self._ok(req, data=b"\0".join(os.fsencode(n) for n in names))

    async def _op_removexattr(self, req: FileRequest) -> FileReply:
        os.removexattr(self._xattr_target(req, errno.ENODATA), req.path2)
        return self._ok(req)
