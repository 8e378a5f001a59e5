"""The lock table and manager of storagefs (dunix/storagefs/locks.py), without FUSE."""

from __future__ import annotations

import errno

import trio
import trio.testing

from dunix.storagefs.locks import (
    F_RDLCK,
    F_UNLCK,
    F_WRLCK,
    FLOCK,
    SLEEP,
    TO_END,
    Lock,
    LockManager,
    LockTable,
)
from dunix.storagefs.peerfiles import FileRequest

A, B = (1, 100), (2, 100)  # the same kernel owner id on two hosts: two holders


def ranges(table: LockTable, key: int = 7) -> list[tuple[int, int, int]]:
    return [(lock.type, lock.start, lock.end) for lock in table.locks(key)]


def test_posix_ranges_split_merge_and_conflict() -> None:
    table = LockTable()
    assert table.set(7, Lock(A, False, F_WRLCK, 0, 99)) is None
    assert table.set(7, Lock(A, False, F_UNLCK, 10, 19)) is None  # a hole splits it
    assert ranges(table) == [(F_WRLCK, 0, 9), (F_WRLCK, 20, 99)]
    assert table.set(7, Lock(A, False, F_WRLCK, 10, 19)) is None  # and merges again
    assert ranges(table) == [(F_WRLCK, 0, 99)]
    assert table.set(7, Lock(A, False, F_RDLCK, 50, TO_END)) is None  # downgrade a part
    assert ranges(table) == [(F_WRLCK, 0, 49), (F_RDLCK, 50, TO_END)]
    found = table.set(7, Lock(B, False, F_RDLCK, 40, 60))
    assert found is not None and found.holder == A and found.type == F_WRLCK
    assert table.set(7, Lock(B, False, F_RDLCK, 55, 60)) is None  # readers share
    assert table.conflict(7, B, False, F_WRLCK, 0, 0) is not None
    assert table.conflict(7, B, True, F_WRLCK, 0, 0) is None  # flock and POSIX are apart
    assert table.release(7, A, False)
    assert table.conflict(7, B, False, F_WRLCK, 0, 10) is None
    assert table.release_node(2) == [7] and table.locks(7) == []


def test_flock_is_one_whole_file_lock_per_holder() -> None:
    table = LockTable()
    assert table.set(3, Lock(A, True, F_RDLCK, 0, TO_END)) is None
    assert table.set(3, Lock(B, True, F_RDLCK, 0, TO_END)) is None
    assert table.set(3, Lock(A, True, F_WRLCK, 0, TO_END)) is not None  # B reads
    assert table.set(3, Lock(B, True, F_UNLCK, 0, TO_END)) is None
    assert table.set(3, Lock(A, True, F_WRLCK, 0, TO_END)) is None  # upgrade
    assert ranges(table, 3) == [(F_WRLCK, 0, TO_END)]


def test_manager_wakes_a_blocked_lock_and_answers_peers() -> None:
    trio.run(_wakes_and_answers, clock=trio.testing.MockClock(autojump_threshold=0))


async def _wakes_and_answers() -> None:
    manager = LockManager(1)
    assert await manager.acquire(7, Lock(A, False, F_WRLCK, 0, TO_END), sleep=False) == 0
    want = Lock(B, False, F_WRLCK, 0, 10)
    assert await manager.acquire(7, want, sleep=False) == errno.EAGAIN
    got: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _collect(got, manager.acquire(7, want, sleep=True)))
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        manager.release(7, A, False)  # the holder closed the file
    assert got == [0]
    peer = FileRequest(1, 3, "lock", path="f", path2="set", handle=5, offset=0, size=0,
                       flags=F_WRLCK | SLEEP)  # fmt: skip
    assert (await manager.serve_peer(7, FileRequest(
        2, 3, "lock", path="f", path2="test", handle=5, offset=0, size=TO_END, flags=F_RDLCK
    )))[1][:3] == (F_WRLCK, 0, 10)  # fmt: skip
    manager.release_node(2)
    assert await manager.serve_peer(7, peer) == (0, ())
    assert await manager.serve_peer(7, FileRequest(
        3, 4, "lock", path="f", path2="set", handle=5, flags=F_WRLCK | FLOCK
    )) == (0, ())  # fmt: skip


async def _collect(out: list[int], value: object) -> None:
    out.append(await value)  # type: ignore[misc]


def test_peer_wait_ends_after_a_slice() -> None:
    """A peer's blocked request waits one slice at most, then "ask again"."""
    trio.run(_slice, clock=trio.testing.MockClock(autojump_threshold=0))


async def _slice() -> None:
    manager = LockManager(1)
    assert await manager.acquire(7, Lock(A, False, F_WRLCK, 0, TO_END), sleep=False) == 0
    request = FileRequest(1, 2, "lock", path="f", path2="set", handle=9, offset=0, size=TO_END,
                          flags=F_WRLCK | SLEEP)  # fmt: skip
    assert await manager.serve_peer(7, request) == (errno.EINPROGRESS, ())


def test_a_late_release_spares_locks_asked_for_after_it() -> None:
    """A peer's release can arrive after its next request, from a reused lock owner id."""
    table = LockTable()
    assert table.set(5, Lock(A, True, F_WRLCK, 0, TO_END, epoch=1)) is None
    assert table.set(5, Lock(A, True, F_WRLCK, 0, TO_END, epoch=2)) is None  # after a close
    assert not table.release(5, A, True, epoch=1)
    assert ranges(table, 5) == [(F_WRLCK, 0, TO_END)]
    assert table.release(5, A, True, epoch=2) and table.locks(5) == []


def test_a_wait_that_closes_a_cycle_gets_edeadlk() -> None:
    trio.run(_deadlock, clock=trio.testing.MockClock(autojump_threshold=0))


async def _deadlock() -> None:
    manager = LockManager(1)
    assert await manager.acquire(7, Lock(A, False, F_WRLCK, 0, 0), sleep=False) == 0
    assert await manager.acquire(7, Lock(B, False, F_WRLCK, 1, 1), sleep=False) == 0
    got: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _collect(got, manager.acquire(7, Lock(A, False, F_WRLCK, 1, 1),
                                                                 sleep=True)))  # fmt: skip
        await trio.testing.wait_all_tasks_blocked()
        # B waiting for A's byte 0 would wait for itself: refused, and nothing changes
        assert await manager.acquire(7, Lock(B, False, F_WRLCK, 0, 0), True, 1) == errno.EDEADLK
        assert got == []
        # flock locks are never checked (Linux neither): B's flock simply waits its turn
        assert await manager.acquire(7, Lock(A, True, F_WRLCK, 0, TO_END), sleep=False) == 0
        with trio.move_on_after(1):
            await manager.acquire(7, Lock(B, True, F_WRLCK, 0, TO_END), sleep=True)
            raise AssertionError("B's flock was granted while A holds one")
        manager.release(7, B, False)  # B gives up: A's wait ends
    assert got == [0]
    assert sorted(ranges(manager.table)) == [(F_WRLCK, 0, 1), (F_WRLCK, 0, TO_END)]


def test_a_peer_between_two_asks_still_counts_as_waiting() -> None:
    trio.run(_peer_cycle, clock=trio.testing.MockClock(autojump_threshold=0))


async def _peer_cycle() -> None:
    manager = LockManager(1)
    peer = (2, 9)
    assert await manager.acquire(7, Lock(A, False, F_WRLCK, 0, 0), sleep=False) == 0
    assert await manager.acquire(7, Lock(peer, False, F_RDLCK, 5, 5), sleep=False) == 0
    ask = FileRequest(1, 2, "lock", path="f", path2="set", handle=9, offset=0, size=0,
                      flags=F_WRLCK | SLEEP)  # fmt: skip
    assert await manager.serve_peer(7, ask) == (errno.EINPROGRESS, ())
    # the peer is about to ask again: A waiting for its byte 5 closes the cycle
    assert await manager.acquire(7, Lock(A, False, F_WRLCK, 5, 5), True, 1) == errno.EDEADLK
    await trio.sleep(2 * 3.0)  # the peer never asked again (gone, interrupted): no cycle
    assert await manager.acquire(7, Lock(A, False, F_WRLCK, 5, 5), sleep=True, limit=1) == (
        errno.EINPROGRESS
    )


class _Targets:
    def lock_target(self, ino: int) -> tuple[int, str] | None:
        return None  # every file is this host's


class _Library:
    def __init__(self) -> None:
        self.replies: list[tuple[int, int]] = []

    def dunix_fl_set_callback(self, callback: object) -> None:
        pass

    def dunix_fl_reply(self, req: int, error: int, *rest: int) -> None:
        self.replies.append((req, error))


def test_an_open_file_description_lock_goes_with_its_last_close() -> None:
    trio.run(_ofd_release)


async def _ofd_release() -> None:
    from dunix.storagefs import locks

    manager = LockManager(1)
    async with trio.open_nursery() as nursery:
        fuse = locks.FuseLocks(manager, _Targets(), None, lambda: nursery)
        library = _Library()
        fuse.install(library)  # type: ignore[arg-type]

        def event(cmd: int, req: int, fh: int, owner: int, start: int = 0, end: int = 0) -> None:
            assert fuse._on_event(cmd, req, 7, fh, owner, F_WRLCK, start, end, 0, 0) == 0

        ofd, posix = 0xF11E, 0xF1E5  # owner ids: an open file, a process's fd table
        event(locks._SETLK, 1, fh=10, owner=ofd)
        event(locks._SETLK, 2, fh=11, owner=posix, start=5, end=5)
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(library.replies) == [(1, 0), (2, 0)]
        event(locks._CLOSE_POSIX, 0, fh=11, owner=posix)  # its process closed a descriptor
        event(locks._SETLK, 3, fh=12, owner=posix, start=6, end=6)  # and locked again
        await trio.testing.wait_all_tasks_blocked()
        event(locks._RELEASE, 0, fh=11, owner=0)  # nothing of fh 11 is held any more
        assert ranges(manager.table) == [(F_WRLCK, 0, 0), (F_WRLCK, 6, 6)]
        event(locks._RELEASE, 0, fh=10, owner=0)  # the open file's last close
        assert [lock.holder[1] for lock in manager.table.locks(7)] == [posix]
        nursery.cancel_scope.cancel()
