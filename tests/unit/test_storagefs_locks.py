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
