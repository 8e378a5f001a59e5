"""The storagefs FUSE file system (pyfuse3 on trio), serving one host's local store.

Each inode the kernel knows is held as an ``O_PATH`` descriptor on the backing file (as
libfuse's passthrough_ll does), so a rename of it or of a folder above it changes nothing
here, and an unlinked file that is still open stays reachable until the kernel forgets it.
Inode numbers come from :mod:`dunix.pid.devino` (owner node in the high bits, the backing
inode below); FUSE cannot set st_dev per file (see that module).

A name that is not on the local disk goes to the :class:`RemoteResolver`. The agent will
implement it with :mod:`dunix.storagefs.lookup` over its peer links; until then
:class:`NoPeers` answers every remote lookup with ENOENT.

The kernel checks permissions (``default_permissions``); the server runs as root and gives
new files the caller's uid and gid. It must run with umask 0: the kernel already applied the
caller's umask to the modes it sends (fs/fuse/dir.c, unless FUSE_CAP_DONT_MASK).

Local system calls run inline on the trio thread: against a local disk they take
microseconds, less than a hop to a worker thread; only fsync goes to a thread.

Usage (one mount per process: pyfuse3 keeps its session in module globals)::

    python -m dunix.storagefs.fs --store /var/lib/dunix/disk --mount /dunix/fs --node 3
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import stat
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import pyfuse3
import trio

from dunix.errors import DunixError
from dunix.storagefs import _syscalls
from dunix.storagefs.lookup import LookupReply
from dunix.storagefs.store import LocalStore

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
#: how long the kernel may trust an answer; the owner is the only writer of its files, and
#: the agent will invalidate entries when a peer changes one (pyfuse3.invalidate_entry)
ATTR_TIMEOUT = 1.0
MOUNT_OPTIONS = frozenset(
    {"default_permissions", "allow_other", "fsname=dunix", "subtype=storagefs"}
)
# O_NOFOLLOW: the kernel resolved the name already; the /proc magic link must be followed
_OPEN_DROP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW


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
    fd: int  # O_PATH descriptor of the directory
    ino: int
    names: list[bytes] = field(default_factory=list)


class StorageFS(pyfuse3.Operations):
    """FUSE operations over a :class:`LocalStore` (see the module docstring)."""

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, store: LocalStore, resolver: RemoteResolver | None = None) -> None:
        super().__init__()
        self.store = store
        self.resolver: RemoteResolver = resolver or NoPeers()
        root_fd = os.open(store.tree, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        root_st = os.fstat(root_fd)
        self._root_key = (root_st.st_dev, root_st.st_ino)
        self._nodes: dict[int, _Node] = {ROOT: _Node(root_fd, 1)}
        self._dirs: dict[int, _Dir] = {}
        self._next_dir = 1

    # --- inode table ----------------------------------------------------------------------

    def _fd(self, ino: int) -> int:
        node = self._nodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return node.fd

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
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = ino
        attr.generation = 0
        attr.entry_timeout = ATTR_TIMEOUT
        attr.attr_timeout = ATTR_TIMEOUT
        attr.st_mode = st.st_mode
        attr.st_nlink = st.st_nlink
        attr.st_uid = st.st_uid
        attr.st_gid = st.st_gid
        attr.st_rdev = st.st_rdev
        attr.st_size = st.st_size
        attr.st_blksize = st.st_blksize
        attr.st_blocks = st.st_blocks
        attr.st_atime_ns = st.st_atime_ns
        attr.st_mtime_ns = st.st_mtime_ns
        attr.st_ctime_ns = st.st_ctime_ns
        return attr

    def _open_path(self, parent_fd: int, name: bytes) -> int:
        return os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)

    def _tree_path(self, parent_fd: int, name: bytes) -> str:
        parent = self.store.relpath_of(os.readlink(_proc(parent_fd)))
        child = os.fsdecode(name)
        return f"{parent}/{child}" if parent else child

    def _new_owner(self, parent_fd: int, ctx: pyfuse3.RequestContext) -> tuple[int, int]:
        """uid and gid of a new file: the caller's, or the folder's group if it is setgid."""
        parent = os.fstat(parent_fd)
        gid = parent.st_gid if parent.st_mode & stat.S_ISGID else ctx.gid
        return ctx.uid, gid

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            node = self._nodes.get(ino)
            if node is None or ino == ROOT:
                continue
            node.lookups -= count
            if node.lookups <= 0:
                del self._nodes[ino]
                os.close(node.fd)

    # --- names ----------------------------------------------------------------------------

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent_fd = self._fd(parent_inode)
        if name == b".." and parent_inode == ROOT:
            name = b"."
        with _fuse_errors():
            try:
                fd = self._open_path(parent_fd, name)
            except FileNotFoundError:
                if os.fstat(parent_fd).st_nlink == 0:
                    raise  # the folder itself was removed: nothing to ask the peers
                path = self._tree_path(parent_fd, name)
                found = await self.resolver.lookup(path)
                if found is None:
                    raise
                # Serving a peer's file (streaming, remote inodes) is the agent's next step.
                log.warning("storagefs: %s is on node %d; remote files not served yet",
                            path, found.node)  # fmt: skip
                raise pyfuse3.FUSEError(errno.EREMOTE) from None
            return self._entry(fd)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        with _fuse_errors():
            return self._attr(os.fstat(self._fd(inode)), inode)

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        fd = self._fd(inode)
        with _fuse_errors():
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
            return self._attr(os.fstat(fd), inode)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        with _fuse_errors():
            return os.readlink(b"", dir_fd=self._fd(inode))

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent_fd = self._fd(parent_inode)
        with _fuse_errors():
            os.mknod(name, mode, rdev, dir_fd=parent_fd)
            return self._created(parent_fd, name, mode, ctx)

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent_fd = self._fd(parent_inode)
        with _fuse_errors():
            os.mkdir(name, stat.S_IMODE(mode), dir_fd=parent_fd)
            return self._created(parent_fd, name, None, ctx)

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent_fd = self._fd(parent_inode)
        with _fuse_errors():
            os.symlink(target, name, dir_fd=parent_fd)
            return self._created(parent_fd, name, None, ctx)

    def _created(
        self, parent_fd: int, name: bytes, mode: int | None, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """Give a new node its caller's ids; chown drops set-id bits, so put them back."""
        fd = self._open_path(parent_fd, name)
        try:
            _syscalls.chown_fd(fd, *self._new_owner(parent_fd, ctx))
            if mode is not None and mode & (stat.S_ISUID | stat.S_ISGID):
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
        parent_fd = self._fd(parent_inode)
        with _fuse_errors():
            fh = os.open(
                name,
                (flags & ~os.O_NOCTTY) | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                stat.S_IMODE(mode),
                dir_fd=parent_fd,
            )
            try:
                os.fchown(fh, *self._new_owner(parent_fd, ctx))
                if mode & (stat.S_ISUID | stat.S_ISGID):
                    os.fchmod(fh, stat.S_IMODE(mode))
                entry = self._entry(os.open(_proc(fh), os.O_PATH | os.O_CLOEXEC))
            except BaseException:
                os.close(fh)
                raise
            self.resolver.created(self._tree_path(parent_fd, name))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), entry

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent_fd = self._fd(parent_inode)
        with _fuse_errors():
            os.unlink(name, dir_fd=parent_fd)
            self.store.removed(self._tree_path(parent_fd, name))

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent_fd = self._fd(parent_inode)
        with _fuse_errors():
            os.rmdir(name, dir_fd=parent_fd)
            self.store.removed(self._tree_path(parent_fd, name))

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        old_fd, new_fd = self._fd(parent_inode_old), self._fd(parent_inode_new)
        with _fuse_errors():
            _syscalls.renameat2(old_fd, name_old, new_fd, name_new, flags)
            new_path = self._tree_path(new_fd, name_new)
            if not flags & pyfuse3.RENAME_EXCHANGE:
                self.store.renamed(self._tree_path(old_fd, name_old), new_path)
            self.resolver.created(new_path)

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        fd, parent_fd = self._fd(inode), self._fd(new_parent_inode)
        with _fuse_errors():
            # linkat of the /proc magic link with AT_SYMLINK_FOLLOW links the descriptor's own
            # inode (open(2), O_TMPFILE), so a symlink is linked, not its target.
            os.link(_proc(fd), new_name, dst_dir_fd=parent_fd, follow_symlinks=True)
            entry = self._entry(self._open_path(parent_fd, new_name))
            self.resolver.created(self._tree_path(parent_fd, new_name))
            return entry

    # --- file contents --------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        fd = self._fd(inode)
        with _fuse_errors():
            # O_APPEND stays: pwrite on an O_APPEND descriptor appends (pwrite(2), BUGS),
            # which keeps appends atomic against other writers of the backing file.
            fh = os.open(_proc(fd), (flags & ~_OPEN_DROP) | os.O_CLOEXEC)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        with _fuse_errors():
            return os.pread(fh, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        with _fuse_errors():
            return os.pwrite(fh, buf, off)

    async def flush(self, fh: int) -> None:
        pass

    async def release(self, fh: int) -> None:
        with _fuse_errors():
            os.close(fh)

    async def fsync(self, fh: int, datasync: bool) -> None:
        with _fuse_errors():
            await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fh)

    # --- folders --------------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        fd = self._fd(inode)
        handle = self._next_dir
        self._next_dir += 1
        self._dirs[handle] = _Dir(fd, inode)
        return handle

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        folder = self._dirs[fh]
        with _fuse_errors():
            if start_id == 0:
                # A snapshot per listing, so entries added or removed meanwhile cannot make
                # others be skipped or repeated (the readdir contract).
                real = os.open(_proc(folder.fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    folder.names = sorted(os.fsencode(n) for n in os.listdir(real))
                finally:
                    os.close(real)
                here = self._attr(os.fstat(folder.fd), folder.ino)
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

    def _dot_dot(self, folder: _Dir) -> pyfuse3.EntryAttributes:
        if folder.ino == ROOT:
            return self._attr(os.fstat(folder.fd), ROOT)
        st = os.stat(b"..", dir_fd=folder.fd, follow_symlinks=False)
        return self._attr(st, self._ino(st))

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        folder = self._dirs[fh]
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

    # --- extended attributes (so cp -a and tar --xattrs keep them) ------------------------

    def _xattr_target(self, inode: int) -> str | None:
        """The path that reaches the inode's xattrs; None for a symlink, which has none here
        (the /proc magic link would follow it, and user.* xattrs are not allowed on one)."""
        fd = self._fd(inode)
        return None if stat.S_ISLNK(os.fstat(fd).st_mode) else _proc(fd)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        with _fuse_errors():
            target = self._xattr_target(inode)
            if target is None:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
            return os.getxattr(target, name)

    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        with _fuse_errors():
            target = self._xattr_target(inode)
            if target is None:
                raise pyfuse3.FUSEError(errno.EPERM)
            os.setxattr(target, name, value)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        with _fuse_errors():
            target = self._xattr_target(inode)
            return [] if target is None else [os.fsencode(n) for n in os.listxattr(target)]

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        with _fuse_errors():
            target = self._xattr_target(inode)
            if target is None:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
            os.removexattr(target, name)


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
    os.umask(0)
    pyfuse3.init(StorageFS(store, resolver), mountpoint, set(MOUNT_OPTIONS))
    unmounted = False
    try:
        task_status.started()
        await pyfuse3.main()
        unmounted = True  # the loop ends by itself only when the file system was unmounted
    finally:
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
