"""Replicated files (issue 5, part 4): copies on other hosts, and a replica taking over.

``dunix fs replicas N PATH`` gives a folder a replication factor N (stored in every host's
``folders`` table, see ``store.py``); a regular file created below it, on whatever host,
gets N-1 *replicas*: alive peers chosen by rendezvous hashing of its path, recorded with the
file (``files.replicas`` on the owner). From then on every change the owner makes to it --
written bytes, truncation and other attributes, fsync, unlink, rename -- is sent to each
replica and waited for before the caller's system call returns, so N hosts hold every
acknowledged write. A replica keeps its copy in the store's ``replicas/`` folder, outside
the tree: it is not a file of that host (lookups and listings never see it) until it
takes over.

When membership declares the owner dead, each replica computes the same successor (the
first replica of the file's list still alive, :func:`successor`); the successor renames
its copy into its tree (one ``rename(2)``: the file appears whole or not at all) and owns
it from then on, with the remaining replicas. Readers find it there by the ordinary
lookup. An owner that comes back asks its replicas (:meth:`Replicas.reconcile`, when a
peer is seen alive): a replica that took over means the returning copy is stale, and it
is dropped; a replica that missed writes while it was away is dropped from the set (and
drops its stale copy when it sees the owner again).

Files that were in the folder before it got its factor (or before the factor grew) get
their replicas by a whole copy (:meth:`Replicas.refill`) after the owner walks the folder
(:meth:`Replicas.scan`); so does a file whose replica died: the dead one stays in the set
(it is asked when it comes back, see :meth:`Replicas.reconcile`) and an alive host is
added. Each host walks its replicated folders once when its agent starts, so a copy an
agent restart interrupted is made then.

Limits: symlinks, special files and hard links are not replicated; a replica unreachable
during a write is dropped from the set rather than failing the write; a lower factor
leaves existing copies in place.

Requests between hosts are ``peerfiles.FileRequest`` with the ops in :data:`OPS`, served by
:meth:`Replicas.serve` (the agent's ``FileServer`` hands them over). The settings and the
replica table are shared by the FUSE thread and the agent's loop (one :class:`_Shared`);
each side has its own :class:`Replicas` view with the way it reaches peers (``call``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import posixpath
import stat
import threading
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field

import trio

from dunix.errors import DunixError, StoreError
from dunix.storagefs import _syscalls
from dunix.storagefs.peerfiles import FileReply, FileRequest, FileServer
from dunix.storagefs.store import FileMeta, IncomingFile, LocalStore, clean_relpath

log = logging.getLogger(__name__)

#: the xattr that sets (``setxattr``) or reads a folder's replication factor
FACTOR_XATTR = "user.dunix.replicas"
#: the read-only xattr naming a file's owner and replicas (``owner,replica,...``)
WHERE_XATTR = "user.dunix.where"
OPS = frozenset(
    {"rcreate", "rwrite", "rsetattr", "runlink", "rrename", "rfsync", "rfactor", "rwhere",
     "rfill", "rmeta"}
)  # fmt: skip
#: bytes per ``rfill`` request (a whole-file copy to a new replica)
FILL_BLOCK = 1 << 20
#: copies of a file that kept changing while it was copied, before giving up for this round
FILL_TRIES = 3
# rfill flags
FILL_FIRST, FILL_LAST = 1, 2
#: how often the agent looks for peers that came (back) alive
RECONCILE_EVERY = 2.0

Call = Callable[..., Awaitable[FileReply]]  # OwnerFiles.call(peer, op, **fields)
After = Callable[[FileRequest, FileReply], Awaitable[None]]


def choose(path: str, owner: int, factor: int, alive: Iterable[int]) -> tuple[int, ...]:
    """The ``factor - 1`` replicas of ``path``: rendezvous hashing over the alive peers.

    Deterministic for a given set of hosts, and spreads files evenly without a table.
    """

    def weight(node: int) -> bytes:
        return hashlib.blake2b(f"{node}:{path}".encode(), digest_size=8).digest()

    candidates = sorted(set(alive) - {owner}, key=weight, reverse=True)
    return tuple(candidates[: max(factor - 1, 0)])


def successor(meta: FileMeta, alive: Collection[int]) -> int | None:
    """Who owns a file once its owner is gone: its first listed replica still alive."""
    return next((node for node in meta.replicas if node in alive), None)


def parse_where(value: bytes) -> tuple[int, ...]:
    """``WHERE_XATTR``'s value as (owner, replica, ...)."""
    return tuple(int(n) for n in value.decode().split(",") if n)


@dataclass
class _Shared:
    """Folder factors and the replica sets of files owned here, for both threads."""

    factors: dict[str, int]
    owned: dict[str, tuple[int, ...]]
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: files owned here with fewer replicas than their factor asks (refilled by ``run``)
    short: set[str] = field(default_factory=set)
    #: folders whose files owned here may lack replicas (walked by ``run``)
    unscanned: set[str] = field(default_factory=set)

    @classmethod
    def load(cls, store: LocalStore) -> _Shared:
        owned = {m.path: m.replicas for m in store.meta.all_file_meta()
                 if m.owner == store.node_id and m.replicas}  # fmt: skip
        factors = store.meta.all_folder_replicas()
        return cls(factors, owned, unscanned={f for f, n in factors.items() if n > 1})


class Replicas:
    """One host's replication: the owner's fan-out, the replica's copies, the takeover."""

    def __init__(
        self,
        store: LocalStore,
        peers: Callable[[], Collection[int]],
        call: Call | None = None,
        *,
        created: Callable[[str], None] = lambda path: None,
        changed: Callable[[str, bool], None] = lambda path, contents: None,
        shared: _Shared | None = None,
    ) -> None:
        self.store = store
        self.peers = peers
        self._call = call
        self._created = created
        self._changed = changed
        self._s = shared if shared is not None else _Shared.load(store)
        self._seen: set[int] = set()
        self._fills: dict[tuple[int, str], IncomingFile] = {}

    def with_call(self, call: Call) -> Replicas:
        """The same state, reaching peers through ``call`` (the FUSE thread's bridge)."""
        return Replicas(self.store, self.peers, call, created=self._created,
                        changed=self._changed, shared=self._s)  # fmt: skip

    @property
    def node_id(self) -> int:
        return self.store.node_id

    # --- settings -------------------------------------------------------------------------

    def factor_at(self, folder: str) -> int:
        """The factor of the nearest folder at or above ``folder`` that has one (1: none)."""
        factors = self._s.factors
        if not factors:
            return 1
        path = clean_relpath(folder)
        while True:
            found = factors.get(path)
            if found is not None:
                return found
            if not path:
                return 1
            path = posixpath.dirname(path)

    def set_factor_here(self, folder: str, factor: int) -> None:
        path = clean_relpath(folder)
        self.store.meta.set_folder_replicas(path, factor)
        with self._s.lock:
            grew = factor > self._s.factors.get(path, 1)
            self._s.factors[path] = factor
            if grew:  # the files already there want copies too
                self._s.unscanned.add(path)

    async def set_factor(self, folder: str, factor: int) -> None:
        """``dunix fs replicas``: here, then on every alive peer (a host that is down gets
        it from :meth:`reconcile` when it comes back)."""
        self.set_factor_here(folder, factor)
        await self._fanout(self._peers(), "rfactor", path=clean_relpath(folder), size=factor)

    def any_owned(self) -> bool:
        """Whether this host owns any replicated file (so ``copies`` is worth asking)."""
        return bool(self._s.owned)

    def copies(self, path: str) -> tuple[int, ...]:
        """The replicas of a file owned here (empty: none)."""
        return self._s.owned.get(path, ()) if self._s.owned else ()

    def where(self, path: str) -> tuple[int, ...]:
        """(owner, replica, ...) of ``path`` as this host knows it; () if it has nothing."""
        rel = clean_relpath(path)
        if os.path.lexists(self.store.backing_path(rel)):
            return (self.node_id, *self.copies(rel))
        meta = self.store.file_meta(rel)
        if meta.owner != self.node_id and os.path.lexists(self.store.replica_path(rel)):
            return (meta.owner, *meta.replicas)
        return ()

    # --- the owner's side: every change goes to the replicas before the caller returns --

    async def created(self, path: str, mode: int, uid: int, gid: int) -> bool:
        """A regular file was created here: give it replicas if its folder asks for them."""
        factor = self.factor_at(posixpath.dirname(path))
        if factor <= 1 or not stat.S_ISREG(mode):
            return False
        chosen = choose(path, self.node_id, factor, self._peers())
        if not chosen:
            log.warning("storagefs: no alive peer to replicate %s to", path)
            return False
        self._own(path, chosen)
        if len(chosen) < factor - 1:
            with self._s.lock:
                self._s.short.add(path)  # more once more hosts are alive
        await self._send(path, "rcreate", setattr=(self.node_id, mode, uid, gid),
                         data=",".join(str(n) for n in chosen).encode())  # fmt: skip
        return bool(self.copies(path))

    async def wrote(self, path: str, offset: int, data: bytes, mtime_ns: int = 0) -> None:
        """``data`` written at ``offset``; the replicas take the owner's mtime too (so a copy
        that takes over looks to make and rsync as the file did)."""
        await self._send(path, "rwrite", offset=offset, data=data, setattr=(mtime_ns,))

    async def changed_attrs(self, path: str, change: tuple[int | None, ...]) -> None:
        """(size, mode, uid, gid, atime_ns, mtime_ns), None for "unchanged" (as setattr)."""
        await self._send(path, "rsetattr", setattr=change)

    async def synced(self, path: str) -> None:
        await self._send(path, "rfsync")

    async def removed(self, path: str) -> None:
        replicas = self.copies(path)
        if replicas:
            with self._s.lock:
                self._s.owned.pop(path, None)
            await self._fanout(replicas, "runlink", path=path)

    async def renamed(self, old: str, new: str) -> None:
        """``old`` (a file, or a folder with files below it) is now ``new`` here."""
        prefix = old + "/"
        moved = [p for p in list(self._s.owned) if p == old or p.startswith(prefix)]
        for path in moved:
            target = new + path[len(old) :]
            with self._s.lock:
                replaced = self._s.owned.get(target, ())
                replicas = self._s.owned.pop(path, ())
                self._s.owned[target] = replicas
            # the file the rename replaced: its copies elsewhere go too (or one could take
            # over a removed file one day); a host holding both gets the rename over it
            await self._fanout([n for n in replaced if n not in replicas], "runlink", path=target)
            await self._fanout(replicas, "rrename", path=path, path2=target)

    def _own(self, path: str, replicas: tuple[int, ...]) -> None:
        with self._s.lock:
            if replicas:
                self._s.owned[path] = replicas
            else:
                self._s.owned.pop(path, None)
        if replicas:
            self.store.meta.set_file_meta(FileMeta(path, self.node_id, replicas))
        else:
            self.store.meta.drop_file_meta(path)

    async def _send(self, path: str, op: str, **fields: object) -> None:
        replicas = self.copies(path)
        if not replicas:
            return
        failed = await self._fanout(replicas, op, path=path, **fields)
        if failed:
            # the write happened here and on the others; a replica that missed it must never
            # take over, so it leaves the set (it drops its copy when it sees us again)
            log.warning("storagefs: %s: replicas %s dropped (%s failed)", path, failed, op)
            self._shrunk(path, tuple(n for n in self.copies(path) if n not in failed))
            await self._tell_set(path)

    def _shrunk(self, path: str, replicas: tuple[int, ...]) -> None:
        """The set of a file owned here lost members: record it, and refill it later."""
        self._own(path, replicas)
        with self._s.lock:
            self._s.short.add(path)

    async def _tell_set(self, path: str) -> None:
        """Every replica learns the file's current set (they pick the same heir from it)."""
        replicas = self.copies(path)
        csv = ",".join(str(n) for n in replicas)
        await self._fanout(replicas, "rmeta", path=path, path2=csv)

    async def _fanout(self, peers: Iterable[int], op: str, **fields: object) -> list[int]:
        """``op`` on every peer at once; the peers that did not do it."""
        call = self._call
        failed: list[int] = []
        if call is None:
            return list(peers)

        async def one(peer: int) -> None:
            try:
                await call(peer, op, **fields)
            except (OSError, DunixError) as exc:
                log.info("storagefs: %s on node %d: %s", op, peer, exc)
                failed.append(peer)

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(one, peer)
        return failed

    def _peers(self) -> list[int]:
        return [p for p in self.peers() if p != self.node_id]

    def server_hook(self, server: FileServer) -> After:
        """``FileServer.after``: what a peer changed in a replicated file owned here goes on
        to the replicas too, before the peer gets its answer."""

        async def after(req: FileRequest, reply: FileReply) -> None:
            if not self.any_owned():
                return
            if req.op in ("write", "fsync"):
                opened = server.opened(req.origin, req.handle)
                if opened is None or not self.copies(opened[1]):
                    return
                fd, path = opened
                if req.op == "fsync":
                    await self.synced(path)
                    return
                offset, st = req.offset, os.fstat(fd)
                if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND:
                    offset = st.st_size - reply.size
                await self.wrote(path, offset, req.data[: reply.size], st.st_mtime_ns)
            elif req.op == "open" and req.flags & os.O_TRUNC:
                await self.changed_attrs(clean_relpath(req.path), (0, None, None, None, None, None))
            elif req.op == "setattr":
                await self.changed_attrs(clean_relpath(req.path), req.setattr)
            elif req.op == "unlink":
                await self.removed(clean_relpath(req.path))
            elif req.op == "rename" and not req.flags & _syscalls.RENAME_EXCHANGE:
                await self.renamed(clean_relpath(req.path), clean_relpath(req.path2))

        return after

    # --- the replica's side ---------------------------------------------------------------

    async def serve(self, req: FileRequest) -> FileReply:
        """Carry out a replica request from a file's owner; failures become an errno."""
        try:
            return await getattr(self, f"_op_{req.op}")(req)  # type: ignore[no-any-return]
        except OSError as exc:
            return FileReply(req.request_id, self.node_id, exc.errno or errno.EIO)
        except (StoreError, ValueError) as exc:
            log.warning("storagefs: refused %s from node %d: %s", req.op, req.origin, exc)
            return FileReply(req.request_id, self.node_id, errno.EINVAL)

    def _ok(self, req: FileRequest, **fields: object) -> FileReply:
        return FileReply(req.request_id, self.node_id, 0, **fields)  # type: ignore[arg-type]

    def _copy(self, req: FileRequest) -> str:
        """This host's copy of ``req.path``, refusing a request from anyone but its owner."""
        rel = clean_relpath(req.path)
        meta = self.store.file_meta(rel)
        if meta.owner != req.origin or meta.owner == self.node_id:
            raise OSError(errno.ESTALE, f"node {req.origin} does not own {rel} here")
        return str(self.store.replica_path(rel))

    async def _op_rcreate(self, req: FileRequest) -> FileReply:
        owner, mode, uid, gid = (int(x or 0) for x in req.setattr)
        rel = clean_relpath(req.path)
        if owner != req.origin:
            raise OSError(errno.EINVAL, "a replica is created by its owner only")
        copy = self.store.replica_path(rel)
        copy.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, stat.S_IMODE(mode))
        finally:
            os.close(fd)
        replicas = tuple(int(n) for n in req.data.decode().split(",") if n)
        self.store.meta.set_file_meta(FileMeta(rel, owner, replicas))
        return self._ok(req)

    async def _op_rwrite(self, req: FileRequest) -> FileReply:
        copy = self._copy(req)

        def write() -> int:
            fd = os.open(copy, os.O_WRONLY | os.O_CLOEXEC)
            try:
                written = os.pwrite(fd, req.data, req.offset)
                if req.setattr and req.setattr[0]:
                    _syscalls.utimens_fd(fd, None, req.setattr[0])
                return written
            finally:
                os.close(fd)

        return self._ok(req, size=await trio.to_thread.run_sync(write))

    async def _op_rsetattr(self, req: FileRequest) -> FileReply:
        copy = self._copy(req)
        size, mode, uid, gid, atime, mtime = req.setattr
        fd = os.open(copy, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if size is not None:
                os.truncate(copy, size)
            if mode is not None:
                os.chmod(copy, stat.S_IMODE(mode))
            if uid is not None or gid is not None:
                _syscalls.chown_fd(fd, -1 if uid is None else uid, -1 if gid is None else gid)
            if atime is not None or mtime is not None:
                _syscalls.utimens_fd(fd, atime, mtime)
        finally:
            os.close(fd)
        return self._ok(req)

    async def _op_rfsync(self, req: FileRequest) -> FileReply:
        copy = self._copy(req)

        def sync() -> None:
            fd = os.open(copy, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        await trio.to_thread.run_sync(sync)
        return self._ok(req)

    async def _op_runlink(self, req: FileRequest) -> FileReply:
        copy = self._copy(req)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(copy)
        self.store.meta.drop_file_meta(clean_relpath(req.path))
        return self._ok(req)

    async def _op_rrename(self, req: FileRequest) -> FileReply:
        copy = self._copy(req)
        new = clean_relpath(req.path2)
        target = self.store.replica_path(new)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(copy, target)
        self.store.meta.move_file_meta(clean_relpath(req.path), new)
        return self._ok(req)

    async def _op_rfactor(self, req: FileRequest) -> FileReply:
        if req.size < 1:
            raise OSError(errno.EINVAL, "replication factor below 1")
        self.set_factor_here(req.path, req.size)
        return self._ok(req)

    async def _op_rwhere(self, req: FileRequest) -> FileReply:
        found = self.where(req.path)
        if not found:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        return self._ok(req, attrs=found)

    # --- membership: a dead owner's replica takes over; a returning host catches up -------

    def peer_gone(self, dead: int) -> list[str]:
        """Membership declared ``dead`` gone; returns the paths this host took over."""
        alive = (set(self.peers()) | {self.node_id}) - {dead}
        taken: list[str] = []
        for meta in self.store.meta.all_file_meta():
            if meta.owner == dead:
                heir = successor(meta, alive)
                rest = tuple(n for n in meta.replicas if n not in (dead, heir))
                if heir == self.node_id:
                    try:
                        self.store.promote(meta.path, rest)
                    except OSError as exc:
                        log.error("storagefs: cannot take over %s: %s", meta.path, exc)
                        continue
                    with self._s.lock:
                        if rest:
                            self._s.owned[meta.path] = rest
                        self._s.short.add(meta.path)
                    taken.append(meta.path)
                    self._created(meta.path)
                    log.warning("storagefs: node %d is gone: took over %s (replicas %s)",
                                dead, meta.path, rest)  # fmt: skip
                elif heir is not None:
                    self.store.meta.set_file_meta(FileMeta(meta.path, heir, rest))
            elif meta.owner == self.node_id and dead in meta.replicas:
                # A dead replica stays in the set: the next change fails there and drops it
                # (``_send``); unchanged, its copy is still good when it comes back, and if
                # it was declared dead wrongly and took the file over, ``reconcile`` finds
                # out when it is seen alive again. Meanwhile an alive host gets a copy.
                with self._s.lock:
                    self._s.short.add(meta.path)
        self._seen.discard(dead)
        for key in [k for k in self._fills if k[0] == dead]:
            self._fills.pop(key).abort()  # an interrupted copy never becomes visible
        return taken

    async def reconcile(self) -> None:
        """Catch up with the peers seen alive since the last call (see the module doc)."""
        alive = set(self._peers())
        fresh = alive - self._seen
        self._seen = alive
        if not fresh:
            return
        factors = dict(self._s.factors)
        for peer in fresh:
            for folder, factor in factors.items():
                await self._fanout([peer], "rfactor", path=folder, size=factor)
        for meta in self.store.meta.all_file_meta():
            if meta.owner == self.node_id:
                for peer in fresh & set(meta.replicas):
                    await self._check_replica(meta, peer)
            elif meta.owner in fresh:
                await self._check_copy(meta)

    async def _ask_where(self, peer: int, path: str) -> tuple[int, ...] | None:
        """``peer``'s view of ``path``; None when it cannot say (unreachable)."""
        assert self._call is not None
        try:
            return (await self._call(peer, "rwhere", path=path)).attrs
        except FileNotFoundError:
            return ()
        except (OSError, DunixError) as exc:
            log.info("storagefs: rwhere %s on node %d: %s", path, peer, exc)
            return None

    async def _check_replica(self, meta: FileMeta, peer: int) -> None:
        view = await self._ask_where(peer, meta.path)
        if view is None:
            return
        if view and view[0] == peer:
            # it took over while we were away: our copy missed its writes
            log.warning("storagefs: node %d owns %s now; dropping the stale copy here",
                        peer, meta.path)  # fmt: skip
            with self._s.lock:
                self._s.owned.pop(meta.path, None)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.store.backing_path(meta.path))
            self.store.meta.drop_file_meta(meta.path)
            self._changed(meta.path, False)
        elif not view or view[0] != self.node_id:
            self._shrunk(meta.path, tuple(n for n in self.copies(meta.path) if n != peer))

    async def _check_copy(self, meta: FileMeta) -> None:
        view = await self._ask_where(meta.owner, meta.path)
        if view is None:
            return
        if not view or view[0] != meta.owner or self.node_id not in view[1:]:
            log.info("storagefs: dropping the stale replica of %s", meta.path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.store.replica_path(meta.path))
            self.store.meta.drop_file_meta(meta.path)

    # --- refill: a file whose set shrank gets new replicas, by a whole copy ---------------

    async def refill(self) -> None:
        """Give every file owned here that has fewer replicas than its factor new ones."""
        with self._s.lock:
            paths, self._s.short = sorted(self._s.short), set()
        for path in paths:
            if not os.path.lexists(self.store.backing_path(path)):
                continue
            factor = self.factor_at(posixpath.dirname(path))
            have = self.copies(path)
            alive = set(self._peers())
            need = factor - 1 - len([n for n in have if n in alive])
            if need <= 0:
                continue
            more = [n for n in choose(path, self.node_id, factor + len(have), self._peers())
                    if n not in have][:need]  # fmt: skip
            if len(more) < need:
                with self._s.lock:
                    self._s.short.add(path)  # more once more hosts are alive
            added = False
            for peer in more:
                if await self._fill(path, peer, (*self.copies(path), peer)):
                    self._own(path, (*self.copies(path), peer))
                    added = True
                else:
                    with self._s.lock:
                        self._s.short.add(path)  # try again next round
            if added:
                await self._tell_set(path)
                log.info("storagefs: %s: replicas now %s", path, self.copies(path))

    async def _fill(self, path: str, peer: int, replicas: tuple[int, ...]) -> bool:
        """Copy the file whole to ``peer``; it appears there only once complete (rfill
        goes through ``incoming/``). Copied again if it changed meanwhile."""
        assert self._call is not None
        backing = self.store.backing_path(path)
        csv = ",".join(str(n) for n in replicas)
        for _ in range(FILL_TRIES):
            try:
                fd = os.open(backing, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                return False
            try:
                before = os.fstat(fd)
                head = (self.node_id, before.st_mode, before.st_uid, before.st_gid,
                        before.st_mtime_ns)  # fmt: skip
                offset, flags = 0, FILL_FIRST
                while True:
                    data = await trio.to_thread.run_sync(os.pread, fd, FILL_BLOCK, offset)
                    if offset + len(data) >= before.st_size or not data:
                        flags |= FILL_LAST
                    await self._call(peer, "rfill", path=path, path2=csv, offset=offset,
                                     data=data, size=before.st_size, flags=flags,
                                     setattr=head)  # fmt: skip
                    if flags & FILL_LAST:
                        break
                    offset, flags = offset + len(data), 0
                after = os.fstat(fd)
            except (OSError, DunixError) as exc:
                log.info("storagefs: copy of %s to node %d: %s", path, peer, exc)
                return False
            finally:
                os.close(fd)
            if (after.st_size, after.st_mtime_ns, after.st_ctime_ns) == (
                before.st_size, before.st_mtime_ns, before.st_ctime_ns):  # fmt: skip
                return True
        return False

    async def _op_rfill(self, req: FileRequest) -> FileReply:
        """One block of a whole copy from the owner (first: start; last: make it visible)."""
        rel = clean_relpath(req.path)
        key = (req.origin, rel)
        if req.flags & FILL_FIRST:
            old = self._fills.pop(key, None)
            if old is not None:
                old.abort()
            owner, mode, uid, gid, mtime = (int(x or 0) for x in req.setattr)
            if owner != req.origin:
                raise OSError(errno.EINVAL, "a replica is filled by its owner only")
            replicas = tuple(int(n) for n in req.path2.split(",") if n)
            self._fills[key] = self.store.receive(rel, mode=mode, uid=uid, gid=gid,
                                                  mtime_ns=mtime, owner=owner,
                                                  replicas=replicas, replica=True)  # fmt: skip
        incoming = self._fills.get(key)
        if incoming is None:
            raise OSError(errno.EBADF, "no copy of this file under way")
        try:
            if req.data:
                await trio.to_thread.run_sync(incoming.write, req.offset, req.data)
            if req.flags & FILL_LAST:
                del self._fills[key]
                incoming.truncate(req.size)
                await trio.to_thread.run_sync(incoming.commit)
        except BaseException:
            self._fills.pop(key, None)
            incoming.abort()
            raise
        return self._ok(req)

    async def _op_rmeta(self, req: FileRequest) -> FileReply:
        """The owner's current replica set of a file this host holds a copy of."""
        self._copy(req)
        replicas = tuple(int(n) for n in req.path2.split(",") if n)
        self.store.meta.set_file_meta(FileMeta(clean_relpath(req.path), req.origin, replicas))
        return self._ok(req)

    def scan(self, folder: str) -> list[str]:
        """The regular files owned here below ``folder`` with fewer replicas than asked."""
        root = self.store.backing_path(folder)
        found = []
        for top, _dirs, names in os.walk(root):
            for name in names:
                full = os.path.join(top, name)
                with contextlib.suppress(OSError):
                    st = os.lstat(full)
                    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                        continue
                    rel = clean_relpath(os.path.relpath(full, self.store.tree))
                    if len(self.copies(rel)) < self.factor_at(posixpath.dirname(rel)) - 1:
                        found.append(rel)
        return found

    async def _scan_folders(self) -> None:
        with self._s.lock:
            folders, self._s.unscanned = sorted(self._s.unscanned), set()
        for folder in folders:
            paths = await trio.to_thread.run_sync(self.scan, folder)
            if paths:
                log.info("storagefs: %d files under %s want more replicas", len(paths), folder)
            with self._s.lock:
                self._s.short.update(paths)

    async def run(self) -> None:
        """Reconcile with peers as they come alive, refill short sets; in the agent's nursery."""
        while True:
            try:
                await self.reconcile()
                if self._s.unscanned and self._peers():
                    await self._scan_folders()
                if self._s.short:
                    await self.refill()
            except (OSError, DunixError) as exc:
                log.warning("storagefs: replica upkeep: %s", exc)
            await trio.sleep(RECONCILE_EVERY)
