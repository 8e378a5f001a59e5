"""The storagefs FUSE file system (pyfuse3 on trio), serving one host's local store.

Each inode the kernel knows is held as an ``O_PATH`` descriptor on the backing file (as
libfuse's passthrough_ll does), so a rename of it or of a folder above it changes nothing
here, and an unlinked file that is still open stays reachable until the kernel forgets it.
Inode numbers come from :mod:`dunix.pid.devino` (owner node in the high bits, the backing
inode below); FUSE cannot set st_dev per file (see that module).

A name that is not on the local disk goes to the :class:`RemoteResolver` (the agent's
:class:`~dunix.storagefs.resolver.PeerResolver`). A name found on a peer becomes a *remote
node*: the inode number the owner gave it (its node id in the high bits), the tree path, and
every operation on it is asked of the owner through :class:`~dunix.storagefs.peerfiles.
PeerFiles` (contents in 1 MiB blocks with a read-ahead block per open file). Folders are
merged: a folder exists on every host that has a file below it, a listing joins the names of
all alive hosts, and creating a file in a folder this host does not have yet creates the
folder here first (files live where they are created). A rename stays on the file's owner
(the owner creates the target's folders), so no bytes move; a target name held by another
host is then removed there, as rename replaces it.

The kernel checks permissions (``default_permissions``); the server runs as root and gives
new files the caller's uid and gid, and exactly the mode the kernel sends, by an explicit
chmod: the kernel already applied the caller's umask (fs/fuse/dir.c, unless
FUSE_CAP_DONT_MASK), and the serving process keeps its own umask (the agent's is 022).

Local system calls run inline on the trio thread: against a local disk they take
microseconds, less than a hop to a worker thread; only fsync goes to a thread.

Usage (one mount per process: pyfuse3 keeps its session in module globals)::

    python -m dunix.storagefs.fs --store /var/lib/dunix/disk --mount /dunix/fs --node 3
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import itertools
import logging
import os
import posixpath
import signal
import stat
import sys
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import pyfuse3
import trio

from dunix.errors import DunixError, PeerUnreachable, StoreError
from dunix.storagefs import _syscalls
from dunix.storagefs.lookup import LookupReply
from dunix.storagefs.passthrough import Passthrough
from dunix.storagefs.peerfiles import FileReply, stat_tuple
from dunix.storagefs.remote_nodes import Call, RemoteFile, RemoteNode, RemoteNodes
from dunix.storagefs.replicas import FACTOR_XATTR, WHERE_XATTR, Replicas
from dunix.storagefs.store import LocalStore

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
#: how long the kernel may trust an answer; the owner is the only writer of its files, and
#: the agent will invalidate entries when a peer changes one (pyfuse3.invalidate_entry)
ATTR_TIMEOUT = 1.0
CAPS_XATTR = b"security.capability"  # the kernel asks for it before each write
MOUNT_OPTIONS = frozenset(
    {"default_permissions", "allow_other", "fsname=dunix", "subtype=storagefs"}
)
# O_NOFOLLOW: the kernel resolved the name already; the /proc magic link must be followed
_OPEN_DROP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW
#: file handles of files open on a peer start here (local handles are descriptors)
REMOTE_FH_BASE = 1 << 40
#: how long a listing waits for the peers' part of a folder (default; the agent's config)
LIST_DEADLINE = 2.0


class RemoteResolver(Protocol):
    """Finds a tree path on the peers (the agent implements it with ``lookup.Lookup``)."""

    async def lookup(self, path: str) -> LookupReply | None:
        """The owner's reply for ``path``, or None when no peer has it."""
        ...

    def created(self, path: str) -> None:
        """A name appeared on this host (create, mkdir, mknod, symlink, link, rename target).

        The agent drops its cached "no such file" for it and broadcasts ``NameCreated``
        (``Lookup.created_here``). Must not block: it runs on the FUSE request path.
        """
        ...


class OwnerFiles(Protocol):
    """Asks a file's owner to do an operation (``peerfiles.PeerFiles`` or a bridge to it)."""

    async def call(self, peer: int, op: str, **fields: object) -> FileReply:
        """The owner's reply; its errno as OSError, PeerUnreachable when it cannot answer."""
        ...


class NoPeers:
    """A resolver for a host that knows no peers: nothing is remote."""

    async def lookup(self, path: str) -> LookupReply | None:
        return None

    def created(self, path: str) -> None:
        pass


@contextlib.contextmanager
def _fuse_errors() -> Iterator[None]:
    """OS errors become the errno the caller sees; our own errors become EIO."""
    try:
        yield
    except pyfuse3.FUSEError:
        raise
    except OSError as exc:
        raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
    except DunixError as exc:
        log.error("storagefs: %s", exc)
        raise pyfuse3.FUSEError(errno.EIO) from None
    except Exception:
        # Anything else escaping a handler would end pyfuse3's main loop: one bad request
        # must not take the mount down.
        log.exception("storagefs: request failed")
        raise pyfuse3.FUSEError(errno.EIO) from None


def _proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


@dataclass
class _Node:
    fd: int  # O_PATH descriptor of the backing file
    lookups: int


@dataclass
class _Dir:
    fd: int | None  # O_PATH descriptor of the local folder (None: no local part)
    ino: int
    path: str
    owned: bool = False  # fd was opened for this listing (a remote folder's local part)
    names: list[bytes] = field(default_factory=list)
    remote: dict[bytes, tuple[int, tuple[int, ...]]] = field(default_factory=dict)


def _join(parent: str, name: bytes) -> str:
    child = os.fsdecode(name)
    if child == ".":
        return parent
    if child == "..":
        return posixpath.dirname(parent)
    return f"{parent}/{child}" if parent else child


def _change(attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields) -> tuple[int | None, ...]:
    """A setattr as it crosses the wire: (size, mode, uid, gid, atime_ns, mtime_ns)."""
    return (
        attr.st_size if fields.update_size else None,
        attr.st_mode if fields.update_mode else None,
        attr.st_uid if fields.update_uid else None,
        attr.st_gid if fields.update_gid else None,
        attr.st_atime_ns if fields.update_atime else None,
        attr.st_mtime_ns if fields.update_mtime else None,
    )


#: which opens of a peer's file skip this host's page cache: ``all`` (the default),
#: ``writes`` (those that may write), or ``none``
PEER_DIRECT_IO_ENV = "DUNIX_PEER_DIRECT_IO"


def peer_direct_io(flags: int, mode: str | None = None) -> bool:
    """Whether an open of a peer's file goes ``direct_io``: the kernel then copies a write's
    data, or a read's reply, straight between the caller's pages and the request, one copy
    less than through the page cache, but each read(2) or write(2) is one request, with
    no readahead. Measured on 0.5-CPU hosts (256 MiB, n2 reading n1's file): reads of
    1 MiB 765 MB/s direct vs 515 cached, of 4 KiB 67 vs 480, Python's line reads 57 vs
    317; writes gain at every size (1 MiB 324 -> 434 MB/s in bench fs --peer, Python's
    line writes 26 -> 46). Cached reads beside direct writes (``writes``) lost updates
    under flock across two hosts (test_storagefs_locks: 2 of 18 runs lost one or two of
    200 increments; 0 of 10 with ``all``): a page this host cached can outlive a direct
    write made here, so every open goes direct until that is understood."""
    mode = os.environ.get(PEER_DIRECT_IO_ENV, "all") if mode is None else mode
    if mode == "all":
        return True
    if mode == "none":
        return False
    return flags & os.O_ACCMODE != os.O_RDONLY


class StorageFS(pyfuse3.Operations):
    """FUSE operations over a :class:`LocalStore` (see the module docstring)."""

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(
        self,
        store: LocalStore,
        resolver: RemoteResolver | None = None,
        *,
        files: OwnerFiles | None = None,
        peers: Callable[[], Collection[int]] = tuple,
        list_deadline: float = LIST_DEADLINE,
        replicas: Replicas | None = None,
    ) -> None:
        super().__init__()
        self.replicas = replicas  # replicated files: see dunix/storagefs/replicas.py
        self.passthrough = Passthrough()  # local files' reads and writes in the kernel
        self._rpaths: dict[int, str] = {}  # local handle -> path, of replicated files
        self.store = store
        self.resolver: RemoteResolver = resolver or NoPeers()
        self.files = files
        self.peers = peers
        self.list_deadline = list_deadline
        self.nursery: trio.Nursery | None = None  # set by serve_fs: read-ahead runs there
        self.mounted = False
        root_fd = os.open(store.tree, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        root_st = os.fstat(root_fd)
        self._root_key = (root_st.st_dev, root_st.st_ino)
        self._nodes: dict[int, _Node] = {ROOT: _Node(root_fd, 1)}
        self._remote = RemoteNodes()
        self._rfiles: dict[int, RemoteFile] = {}
        self._next_rfh = itertools.count(REMOTE_FH_BASE)
        self._dirs: dict[int, _Dir] = {}
        self._next_dir = 1

    # --- inode table ----------------------------------------------------------------------

    def _fd(self, ino: int) -> int:
        node = self._nodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return node.fd

    def _remote_node(self, ino: int) -> RemoteNode:
        node = self._remote.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return node

    def lock_target(self, ino: int) -> tuple[int, str] | None:
        """(owner, tree path) of a peer's file for its locks; None for one of this host."""
        remote = self._remote.get(ino)
        return None if remote is None else (remote.owner, remote.path)

    def _owner_files(self) -> OwnerFiles:
        if self.files is None:
            raise pyfuse3.FUSEError(errno.EREMOTE)  # no transport to the owners (tests)
        return self.files

    async def _ask(self, node: RemoteNode, op: str, **fields: object) -> FileReply:
        """``op`` on a peer's node by its name; its other names (hard links) if that is gone."""
        files = self._owner_files()
        names = [node.path, *node.others]
        for n, name in enumerate(names):
            try:
                reply = await files.call(node.owner, op, path=name, **fields)
            except FileNotFoundError:
                if n == len(names) - 1:
                    raise
                continue
            node.promote(name)
            return reply
        raise AssertionError("unreachable")

    def _ino(self, st: os.stat_result) -> int:
        if (st.st_dev, st.st_ino) == self._root_key:
            return ROOT
        return self.store.inode_number(st)

    def _remember(self, ino: int, fd: int) -> None:
        """The kernel now holds one more reference to ``ino``; ``fd`` is ours to keep or close."""
        node = self._nodes.get(ino)
        if node is None:
            self._nodes[ino] = _Node(fd, 1)
        else:
            node.lookups += 1
            os.close(fd)

    def _entry(self, fd: int) -> pyfuse3.EntryAttributes:
        """Register an O_PATH descriptor just opened for a reply that creates a kernel entry."""
        try:
            st = os.fstat(fd)
            ino = self._ino(st)
        except BaseException:
            os.close(fd)
            raise
        self._remember(ino, fd)
        return self._attr(st, ino)

    def _attr(self, st: os.stat_result, ino: int) -> pyfuse3.EntryAttributes:
        return self._attr_of(
            (ino, st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_rdev, st.st_size,
             st.st_blksize, st.st_blocks, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)
        )  # fmt: skip

    @staticmethod
    def _attr_of(attrs: tuple[int, ...]) -> pyfuse3.EntryAttributes:
        """Entry attributes from a stat tuple (peerfiles.stat_tuple order)."""
        attr = pyfuse3.EntryAttributes()
        (attr.st_ino, attr.st_mode, attr.st_nlink, attr.st_uid, attr.st_gid, attr.st_rdev,
         attr.st_size, attr.st_blksize, attr.st_blocks, attr.st_atime_ns, attr.st_mtime_ns,
         attr.st_ctime_ns) = attrs[:12]  # fmt: skip
        attr.generation = 0
        attr.entry_timeout = ATTR_TIMEOUT
        attr.attr_timeout = ATTR_TIMEOUT
        return attr

    def _open_path(self, parent_fd: int, name: bytes) -> int:
        return os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)

    def _tree_path(self, parent_fd: int, name: bytes) -> str:
        parent = self.store.relpath_of(os.readlink(_proc(parent_fd)))
        child = os.fsdecode(name)
        return f"{parent}/{child}" if parent else child

    def _path_of(self, ino: int) -> str:
        """The tree path of a node the kernel knows."""
        if ino == ROOT:
            return ""
        node = self._nodes.get(ino)
        if node is not None:
            return self.store.relpath_of(os.readlink(_proc(node.fd)))
        return self._remote_node(ino).path

    def _try_local(self, path: str) -> int | None:
        """An O_PATH descriptor of ``path`` on the local disk, or None if it is not here."""
        try:
            return os.open(self.store.backing_path(path), os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None

    @contextlib.contextmanager
    def _local_dir(self, ino: int, *, create: bool = False) -> Iterator[int | None]:
        """The local part of folder ``ino``: its descriptor, or None when this host has none.

        With ``create``, a folder only peers have is created here first (with the
        attributes the kernel was told), so a new file in it lives on this host.
        """
        node = self._nodes.get(ino)
        if node is not None:
            yield node.fd
            return
        path = self._remote_node(ino).path
        fd = self._try_local(path)
        if fd is None and create:
            self._make_folders(path)
            fd = self._try_local(path)
        try:
            yield fd
        finally:
            if fd is not None:
                os.close(fd)

    def _make_folders(self, path: str) -> None:
        parts = path.split("/")
        for n in range(1, len(parts) + 1):
            sub = "/".join(parts[:n])
            backing = self.store.backing_path(sub)
            if os.path.lexists(backing):
                continue
            known = self._remote.by_path(sub)
            mode, uid, gid = (known.attrs[1], known.attrs[3], known.attrs[4]) if known else (
                0o40755, 0, 0)  # fmt: skip
            with contextlib.suppress(FileExistsError):
                os.mkdir(backing, 0o700)
            os.chown(backing, uid, gid)
            os.chmod(backing, stat.S_IMODE(mode))

    def _new_owner(self, parent_fd: int, ctx: pyfuse3.RequestContext) -> tuple[int, int]:
        """uid and gid of a new file: the caller's, or the folder's group if it is setgid."""
        parent = os.fstat(parent_fd)
        gid = parent.st_gid if parent.st_mode & stat.S_ISGID else ctx.gid
        return ctx.uid, gid

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            if self._remote.forget(ino, count):
                continue
            node = self._nodes.get(ino)
            if node is None or ino == ROOT:
                continue
            node.lookups -= count
            if node.lookups <= 0:
                del self._nodes[ino]
                os.close(node.fd)

    # --- the owner side's kernel caches ---------------------------------------------------

    def notify_changed(self, path: str, contents: bool) -> None:
        """A peer changed ``path`` on this host's disk: drop what this kernel cached of it.

        Safe on the request path: without the writeback cache, invalidating an inode does
        not wait for the file system (pyfuse3.invalidate_inode); entries go through
        pyfuse3's invalidation thread.
        """
        if not self.mounted:
            return
        try:
            if contents:
                ino = self._ino(os.lstat(self.store.backing_path(path)))
                if ino in self._nodes:
                    pyfuse3.invalidate_inode(ino, attr_only=False)
            else:
                parent = posixpath.dirname(path)
                name = os.fsencode(posixpath.basename(path))
                # the kernel may know the folder as this host's part or as a peer's (a
                # merged folder another host made first: its entries, this host's files
                # included, hang below the peer's node), so both lose the name; left on
                # the peer's node, a file a peer removed here (the last job's /tmp/note)
                # stayed open-able by name for the entry timeout, and a write "succeeded"
                # into the removed file
                for pino in self._kernel_folders(parent):
                    pyfuse3.invalidate_entry_async(pino, name, ignore_enoent=True)
        except (OSError, StoreError) as exc:
            log.debug("storagefs: no invalidation for %s: %s", path, exc)

    def _kernel_folders(self, path: str) -> list[int]:
        """The inode numbers under which the kernel may hold the entries of folder ``path``."""
        found = []
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            ino = self._ino(os.lstat(self.store.backing_path(path)))
            if ino in self._nodes:
                found.append(ino)
        try:
            remote = self._remote.by_path(path)
        except KeyError:  # forgotten meanwhile: this runs on the agent's thread
            remote = None
        if remote is not None:
            found.append(remote.attrs[0])
        return found

    # --- names ----------------------------------------------------------------------------

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        with _fuse_errors():
            node = self._nodes.get(parent_inode)
            if node is not None:
                if name == b".." and parent_inode == ROOT:
                    name = b"."
                try:
                    return self._entry(self._open_path(node.fd, name))
                except FileNotFoundError:
                    if os.fstat(node.fd).st_nlink == 0:
                        raise  # the folder itself was removed: nothing to ask the peers
                    path = self._tree_path(node.fd, name)
            else:
                path = _join(self._remote_node(parent_inode).path, name)
                fd = self._try_local(path)
                if fd is not None:
                    return self._entry(fd)
            return await self._lookup_remote(path)

    async def _lookup_remote(self, path: str) -> pyfuse3.EntryAttributes:
        await self._drain_writes(path=path)  # the size it answers includes them
        found = await self.resolver.lookup(path)
        if found is None:
            owner = self._remote.last_owner(path)
            if owner is None or self.files is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            # This host saw the name on its owner, and nobody answered for it now: ask the
            # owner itself, so a dead owner is EIO (PeerUnreachable), never "no such file".
            # (The kernel may have forgotten the inode: a failed revalidation drops it.)
            try:
                reply = await self.files.call(owner, "stat", path=path)
            except FileNotFoundError:
                self._remote.gone(path)
                raise
            self._seen_remote(owner, path, reply.attrs)
            return self._attr_of(reply.attrs)
        attrs = found.attrs
        if len(attrs) < 12:
            attrs = (await self._owner_files().call(found.node, "stat", path=path)).attrs
        self._seen_remote(found.node, path, attrs)
        return self._attr_of(attrs)

    def _seen_remote(self, owner: int, path: str, attrs: tuple[int, ...]) -> None:
        """The owner just answered for ``path``: the kernel holds one more reference to its
        node, and ``path`` is the name asked from now on.

        An owner's inode number can come back under another name: a hard link, a rename
        done on the owner (peers are not told), or a number the owner's disk gave again to
        a new folder once the old one was removed (ext4 does; seen with the jobs' /tmp
        folders, ``.dunix-jobs/ID/tmp``, one job after the other). The kernel here takes the
        reply as the inode it still knows (same number, generation 0) and moves that
        folder's cached entries, children included, to the new name (d_splice_alias); with
        the old name kept, lookups and creates in the folder, and opens of the files below
        it, went to the old path: "no such file", or a file made under the old name. So a
        folder and every node known below it follow (a folder has one name); a file keeps
        its other names (hard links) to fall back on (``_ask``).
        """
        known = self._remote.get(attrs[0])
        old = None if known is None else known.path
        self._remote.remember(owner, path, attrs)
        node = self._remote.get(attrs[0])
        if old is None or old == path or node is None:
            return
        if stat.S_ISDIR(attrs[1]):
            self._remote.moved(old, path)
            node.others = [p for p in node.others if p != path]
        else:
            node.promote(path)

    async def _holder(self, path: str) -> int | None:
        """Which host has ``path``: this one, a peer, or None (nobody)."""
        if os.path.lexists(self.store.backing_path(path)):
            return self.store.node_id
        known = self._remote.by_path(path)
        if known is not None:
            return known.owner
        found = await self.resolver.lookup(path)
        return None if found is None else found.node

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        with _fuse_errors():
            remote = self._remote.get(inode)
            if remote is not None:
                await self._drain_writes(inode=inode)
                try:
                    reply = await self._ask(remote, "stat")
                except PeerUnreachable:
                    moved = await self._taken_over(remote, inode)
                    if moved is None:
                        raise
                    return self._attr_of(moved)
                remote.attrs = reply.attrs
                return self._attr_of(reply.attrs)
            return self._attr(os.fstat(self._fd(inode)), inode)

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        with _fuse_errors():
            remote = self._remote.get(inode)
            if remote is not None:
                return await self._setattr_remote(remote, attr, fields, fh)
            fd = self._fd(inode)
            if fields.update_size:
                if fh is not None:
                    os.ftruncate(fh, attr.st_size)
                else:
                    os.truncate(_proc(fd), attr.st_size)
            if fields.update_mode:
                if stat.S_ISLNK(os.fstat(fd).st_mode):
                    raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
                os.chmod(_proc(fd), stat.S_IMODE(attr.st_mode))
            if fields.update_uid or fields.update_gid:
                uid = attr.st_uid if fields.update_uid else -1
                gid = attr.st_gid if fields.update_gid else -1
                _syscalls.chown_fd(fd, uid, gid)
            if fields.update_atime or fields.update_mtime:
                _syscalls.utimens_fd(
                    fd,
                    attr.st_atime_ns if fields.update_atime else None,
                    attr.st_mtime_ns if fields.update_mtime else None,
                )
            if self.replicas is not None and self.replicas.any_owned():
                path = self._path_of(inode)
                if self.replicas.copies(path):
                    await self.replicas.changed_attrs(path, _change(attr, fields))
            return self._attr(os.fstat(fd), inode)

    async def _setattr_remote(
        self,
        remote: RemoteNode,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
    ) -> pyfuse3.EntryAttributes:
        change = _change(attr, fields)
        await self._drain_writes(inode=remote.attrs[0], path=remote.path)
        opened = self._rfiles.get(fh) if fh is not None else None
        handle = opened.handle if opened is not None and opened.owner == remote.owner else 0
        if fields.update_size:
            for rf in self._rfiles.values():
                if rf.path == remote.path:
                    rf.changed()
        reply = await self._ask(remote, "setattr", handle=handle, setattr=change)
        remote.attrs = reply.attrs
        return self._attr_of(reply.attrs)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        with _fuse_errors():
            remote = self._remote.get(inode)
            if remote is not None:
                reply = await self._ask(remote, "readlink")
                return reply.data
            return os.readlink(b"", dir_fd=self._fd(inode))

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        with _fuse_errors(), self._local_dir(parent_inode, create=True) as parent_fd:
            assert parent_fd is not None
            os.mknod(name, mode, rdev, dir_fd=parent_fd)
            return self._created(parent_fd, name, mode, ctx)

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        with _fuse_errors(), self._local_dir(parent_inode, create=True) as parent_fd:
            assert parent_fd is not None
            os.mkdir(name, stat.S_IMODE(mode), dir_fd=parent_fd)
            if os.fstat(parent_fd).st_mode & stat.S_ISGID:
                mode |= stat.S_ISGID  # a setgid folder's subfolders are setgid too (mkdir(2))
            return self._created(parent_fd, name, mode, ctx)

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        with _fuse_errors(), self._local_dir(parent_inode, create=True) as parent_fd:
            assert parent_fd is not None
            os.symlink(target, name, dir_fd=parent_fd)
            return self._created(parent_fd, name, None, ctx)

    def _created(
        self, parent_fd: int, name: bytes, mode: int | None, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """Give a new node its caller's ids and its exact mode (chown drops set-id bits, and
        our umask must not apply: the kernel applied the caller's)."""
        fd = self._open_path(parent_fd, name)
        try:
            _syscalls.chown_fd(fd, *self._new_owner(parent_fd, ctx))
            if mode is not None:  # exact: the kernel applied the caller's umask already
                os.chmod(_proc(fd), stat.S_IMODE(mode))
        except BaseException:
            os.close(fd)
            raise
        entry = self._entry(fd)
        self.resolver.created(self._tree_path(parent_fd, name))
        return entry

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        with _fuse_errors(), self._local_dir(parent_inode, create=True) as parent_fd:
            assert parent_fd is not None
            fh = os.open(
                name,
                (flags & ~os.O_NOCTTY) | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                stat.S_IMODE(mode),
                dir_fd=parent_fd,
            )
            try:
                os.fchown(fh, *self._new_owner(parent_fd, ctx))
                os.fchmod(fh, stat.S_IMODE(mode))  # exact, whatever this thread's umask
                entry = self._entry(os.open(_proc(fh), os.O_PATH | os.O_CLOEXEC))
            except BaseException:
                os.close(fh)
                raise
            path = self._tree_path(parent_fd, name)
            self.resolver.created(path)
            if self.replicas is not None and await self.replicas.created(
                path, entry.st_mode, entry.st_uid, entry.st_gid
            ):
                self._rpaths[fh] = path
                self.passthrough.plain(entry.st_ino, fh)
                return pyfuse3.FileInfo(fh=fh, keep_cache=True), entry
        # last: the handle's reply must follow (see passthrough.Passthrough.open)
        direct = self.passthrough.open(entry.st_ino, fh, _proc(fh))
        return pyfuse3.FileInfo(fh=fh, keep_cache=not direct), entry

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._remove(parent_inode, name, "unlink")

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._remove(parent_inode, name, "rmdir")

    async def _remove(self, parent_inode: int, name: bytes, op: str) -> None:
        with _fuse_errors():
            path = _join(self._path_of(parent_inode), name)
            peers = [p for p in self.peers() if p != self.store.node_id]
            if op == "rmdir" and peers and self.files is not None:
                # a folder is merged over hosts: empty everywhere, then gone everywhere
                listed = await self._list_peers(path, peers)
                if any(entries for entries in listed.values()):
                    raise pyfuse3.FUSEError(errno.ENOTEMPTY)
                removed = False
                with self._local_dir(parent_inode) as parent_fd:
                    if parent_fd is not None:
                        with contextlib.suppress(FileNotFoundError):
                            os.rmdir(name, dir_fd=parent_fd)
                            self.store.removed(path)
                            removed = True
                for peer in listed:
                    with contextlib.suppress(FileNotFoundError):
                        await self.files.call(peer, "rmdir", path=path)
                        removed = True
                if not removed:
                    raise pyfuse3.FUSEError(errno.ENOENT)
                return
            with self._local_dir(parent_inode) as parent_fd:
                if parent_fd is not None:
                    try:
                        (os.rmdir if op == "rmdir" else os.unlink)(name, dir_fd=parent_fd)
                        self.store.removed(path)
                        if self.replicas is not None:
                            await self.replicas.removed(path)
                        return
                    except FileNotFoundError:
                        if self.files is None:
                            raise
            owner = await self._holder(path)
            if owner is None or owner == self.store.node_id:
                raise pyfuse3.FUSEError(errno.ENOENT)
            await self._owner_files().call(owner, op, path=path)
            self._remote.gone(path)

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        with _fuse_errors():
            old = _join(self._path_of(parent_inode_old), name_old)
            new = _join(self._path_of(parent_inode_new), name_new)
            me = self.store.node_id
            source = self._try_local(old)
            if source is not None:
                is_dir = stat.S_ISDIR(os.fstat(source).st_mode)
                os.close(source)
                owner = me
            else:
                holder = await self._holder(old)
                if holder is None:
                    raise pyfuse3.FUSEError(errno.ENOENT)
                owner = holder
                known = self._remote.by_path(old)
                is_dir = known is not None and stat.S_ISDIR(known.attrs[1])
            target = None if self.files is None else await self._holder(new)
            if target is not None and target != owner:
                if flags & pyfuse3.RENAME_NOREPLACE:
                    raise pyfuse3.FUSEError(errno.EEXIST)
                if flags & pyfuse3.RENAME_EXCHANGE:
                    raise pyfuse3.FUSEError(errno.EXDEV)
            if owner == me:
                with (
                    self._local_dir(parent_inode_old) as old_fd,
                    self._local_dir(parent_inode_new, create=True) as new_fd,
                ):
                    assert old_fd is not None and new_fd is not None
                    _syscalls.renameat2(old_fd, name_old, new_fd, name_new, flags)
                if not flags & pyfuse3.RENAME_EXCHANGE:
                    self.store.renamed(old, new)
                    await self._replica_renamed(old, new)
                self.resolver.created(new)
            else:
                await self._owner_files().call(owner, "rename", path=old, path2=new, flags=flags)
            if is_dir and self.files is not None:
                # the folder's parts on the other hosts follow it
                for peer in self.peers():
                    if peer not in (owner, me):
                        with contextlib.suppress(OSError, PeerUnreachable):
                            await self.files.call(peer, "rename", path=old, path2=new)
            self._remote.moved(old, new)
            if target is not None and target != owner and not is_dir:
                # rename replaces the target: its copy on another host goes
                if target == me:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.store.backing_path(new))
                        self.store.removed(new)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        await self._owner_files().call(target, "unlink", path=new)

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        with _fuse_errors():
            remote = self._remote.get(inode)
            if remote is not None:
                path = _join(self._path_of(new_parent_inode), new_name)
                reply = await self._ask(remote, "link", path2=path)
                self._remote.remember(remote.owner, path, reply.attrs)
                return self._attr_of(reply.attrs)
            fd = self._fd(inode)
            with self._local_dir(new_parent_inode, create=True) as parent_fd:
                assert parent_fd is not None
                # linkat of the /proc magic link with AT_SYMLINK_FOLLOW links the descriptor's
                # own inode (open(2), O_TMPFILE), so a symlink is linked, not its target.
                os.link(_proc(fd), new_name, dst_dir_fd=parent_fd, follow_symlinks=True)
                entry = self._entry(self._open_path(parent_fd, new_name))
                self.resolver.created(self._tree_path(parent_fd, new_name))
                return entry

    # --- file contents --------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        with _fuse_errors():
            remote = self._remote.get(inode)
            if remote is not None:
                reply = await self._ask(remote, "open", flags=flags)
                fh = next(self._next_rfh)
                self._rfiles[fh] = RemoteFile(remote.owner, reply.handle, remote.path,
                                              flags=flags, inode=inode)  # fmt: skip
                # other hosts may write it meanwhile: no page cache across opens; and
                # direct_io for some opens (when shared mmaps still work): see peer_direct_io
                direct = self.passthrough.shared_mmap_direct() and peer_direct_io(flags)
                return pyfuse3.FileInfo(fh=fh, keep_cache=False, direct_io=direct)
            fd = self._fd(inode)
            # O_APPEND stays: pwrite on an O_APPEND descriptor appends (pwrite(2), BUGS),
            # which keeps appends atomic against other writers of the backing file.
            fh = os.open(_proc(fd), (flags & ~_OPEN_DROP) | os.O_CLOEXEC)
            if self.replicas is not None and self.replicas.any_owned():
                await self._replica_open(inode, fh, flags)
                # its writes must reach the replicas: Python's path; unless the file got
                # replicas while open passthrough (the kernel fails a mixed open: EIO)
                if fh in self._rpaths and not self.passthrough.direct(inode):
                    self.passthrough.plain(inode, fh)
                    return pyfuse3.FileInfo(fh=fh, keep_cache=True)
            # last: the handle's reply must follow (see passthrough.Passthrough.open)
            direct = self.passthrough.open(inode, fh, _proc(fd))
        return pyfuse3.FileInfo(fh=fh, keep_cache=not direct)

    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]
        with _fuse_errors():
            rf = self._rfiles.get(fh)
            if rf is not None:
                if rf.local_fd is not None:
                    return os.pread(rf.local_fd, size, off)
                await self._drain_writes(inode=rf.inode)
                try:
                    return await rf.read(self._owner_files().call, off, size, self.nursery)
                except PeerUnreachable:
                    if not await self._reopen(rf):
                        raise
                return await self.read(fh, off, size)
            return os.pread(fh, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        with _fuse_errors():
            rf = self._rfiles.get(fh)
            if rf is not None and rf.local_fd is not None:  # taken over here meanwhile
                fh = rf.local_fd
            elif rf is not None:
                return await rf.write(self._owner_files().call, off, buf, self.nursery)
            written = os.pwrite(fh, buf, off)
            path = self._rpaths.get(fh) if rf is None else rf.path
            if path is not None and self.replicas is not None and self.replicas.copies(path):
                await self._replica_write(fh, path, off, bytes(buf[:written]))
            return written

    async def flush(self, fh: int) -> None:
        with _fuse_errors():
            rf = self._rfiles.get(fh)
            if rf is not None and rf.local_fd is None:
                await rf.drain(self._owner_files().call)

    async def release(self, fh: int) -> None:
        with _fuse_errors():
            rf = self._rfiles.pop(fh, None)
            if rf is not None and rf.local_fd is not None:
                os.close(rf.local_fd)
                return
            if rf is not None:
                try:
                    await rf.drain(self._owner_files().call)
                except (OSError, DunixError, pyfuse3.FUSEError) as exc:  # flush said it
                    log.info("storagefs: a write to %s on node %d: %s", rf.path, rf.owner, exc)
                try:
                    await self._owner_files().call(rf.owner, "release", handle=rf.handle)
                except PeerUnreachable as exc:
                    log.info("storagefs: release of %s on node %d: %s", rf.path, rf.owner, exc)
                return
            self._rpaths.pop(fh, None)
            self.passthrough.released(fh)
            os.close(fh)

    async def fsync(self, fh: int, datasync: bool) -> None:
        with _fuse_errors():
            rf = self._rfiles.get(fh)
            if rf is not None and rf.local_fd is not None:  # taken over here meanwhile
                fh = rf.local_fd
            elif rf is not None:
                await rf.drain(self._owner_files().call)
                await self._owner_files().call(
                    rf.owner, "fsync", handle=rf.handle, flags=int(datasync)
                )
                return
            await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fh)
            path = self._rpaths.get(fh) if rf is None else rf.path
            if path is not None and self.replicas is not None:
                await self.replicas.synced(path)

    # --- folders --------------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        with _fuse_errors():
            node = self._nodes.get(inode)
            if node is not None:
                folder = _Dir(node.fd, inode, self._path_of(inode))
            else:
                path = self._remote_node(inode).path
                fd = self._try_local(path)
                folder = _Dir(fd, inode, path, owned=fd is not None)
        handle = self._next_dir
        self._next_dir += 1
        self._dirs[handle] = folder
        return handle

    async def _list_peers(
        self, path: str, peers: Collection[int]
    ) -> dict[int, tuple[tuple[str, tuple[int, ...]], ...]]:
        """The peers' parts of folder ``path`` (peers without it or silent are left out)."""
        files = self.files
        out: dict[int, tuple[tuple[str, tuple[int, ...]], ...]] = {}
        if files is None:
            return out

        async def ask(peer: int) -> None:
            try:
                out[peer] = (await files.call(peer, "listdir", path=path)).entries
            except (FileNotFoundError, NotADirectoryError):
                pass
            except (OSError, DunixError) as exc:
                log.info("storagefs: node %d did not list %s: %s", peer, path, exc)

        with trio.move_on_after(self.list_deadline):
            async with trio.open_nursery() as nursery:
                for peer in peers:
                    nursery.start_soon(ask, peer)
        return out

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        folder = self._dirs[fh]
        with _fuse_errors():
            if start_id == 0:
                # A snapshot per listing, so entries added or removed meanwhile cannot make
                # others be skipped or repeated (the readdir contract).
                local: set[bytes] = set()
                if folder.fd is not None:
                    real = os.open(_proc(folder.fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                    try:
                        local = {os.fsencode(n) for n in os.listdir(real)}
                    finally:
                        os.close(real)
                peers = [p for p in self.peers() if p != self.store.node_id]
                listed = await self._list_peers(folder.path, peers) if peers else {}
                folder.remote = {}
                for peer in sorted(listed):
                    for entry_name, attrs in listed[peer]:
                        key = os.fsencode(entry_name)
                        if key not in local and key not in folder.remote:
                            folder.remote[key] = (peer, attrs)
                folder.names = sorted(local | set(folder.remote))
                here = self._dir_attr(folder)
                # "." and ".." do not count as lookups (see Operations.readdir)
                if not pyfuse3.readdir_reply(token, b".", here, 1):
                    return
                start_id = 1
            if start_id == 1:
                up = self._dot_dot(folder)
                if not pyfuse3.readdir_reply(token, b"..", up, 2):
                    return
                start_id = 2
            for index in range(start_id - 2, len(folder.names)):
                name = folder.names[index]
                if name in folder.remote:
                    owner, attrs = folder.remote[name]
                    if not pyfuse3.readdir_reply(token, name, self._attr_of(attrs), index + 3):
                        return
                    self._seen_remote(owner, _join(folder.path, name), attrs)
                    continue
                assert folder.fd is not None
                try:
                    fd = self._open_path(folder.fd, name)
                except FileNotFoundError:
                    continue  # removed since the snapshot
                try:
                    st = os.fstat(fd)
                    ino = self._ino(st)
                    replied = pyfuse3.readdir_reply(token, name, self._attr(st, ino), index + 3)
                except BaseException:
                    os.close(fd)
                    raise
                if not replied:
                    os.close(fd)
                    return
                self._remember(ino, fd)

    def _dir_attr(self, folder: _Dir) -> pyfuse3.EntryAttributes:
        remote = self._remote.get(folder.ino)
        if remote is not None:
            return self._attr_of(remote.attrs)
        assert folder.fd is not None
        return self._attr(os.fstat(folder.fd), folder.ino)

    def _dot_dot(self, folder: _Dir) -> pyfuse3.EntryAttributes:
        if folder.ino == ROOT:
            return self._attr(os.fstat(self._fd(ROOT)), ROOT)
        if folder.fd is None:
            return self._dir_attr(folder)  # the parent's number is not known here
        st = os.stat(b"..", dir_fd=folder.fd, follow_symlinks=False)
        return self._attr(st, self._ino(st))

    async def releasedir(self, fh: int) -> None:
        folder = self._dirs.pop(fh, None)
        if folder is not None and folder.owned and folder.fd is not None:
            os.close(folder.fd)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        folder = self._dirs[fh]
        if folder.fd is None:
            return
        with _fuse_errors():
            real = os.open(_proc(folder.fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                await trio.to_thread.run_sync(os.fsync, real)
            finally:
                os.close(real)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        with _fuse_errors():
            vfs = os.statvfs(self.store.tree)
        data = pyfuse3.StatvfsData()
        data.f_bsize = vfs.f_bsize
        data.f_frsize = vfs.f_frsize
        data.f_blocks = vfs.f_blocks
        data.f_bfree = vfs.f_bfree
        data.f_bavail = vfs.f_bavail
        data.f_files = vfs.f_files
        data.f_ffree = vfs.f_ffree
        data.f_favail = vfs.f_favail
        data.f_namemax = vfs.f_namemax
        return data

    # --- writes gathered for peers' files (remote_nodes.RemoteFile.write) -----------------

    async def _drain_writes(self, *, inode: int = 0, path: str = "") -> None:
        """Writes made here to a peer's file (``inode``, or the one at ``path``) reach its
        owner before this host reads, stats or locks it: the owner's answer includes them."""
        for rf in [f for f in self._rfiles.values() if f.behind()]:
            if (inode and rf.inode == inode) or (path and rf.path == path):
                await rf.drain(self._owner_files().call, report=False)

    def drains_writes(self, call: Call) -> Call:
        """``call`` to owners, lock requests after this host's writes to the file (the next
        holder of the lock reads them on the owner)."""

        async def call_after_writes(peer: int, op: str, **fields: object) -> FileReply:
            if op == "lock" and isinstance(fields.get("path"), str):
                await self._drain_writes(path=str(fields["path"]))
            return await call(peer, op, **fields)

        return call_after_writes

    # --- replicated files (dunix/storagefs/replicas.py) ------------------------------------

    async def _taken_over(self, node: RemoteNode, ino: int) -> tuple[int, ...] | None:
        """The attributes of a peer's node whose owner cannot be reached, from the host that
        took the file over (this one or a peer; then the node is asked there from now on),
        under the number the kernel knows; None when nobody did."""
        local = self._try_local(node.path)
        if local is not None:
            try:
                return stat_tuple(os.fstat(local), ino)
            finally:
                os.close(local)
        found = await self.resolver.lookup(node.path)
        if found is None or found.node == node.owner or len(found.attrs) < 12:
            return None
        node.owner = found.node
        return (ino, *found.attrs[1:])

    async def _reopen(self, rf: RemoteFile) -> bool:
        """The owner of a peer's file open here cannot be reached: if a replica took the
        file over (another host, or this one), reads of the open file continue there."""
        keep = rf.flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC)
        local = self._try_local(rf.path)
        if local is not None:
            try:
                rf.local_fd = os.open(_proc(local), keep | os.O_CLOEXEC)
            finally:
                os.close(local)
        else:
            found = await self.resolver.lookup(rf.path)
            if found is None or found.node == rf.owner:
                return False
            reply = await self._owner_files().call(found.node, "open", path=rf.path, flags=keep)
            rf.owner, rf.handle = found.node, reply.handle
        rf.changed()
        log.warning("storagefs: %s, open here, is read from node %s now", rf.path,
                    "this host" if rf.local_fd is not None else rf.owner)  # fmt: skip
        return True

    async def _replica_open(self, inode: int, fh: int, flags: int) -> None:
        assert self.replicas is not None
        path = self._path_of(inode)
        if self.replicas.copies(path):
            self._rpaths[fh] = path
            if flags & os.O_TRUNC:
                await self.replicas.changed_attrs(path, (0, None, None, None, None, None))

    async def _replica_write(self, fh: int, path: str, off: int, data: bytes) -> None:
        assert self.replicas is not None
        st = os.fstat(fh)
        if fcntl.fcntl(fh, fcntl.F_GETFL) & os.O_APPEND:
            off = st.st_size - len(data)  # where the kernel put it
        await self.replicas.wrote(path, off, data, st.st_mtime_ns)

    async def _replica_renamed(self, old: str, new: str) -> None:
        if self.replicas is None or not self.replicas.any_owned():
            return
        for fh, path in list(self._rpaths.items()):
            if path == old or path.startswith(old + "/"):
                self._rpaths[fh] = new + path[len(old) :]
        await self.replicas.renamed(old, new)

    async def _replica_xattr(self, inode: int, name: bytes) -> bytes:
        """The factor of a folder, or a file's ``owner,replica,...`` (dunix fs where)."""
        if self.replicas is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        path = self._path_of(inode)
        if name == FACTOR_XATTR.encode():
            return str(self.replicas.factor_at(path)).encode()
        remote = self._remote.get(inode)
        if remote is not None and not stat.S_ISDIR(remote.attrs[1]):
            found = (await self._ask(remote, "rwhere")).attrs
        else:
            found = self.replicas.where(path) or (self.store.node_id,)
        return ",".join(str(n) for n in found).encode()

    async def _set_factor(self, inode: int, value: bytes) -> None:
        """``dunix fs replicas N PATH``: a folder's factor, on every host."""
        if self.replicas is None:
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        remote = self._remote.get(inode)
        mode = remote.attrs[1] if remote is not None else os.fstat(self._fd(inode)).st_mode
        if not stat.S_ISDIR(mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        try:
            factor = int(value.decode())
        except ValueError:
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        if factor < 1:
            raise pyfuse3.FUSEError(errno.EINVAL)
        await self.replicas.set_factor(self._path_of(inode), factor)

    # --- extended attributes (so cp -a and tar --xattrs keep them) ------------------------

    def _xattr_target(self, inode: int) -> str | None:
        """The path that reaches the inode's xattrs; None for a symlink, which has none here
        (the /proc magic link would follow it, and user.* xattrs are not allowed on one)."""
        fd = self._fd(inode)
        return None if stat.S_ISLNK(os.fstat(fd).st_mode) else _proc(fd)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        with _fuse_errors():
            if name in (FACTOR_XATTR.encode(), WHERE_XATTR.encode()):
                return await self._replica_xattr(inode, name)
            remote = self._remote.get(inode)
            if remote is not None:
                caps = name == CAPS_XATTR
                if caps and remote.caps_absent():  # asked before each write: see RemoteNode
                    raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
                try:
                    reply = await self._ask(remote, "getxattr", path2=os.fsdecode(name))
                except OSError as exc:
                    if caps:
                        remote.caps_checked(exc.errno == pyfuse3.ENOATTR)
                    raise
                return reply.data
            target = self._xattr_target(inode)
            if target is None:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
            return os.getxattr(target, name)

    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        with _fuse_errors():
            if name == FACTOR_XATTR.encode():
                await self._set_factor(inode, bytes(value))
                return
            remote = self._remote.get(inode)
            if remote is not None:
                remote.caps_checked(False)
                await self._ask(remote, "setxattr", path2=os.fsdecode(name), data=bytes(value))
                return
            target = self._xattr_target(inode)
            if target is None:
                raise pyfuse3.FUSEError(errno.EPERM)
            os.setxattr(target, name, value)
            self.passthrough.xattrs_changed(inode)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        with _fuse_errors():
            remote = self._remote.get(inode)
            if remote is not None:
                reply = await self._ask(remote, "listxattr")
                return [n for n in reply.data.split(b"\0") if n]
            target = self._xattr_target(inode)
            return [] if target is None else [os.fsencode(n) for n in os.listxattr(target)]

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        with _fuse_errors():
            remote = self._remote.get(inode)
            if remote is not None:
                remote.caps_checked(False)
                await self._ask(remote, "removexattr", path2=os.fsdecode(name))
                return
            target = self._xattr_target(inode)
            if target is None:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
            os.removexattr(target, name)
            self.passthrough.xattrs_changed(inode)


#: the kernel's read-ahead on the mount, KiB: reads then reach us as 1 MiB requests (the
#: default 128 KiB makes 8 Python calls per MiB, and the backing file is read in small sync
#: steps); measured with fio on a cold backing file: 440 -> 480..870 MB/s, CPU per MiB halved
READ_AHEAD_KB = 1024


async def _raise_read_ahead(mountpoint: str) -> None:
    """Set the mount's bdi read-ahead (``/sys/class/bdi/MAJ:MIN/read_ahead_kb``); FUSE
    splits it into requests of up to ``max_pages`` (1 MiB with libfuse 3.14).

    Only once the kernel took our INIT reply: it lowers the bdi's read-ahead to the
    ``max_readahead`` of that reply (fs/fuse/inode.c process_init_reply), which is what
    the kernel proposed at mount time (128 KiB). A stat of the mount root from a worker
    thread returns only after that (requests wait for INIT), served by this very loop.
    """
    try:
        await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
        with open("/proc/self/mountinfo") as f:
            devs = [line.split()[2] for line in f if line.split()[4] == mountpoint]
        if not devs:
            raise OSError(f"{mountpoint} not in mountinfo")
        knob = f"/sys/class/bdi/{devs[-1]}/read_ahead_kb"
        with open(knob, "w") as f:
            f.write(str(READ_AHEAD_KB))
    except OSError as exc:
        log.info("storagefs: read-ahead of %s stays the kernel's: %s", mountpoint, exc)


async def _after_init(fs: StorageFS, mountpoint: str) -> None:
    await _raise_read_ahead(mountpoint)  # returns once the kernel took the INIT reply
    fs.passthrough.announce()


async def serve(
    store: LocalStore,
    mountpoint: str,
    resolver: RemoteResolver | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Mount ``store`` at ``mountpoint`` and serve until unmounted or cancelled.

    The mount is gone when this returns, whatever the reason.
    """
    await serve_fs(StorageFS(store, resolver), mountpoint, task_status=task_status)


async def serve_fs(
    fs: StorageFS,
    mountpoint: str,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Mount ``fs`` at ``mountpoint`` and serve until unmounted or cancelled (see serve).

    A failed mount raises RuntimeError (pyfuse3's way) before ``task_status.started``.
    New nodes get exactly the mode the kernel sends (it applied the caller's umask), by an
    explicit chmod, so the serving process keeps its own umask.
    """
    pyfuse3.init(fs, mountpoint, set(MOUNT_OPTIONS))
    unmounted = False
    try:
        async with trio.open_nursery() as nursery:
            fs.nursery = nursery
            fs.mounted = True
            nursery.start_soon(_after_init, fs, os.path.abspath(mountpoint))
            task_status.started()
            await pyfuse3.main()
            unmounted = True  # the loop ends by itself only when the file system was unmounted
            nursery.cancel_scope.cancel()  # read-ahead of files nobody can read any more
    finally:
        fs.mounted = False
        fs.nursery = None
        pyfuse3.close(unmount=not unmounted)


async def _serve_until_signal(store: LocalStore, mountpoint: str) -> None:
    """Serve until SIGTERM or SIGINT (then unmount), or until someone unmounts it."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def serve_then_stop(task_status: trio.TaskStatus[None]) -> None:
                await serve(store, mountpoint, task_status=task_status)
                nursery.cancel_scope.cancel()

            await nursery.start(serve_then_stop)
            print(f"storagefs: serving {store.tree} at {mountpoint}", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dunix.storagefs.fs",
        description="Serve a local storagefs store over FUSE (single host, no peers yet).",
        epilog="$ python -m dunix.storagefs.fs --store /var/tmp/disk --mount /dunix/fs",
    )
    parser.add_argument("--store", required=True, help="the host's local disk folder")
    parser.add_argument("--mount", required=True, help="the mount point")
    parser.add_argument("--node", type=int, default=1, help="this host's node id (default 1)")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING)
    try:
        with LocalStore(args.store, args.node) as store:
            trio.run(_serve_until_signal, store, args.mount)
    except DunixError as exc:
        print(f"storagefs: {exc}", file=sys.stderr)
        return exc.exit_code
    except RuntimeError as exc:  # pyfuse3 reports a failed mount this way
        print(f"storagefs: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
