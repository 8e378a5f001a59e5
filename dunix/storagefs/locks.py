"""Cluster-wide fcntl (POSIX record) and flock locks for storagefs: the file's owner decides.

pyfuse3 3.5 has no lock handlers, so libfuse never asks the kernel to forward locks
(FUSE_POSIX_LOCKS, FUSE_FLOCK_LOCKS at INIT) and each host's kernel would arbitrate only
its own processes. ``native/lib/fuselocks.c`` (``libfuselocks.so``), loaded RTLD_GLOBAL
before pyfuse3 (:func:`preload`), interposes ``fuse_session_new`` and adds getlk, setlk and
flock handlers plus hooks on flush and release; every lock event reaches
:class:`FuseLocks` here as plain integers, and it answers the request when the lock is
decided (a blocking lock keeps its request open while it waits).

Who decides: the host that owns the file (the one whose disk holds it).

- :class:`LockTable` is the sans-IO table: POSIX ranges per holder (split and merged as
  fcntl(2) says), one flock per holder, conflicts only within one kind (Linux keeps flock
  and POSIX locks apart). A holder is (node id, the kernel's lock owner id): the kernel names
  POSIX owners by their fd table and flock owners by their open file.
- :class:`LockManager` adds waiting (F_SETLKW, flock without LOCK_NB) on one trio loop,
  the storagefs thread's.
- A file a peer owns: its lock requests go to the owner as ``FileRequest(op="lock")``
  (fields: ``path2`` "test"/"set"/"release", ``handle`` the lock owner id, ``offset`` and
  ``size`` the first and last byte, ``flags`` the type plus :data:`FLOCK` and
  :data:`SLEEP`, ``data`` the asking host's close count, 8 bytes little-endian: see
  ``LockTable.release``). The owner waits at most :data:`WAIT_SLICE` for a blocked lock, then
  answers EINPROGRESS and the caller asks again, so no request outlives the peer timeout.
  When a host dies, its owners drop its locks (``release_node``).

POSIX locks are dropped when their owner closes any descriptor of the file (the kernel
says so in FLUSH, with the owner id), flock locks when the last descriptor of the open
file goes (RELEASE with ``flock_release``), open file description locks at that RELEASE
too (:meth:`FuseLocks._track_ofd` says how they are told apart). A blocking POSIX lock
that would wait for itself through other waiting holders gets EDEADLK
(:meth:`LockManager.acquire`), among the files one host owns; a cycle through files of
two owners is not seen. A blocking request interrupted while it was being granted may
leave that range unlocked by a best-effort unlock of it (dropping an older lock of the
same owner on that range).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import trio

from dunix.errors import DunixError
from dunix.storagefs._syscalls import load_global

if TYPE_CHECKING:
    from dunix.storagefs.peerfiles import FileReply, FileRequest

log = logging.getLogger(__name__)

F_RDLCK, F_WRLCK, F_UNLCK = fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK
#: the last byte of a lock "to the end of the file" (l_len 0)
TO_END = (1 << 63) - 1
#: ``flags`` bits of a lock request to an owner (the low 4 bits are the type)
FLOCK = 1 << 4
SLEEP = 1 << 5
#: the longest an owner keeps a peer's blocked lock request before "ask again"
WAIT_SLICE = 3.0
#: how long an interrupted request may take to give its range back (also at unmount)
UNDO_TIMEOUT = 2.0
#: the most waiting holders a deadlock check follows (Linux: 10 steps of one chain)
MAX_CYCLE = 64
LIBRARY = Path(__file__).resolve().parents[2] / "native" / "build" / "libfuselocks.so"

Holder = tuple[int, int]  # (node id, kernel lock owner id)


@dataclass(frozen=True)
class Lock:
    holder: Holder
    flock: bool
    type: int  # F_RDLCK or F_WRLCK
    start: int
    end: int  # inclusive; TO_END for "to the end of the file"
    pid: int = 0
    #: the requesting host's close count when asked (see LockTable.release)
    epoch: int = 0

    def overlaps(self, start: int, end: int) -> bool:
        return self.start <= end and start <= self.end


class LockTable:
    """The locks of the files one host owns, keyed by inode number (sans-IO)."""

    def __init__(self) -> None:
        self._locks: dict[int, list[Lock]] = {}

    def locks(self, key: int) -> list[Lock]:
        return list(self._locks.get(key, ()))

    def conflict(
        self, key: int, holder: Holder, flock: bool, type_: int, start: int, end: int
    ) -> Lock | None:
        """The first lock of another holder that ``type_`` on [start, end] would conflict with."""
        return next(iter(self.conflicts(key, holder, flock, type_, start, end)), None)

    def conflicts(
        self, key: int, holder: Holder, flock: bool, type_: int, start: int, end: int
    ) -> list[Lock]:
        """Every lock of other holders that ``type_`` on [start, end] would conflict with."""
        if type_ == F_UNLCK:
            return []
        return [
            lock for lock in self._locks.get(key, ())
            if lock.holder != holder
            and lock.flock == flock
            and lock.overlaps(start, end)
            and (lock.type == F_WRLCK or type_ == F_WRLCK)
        ]  # fmt: skip

    def set(self, key: int, want: Lock) -> Lock | None:
        """Apply ``want`` (F_UNLCK: unlock) unless it conflicts; returns the conflict."""
        found = self.conflict(key, want.holder, want.flock, want.type, want.start, want.end)
        if found is not None:
            return found
        kept: list[Lock] = []
        mine: list[Lock] = []
        for lock in self._locks.get(key, ()):
            if lock.holder != want.holder or lock.flock != want.flock:
                kept.append(lock)
            elif want.flock or not lock.overlaps(want.start, want.end):
                if not want.flock:
                    mine.append(lock)
            else:  # the parts of an own lock outside the new range stay
                if lock.start < want.start:
                    mine.append(replace(lock, end=want.start - 1))
                if lock.end > want.end:
                    mine.append(replace(lock, start=want.end + 1))
        if want.type != F_UNLCK:
            new = want
            rest = []
            for lock in mine:  # merge touching ranges of the same type (fcntl(2))
                touches = lock.start <= new.end + 1 and new.start <= lock.end + 1
                if lock.type == new.type and lock.epoch == new.epoch and touches:
                    new = replace(new, start=min(new.start, lock.start), end=max(new.end, lock.end))
                else:
                    rest.append(lock)
            mine = [*rest, new]
        locks = kept + sorted(mine, key=lambda lock: lock.start)
        if locks:
            self._locks[key] = locks
        else:
            self._locks.pop(key, None)
        return None

    def release(self, key: int, holder: Holder, flock: bool, epoch: int = TO_END) -> bool:
        """Drop the locks of ``holder`` (of one kind) on ``key``; whether any was there.

        Only those asked for at ``epoch`` or before: a peer's release (sent when a file
        closed) can arrive after its next request, and the kernel reuses lock owner ids
        (the address of a closed file or of an exited process's fd table). The peer counts
        its closes; a lock asked for after a close carries a later epoch and stays.
        """
        locks = self._locks.get(key)
        if not locks:
            return False
        left = [
            lock for lock in locks
            if lock.holder != holder or lock.flock != flock or lock.epoch > epoch
        ]  # fmt: skip
        if len(left) == len(locks):
            return False
        if left:
            self._locks[key] = left
        else:
            del self._locks[key]
        return True

    def release_node(self, node: int) -> list[int]:
        """Drop every lock a host held (it died); the keys that changed."""
        changed = []
        for key in list(self._locks):
            left = [lock for lock in self._locks[key] if lock.holder[0] != node]
            if len(left) != len(self._locks[key]):
                changed.append(key)
                if left:
                    self._locks[key] = left
                else:
                    del self._locks[key]
        return changed


@dataclass
class _Wait:
    """A holder's blocked request, kept while it waits (and ``until`` a peer asks again)."""

    key: int
    want: Lock
    until: float


class LockManager:
    """A :class:`LockTable` with waiting, driven by one trio loop (the storagefs thread)."""

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id
        self.table = LockTable()
        self._changed: dict[int, trio.Event] = {}
        self._waits: dict[Holder, _Wait] = {}  # who waits for which lock (deadlock check)

    def _wake(self, key: int) -> None:
        event = self._changed.pop(key, None)
        if event is not None:
            event.set()

    def test(self, key: int, holder: Holder, flock: bool, type_: int, start: int, end: int
             ) -> Lock | None:  # fmt: skip
        return self.table.conflict(key, holder, flock, type_, start, end)

    async def acquire(self, key: int, want: Lock, sleep: bool, limit: float | None = None) -> int:
        """0 once set; EAGAIN (no sleep) or EINPROGRESS (``limit`` passed) while it conflicts.

        EDEADLK when waiting would close a cycle: a POSIX lock whose holders wait, each for
        the next, back to this one (as fcntl(2) F_SETLKW says; flock locks are never checked,
        as in Linux). Only cycles among files this host owns are seen.
        """
        holder = want.holder
        try:
            with trio.move_on_after(limit if limit is not None else float("inf")):
                while True:
                    found = self.table.conflicts(key, holder, want.flock, want.type, want.start,
                                                 want.end)  # fmt: skip
                    if not found:
                        self.table.set(key, want)
                        self._waits.pop(holder, None)
                        self._wake(key)  # an unlock or a downgrade may let others in
                        return 0
                    if not sleep:
                        self._waits.pop(holder, None)
                        return errno.EAGAIN
                    if not want.flock:
                        if self._closes_cycle(holder, found):
                            self._waits.pop(holder, None)
                            return errno.EDEADLK
                        self._waits[holder] = _Wait(key, want, until=float("inf"))
                    await self._changed.setdefault(key, trio.Event()).wait()
        except BaseException:  # interrupted: it no longer waits
            self._waits.pop(holder, None)
            raise
        if not want.flock:  # a peer asks again at once (see WAIT_SLICE): it waits until then
            self._waits[holder] = _Wait(key, want, until=trio.current_time() + WAIT_SLICE)
        return errno.EINPROGRESS

    def _closes_cycle(self, holder: Holder, blockers: list[Lock]) -> bool:
        """Whether ``holder`` waiting behind ``blockers`` would wait for itself."""
        now = trio.current_time()
        todo = [lock.holder for lock in blockers]
        seen: set[Holder] = set()
        while todo and len(seen) < MAX_CYCLE:
            blocker = todo.pop()
            if blocker == holder:
                return True
            wait = self._waits.get(blocker)
            if blocker in seen or wait is None or wait.until < now:
                continue
            seen.add(blocker)
            want = wait.want
            behind = self.table.conflicts(wait.key, blocker, False, want.type, want.start, want.end)
            todo.extend(lock.holder for lock in behind)
        return False

    def release(self, key: int, holder: Holder, flock: bool, epoch: int = TO_END) -> None:
        if self.table.release(key, holder, flock, epoch):
            self._wake(key)

    def release_node(self, node: int) -> None:
        for holder in [holder for holder in self._waits if holder[0] == node]:
            del self._waits[holder]
        for key in self.table.release_node(node):
            self._wake(key)

    async def serve_peer(self, key: int, req: FileRequest) -> tuple[int, tuple[int, ...]]:
        """A peer's ``lock`` request on file ``key``: (errno, conflict as attrs for "test")."""
        holder = (req.origin, req.handle)
        flock = bool(req.flags & FLOCK)
        type_ = req.flags & 0xF
        epoch = int.from_bytes(req.data, "little")
        if req.path2 == "test":
            found = self.test(key, holder, flock, type_, req.offset, req.size)
            if found is None:
                return 0, ()
            # a pid means nothing in another host's PID namespace: the kernel shows 0
            return 0, (found.type, found.start, found.end, 0)
        if req.path2 == "release":
            self.release(key, holder, flock, epoch)
            return 0, ()
        if req.path2 == "set":
            want = Lock(holder, flock, type_, req.offset, req.size, epoch=epoch)
            return await self.acquire(key, want, bool(req.flags & SLEEP), WAIT_SLICE), ()
        return errno.EINVAL, ()


# --- the FUSE side ------------------------------------------------------------------------

_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64,
    ctypes.c_uint64, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
)  # fmt: skip
_GETLK, _SETLK, _FLOCK, _CLOSE_POSIX, _CLOSE_FLOCK, _INTERRUPT, _RELEASE = range(7)
_library: ctypes.CDLL | None = None
_installed: FuseLocks | None = None


def preload() -> ctypes.CDLL | None:
    """Load libfuselocks so that pyfuse3's session gets the lock handlers.

    Must run before pyfuse3 is imported (Python binds an extension's symbols when it loads
    it, RTLD_NOW); :func:`active` says afterwards whether it took. None when the library is
    not built (``make -C native``): locks then stay per host.
    """
    global _library
    if _library is None:
        _library = load_global(LIBRARY, "no cluster-wide locks")
        if _library is None:
            return None
        _library.dunix_fl_reply.argtypes = [
            ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
            ctypes.c_int,
        ]  # fmt: skip
        _library.dunix_fl_set_callback.argtypes = [_CALLBACK]
    return _library


def active() -> bool:
    """Whether the mounted session has the lock handlers (the kernel forwards locks)."""
    return _library is not None and bool(_library.dunix_fl_active())


class LockTargets(Protocol):
    """What :class:`FuseLocks` needs of the file system (StorageFS implements it)."""

    def lock_target(self, ino: int) -> tuple[int, str] | None:
        """(owner node, tree path) of a peer's file; None for a file of this host."""
        ...


OwnerCall = Callable[..., Awaitable["FileReply"]]


class FuseLocks:
    """Serves the kernel's lock requests of one mount (see the module docstring).

    Runs on the storagefs thread: the callback comes from pyfuse3's request loop there,
    and every answer is sent from a task in ``nursery``.
    """

    def __init__(
        self,
        manager: LockManager,
        targets: LockTargets,
        call: OwnerCall | None,
        nursery: Callable[[], trio.Nursery | None],
    ) -> None:
        self.manager = manager
        self.targets = targets
        self.call = call
        self._nursery = nursery
        self._waiting: dict[int, trio.CancelScope] = {}
        self._remote_held: set[tuple[int, int, bool]] = set()  # (ino, owner id, flock)
        self._epoch = 1  # closes of peers' files locked from here (LockTable.release)
        # open file description locks (F_OFD_SETLK): see _track_ofd
        self._by_fh: dict[int, set[tuple[int, int]]] = {}  # fh -> {(ino, owner id)}
        self._fhs_of: dict[tuple[int, int], set[int]] = {}  # (ino, owner id) -> fhs
        self._callback = _CALLBACK(self._on_event)  # kept alive: C holds the pointer

    def install(self, library: ctypes.CDLL) -> None:
        """Make this the receiver of the process's lock events (one mount per process)."""
        global _installed
        self._library = library
        _installed = self  # C holds only the bare pointer: keep the callback alive
        library.dunix_fl_set_callback(self._callback)

    def _reply(self, req: int, error: int, lock: Lock | None = None, plain: bool = True
               ) -> None:  # fmt: skip
        if error or plain:
            self._library.dunix_fl_reply(req, error, -1, 0, 0, 0)
        elif lock is None:
            self._library.dunix_fl_reply(req, 0, F_UNLCK, 0, 0, 0)
        else:
            self._library.dunix_fl_reply(req, 0, lock.type, lock.start, lock.end, lock.pid)

    def _on_event(self, cmd: int, req: int | None, ino: int, fh: int, owner: int, type_: int,
                  start: int, end: int, pid: int, sleep: int) -> int:  # fmt: skip
        try:
            if cmd == _INTERRUPT:
                scope = self._waiting.get(req or 0)
                if scope is not None:
                    scope.cancel()
                return 0
            if cmd == _RELEASE:
                self._released(fh)
                return 0
            flock = cmd in (_FLOCK, _CLOSE_FLOCK)
            if flock:
                # a flock belongs to the open file, whose fh is unique while it is open; the
                # kernel's lock owner id is reused, and its release of a closed file can come
                # after the next file's request (a counter under flock(1) lost 2 of 200)
                owner = fh
            if cmd in (_CLOSE_POSIX, _CLOSE_FLOCK):
                if not flock:
                    self._not_ofd(ino, owner)
                self._closed(ino, owner, flock)
                return 0
            if cmd == _SETLK and type_ != F_UNLCK:
                self._track_ofd(ino, fh, owner)
            nursery = self._nursery()
            if nursery is None or req is None:
                return errno.ENOLCK
            holder = (self.manager.node_id, owner)
            want = Lock(holder, flock, type_, start, end, pid)
            nursery.start_soon(self._serve, cmd, req, ino, want, bool(sleep))
            return 0
        except Exception:  # never let an exception into C: the request must be answered
            log.exception("storagefs: lock event %d failed", cmd)
            return errno.EIO if cmd in (_GETLK, _SETLK, _FLOCK) else 0

    def _track_ofd(self, ino: int, fh: int, owner: int) -> None:
        """Note a POSIX-kind lock set through ``fh``: it may be an open file description lock.

        The kernel sends F_OFD_SETLK like fcntl locks, with the open file as the owner, and
        never says when such a lock goes: at the last close its local bookkeeping is empty
        (the file system keeps the locks), so no request comes. An fcntl lock's owner is the
        process's fd table, which the kernel names in the FLUSH of every close; and a
        process's close drops all its fcntl locks on the file. So when an open file is
        released, any owner that locked through it and was never named in a FLUSH can only
        be the open file itself: its locks go then (:meth:`_released`).
        """
        self._by_fh.setdefault(fh, set()).add((ino, owner))
        self._fhs_of.setdefault((ino, owner), set()).add(fh)

    def _not_ofd(self, ino: int, owner: int) -> None:
        for fh in self._fhs_of.pop((ino, owner), ()):
            held = self._by_fh.get(fh)
            if held is not None:
                held.discard((ino, owner))
                if not held:
                    del self._by_fh[fh]

    def _released(self, fh: int) -> None:
        for ino, owner in self._by_fh.pop(fh, ()):
            fhs = self._fhs_of.get((ino, owner), set())
            fhs.discard(fh)
            if not fhs:
                self._fhs_of.pop((ino, owner), None)
            self._closed(ino, owner, False)

    def _closed(self, ino: int, owner: int, flock: bool) -> None:
        target = self.targets.lock_target(ino)
        if target is None:
            self.manager.release(ino, (self.manager.node_id, owner), flock)
            return
        if (ino, owner, flock) not in self._remote_held:
            return  # never locked there: no message per close
        self._remote_held.discard((ino, owner, flock))
        epoch = self._epoch
        self._epoch += 1  # requests from now on outlive this release, whatever its delay
        nursery = self._nursery()
        if nursery is not None:
            nursery.start_soon(self._ask_owner, target, "release", owner, flock, F_UNLCK, 0,
                               TO_END, False, epoch)  # fmt: skip

    async def _serve(self, cmd: int, req: int, ino: int, want: Lock, sleep: bool) -> None:
        error, found = errno.EIO, None
        try:
            with trio.CancelScope() as scope:
                self._waiting[req] = scope
                error, found = await self._decide(cmd, ino, want, sleep)
            if scope.cancelled_caught:
                error = errno.EINTR
        except OSError as exc:
            error = exc.errno or errno.EIO
        except DunixError as exc:
            log.info("storagefs: lock on inode %#x: %s", ino, exc)
            error = errno.EIO
        except Exception:
            log.exception("storagefs: lock on inode %#x failed", ino)
        finally:
            self._waiting.pop(req, None)
            self._reply(req, error, found, plain=cmd != _GETLK)

    async def _decide(self, cmd: int, ino: int, want: Lock, sleep: bool) -> tuple[int, Lock | None]:
        target = self.targets.lock_target(ino)
        if target is None:
            if cmd == _GETLK:
                found = self.manager.test(ino, want.holder, want.flock, want.type, want.start,
                                          want.end)  # fmt: skip
                return 0, found
            return await self.manager.acquire(ino, want, sleep), None
        owner = want.holder[1]
        if cmd == _GETLK:
            reply = await self._ask_owner(target, "test", owner, want.flock, want.type,
                                          want.start, want.end, False)  # fmt: skip
            if not reply.attrs:
                return 0, None
            type_, start, end, pid = reply.attrs[:4]
            return 0, Lock((target[0], 0), want.flock, type_, start, end, pid)
        if want.type != F_UNLCK:
            self._remote_held.add((ino, owner, want.flock))
        while True:
            try:
                await self._ask_owner(target, "set", owner, want.flock, want.type, want.start,
                                      want.end, sleep)  # fmt: skip
                return 0, None
            except OSError as exc:
                if exc.errno != errno.EINPROGRESS:
                    return exc.errno or errno.EIO, None
            except trio.Cancelled:
                # interrupted while the owner may be granting it: give that range back
                with (
                    trio.CancelScope(shield=True) as undo,
                    contextlib.suppress(OSError, DunixError),
                ):
                    undo.deadline = trio.current_time() + UNDO_TIMEOUT
                    await self._ask_owner(target, "set", owner, want.flock, F_UNLCK,
                                          want.start, want.end, False)  # fmt: skip
                raise

    async def _ask_owner(self, target: tuple[int, str], op: str, owner: int, flock: bool,
                         type_: int, start: int, end: int, sleep: bool,
                         epoch: int | None = None) -> FileReply:  # fmt: skip
        if self.call is None:
            raise OSError(errno.ENOLCK, "no transport to the file's owner")
        flags = type_ | (FLOCK if flock else 0) | (SLEEP if sleep else 0)
        node, path = target
        data = (self._epoch if epoch is None else epoch).to_bytes(8, "little")
        return await self.call(node, "lock", path=path, path2=op, handle=owner, offset=start,
                               size=end, flags=flags, data=data)  # fmt: skip


def describe(library: Any) -> str:
    """One line for the agent's log: whether locks are cluster-wide here."""
    if library is None:
        return "locks stay per host (native/build/libfuselocks.so is not built)"
    if not active():
        return "locks stay per host (pyfuse3 was loaded before libfuselocks)"
    return "fcntl and flock locks are cluster-wide (the file's owner decides)"
