"""Writes to a peer's file gather behind (remote_nodes.RemoteFile.write): fewer, bigger
requests to the owner, and the data is there at flush, fsync, a lock, a read or a stat
from this host; a failed batch's error comes back. Two hosts wired in memory, no mount."""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable
from typing import Any

import pyfuse3
import pytest
import trio

from dunix.storagefs.fs import ROOT
from dunix.storagefs.peerfiles import BLOCK, FileReply, FileRequest
from dunix.storagefs.remote_nodes import WRITE_BATCH
from tests.unit.test_storagefs_remote import CTX, Net, owned_by_1

Body = Callable[[Net, int, int], Awaitable[None]]


@pytest.fixture
def net(tmp_path: Any) -> Any:
    n = Net(tmp_path)
    yield n
    n.close()


def writes_seen(net: Net, fail: list[int] | None = None) -> list[tuple[int, int]]:
    """(offset, size) of every write request host 1 gets; ``fail``: errno for the next."""
    seen: list[tuple[int, int]] = []
    handle = net.servers[1].handle

    async def counting(req: FileRequest) -> FileReply:
        if req.op == "write":
            seen.append((req.offset, len(req.data)))
            if fail:
                return FileReply(req.request_id, 1, fail.pop())
        return await handle(req)

    net.servers[1].handle = counting  # type: ignore[method-assign]
    return seen


def on_host_2(net: Net, body: Body, flags: int = os.O_RDWR, path: bytes = b"f") -> None:
    """``body(net, inode, fh)`` with host 1's file ``path`` open on host 2, in a nursery."""
    fs = net.fs[2]

    async def main() -> None:
        entry = await fs.lookup(ROOT, path, CTX)
        info = await fs.open(entry.st_ino, flags, CTX)
        async with trio.open_nursery() as nursery:
            fs.nursery = nursery
            await body(net, entry.st_ino, info.fh)
            await fs.release(info.fh)
            fs.nursery = None

    trio.run(main)


def backing(net: Net, path: str = "f") -> bytes:
    return net.stores[1].backing_path(path).read_bytes()


def test_sequential_writes_go_in_batches_and_are_there_after_flush(net: Net) -> None:
    owned_by_1(net, "f", b"")
    seen = writes_seen(net)
    data = os.urandom(10 * BLOCK + 77)

    async def body(net: Net, inode: int, fh: int) -> None:
        for off in range(0, len(data), BLOCK):
            assert await net.fs[2].write(fh, off, data[off : off + BLOCK]) == len(
                data[off : off + BLOCK]
            )
        await net.fs[2].flush(fh)
        assert backing(net) == data

    on_host_2(net, body)
    assert sorted(seen) == [(0, WRITE_BATCH), (WRITE_BATCH, WRITE_BATCH),
                            (2 * WRITE_BATCH, len(data) - 2 * WRITE_BATCH)]  # fmt: skip


def test_a_stat_and_a_read_from_this_host_include_gathered_writes(net: Net) -> None:
    owned_by_1(net, "f", b"x" * 100)

    async def body(net: Net, inode: int, fh: int) -> None:
        fs = net.fs[2]
        await fs.write(fh, 100, b"y" * 50)
        assert backing(net) == b"x" * 100  # still here, not at the owner
        assert (await fs.getattr(inode, CTX)).st_size == 150
        await fs.write(fh, 150, b"z" * 50)
        other = await fs.open(inode, os.O_RDONLY, CTX)  # another open file of the inode
        assert bytes(await fs.read(other.fh, 140, 20)) == b"y" * 10 + b"z" * 10
        await fs.release(other.fh)

    on_host_2(net, body)
    assert backing(net) == b"x" * 100 + b"y" * 50 + b"z" * 50


def test_fsync_and_a_lock_request_send_gathered_writes_first(net: Net) -> None:
    owned_by_1(net, "f", b"")
    locked: list[bytes] = []

    async def lock_call(peer: int, op: str, **fields: object) -> FileReply:
        locked.append(backing(net))  # what the owner has when the lock request leaves
        return FileReply(0, peer)

    async def body(net: Net, inode: int, fh: int) -> None:
        fs = net.fs[2]
        await fs.write(fh, 0, b"a" * 10)
        await fs.fsync(fh, True)
        assert backing(net) == b"a" * 10
        await fs.write(fh, 10, b"b" * 10)
        await fs.drains_writes(lock_call)(1, "lock", path="f", path2="set")
        assert locked == [b"a" * 10 + b"b" * 10]

    on_host_2(net, body)


def test_a_failed_batch_is_reported_by_the_next_flush_once(net: Net) -> None:
    owned_by_1(net, "f", b"")
    writes_seen(net, fail=[errno.ENOSPC])

    async def body(net: Net, inode: int, fh: int) -> None:
        fs = net.fs[2]
        await fs.write(fh, 0, b"a" * 10)
        with pytest.raises(pyfuse3.FUSEError) as err:
            await fs.flush(fh)
        assert err.value.errno == errno.ENOSPC
        await fs.flush(fh)  # said once
        await fs.write(fh, 0, b"b" * 10)
        await fs.flush(fh)

    on_host_2(net, body)
    assert backing(net) == b"b" * 10


def test_appends_and_overlapping_writes_keep_their_order(net: Net) -> None:
    owned_by_1(net, "f", b"start\n")
    seen = writes_seen(net)

    async def appends(net: Net, inode: int, fh: int) -> None:
        for n in range(3):
            await net.fs[2].write(fh, 0, b"line %d\n" % n)  # O_APPEND: the owner's end

    on_host_2(net, appends, os.O_WRONLY | os.O_APPEND)
    assert backing(net) == b"start\nline 0\nline 1\nline 2\n"
    assert len(seen) == 3  # one by one

    async def overwrite(net: Net, inode: int, fh: int) -> None:
        fs = net.fs[2]
        await fs.write(fh, 0, b"A" * BLOCK)
        await fs.write(fh, 2, b"BB")  # not sequential: after the first one
        await fs.write(fh, 4, b"CC")

    on_host_2(net, overwrite)
    assert backing(net)[:8] == b"AABBCCAA" and len(backing(net)) == BLOCK


def test_no_file_capabilities_is_asked_of_the_owner_once_per_timeout(net: Net) -> None:
    owned_by_1(net, "f", b"")
    asked: list[str] = []
    handle = net.servers[1].handle

    async def counting(req: FileRequest) -> FileReply:
        if req.op.endswith("xattr"):
            asked.append(req.path2)
        return await handle(req)

    net.servers[1].handle = counting  # type: ignore[method-assign]
    caps = b"security.capability"

    async def body(net: Net, inode: int, fh: int) -> None:
        fs = net.fs[2]
        for _ in range(3):  # as before each write
            with pytest.raises(pyfuse3.FUSEError) as err:
                await fs.getxattr(inode, caps, CTX)
            assert err.value.errno == pyfuse3.ENOATTR
        assert asked == ["security.capability"]
        await fs.setxattr(inode, b"user.x", b"1", CTX)  # an xattr set from here: ask again
        with pytest.raises(pyfuse3.FUSEError):
            await fs.getxattr(inode, caps, CTX)
        assert asked == ["security.capability", "user.x", "security.capability"]

    on_host_2(net, body)


def test_a_batch_never_exceeds_one_lane_request(net: Net) -> None:
    """Pieces that do not add up to WRITE_BATCH: a batch is sent before it would exceed it
    (the lane carries at most bulk.MAX_BLOCK per request; a bigger one went by message)."""
    owned_by_1(net, "f", b"")
    seen = writes_seen(net)
    piece = 3 * BLOCK // 2
    data = os.urandom(6 * piece)

    async def body(net: Net, inode: int, fh: int) -> None:
        for off in range(0, len(data), piece):
            await net.fs[2].write(fh, off, data[off : off + piece])

    on_host_2(net, body)
    assert backing(net) == data
    assert sorted(seen) == [(n * 2 * piece, 2 * piece) for n in range(3)]


def test_a_write_reaches_the_owner_soon_without_a_flush(net: Net) -> None:
    """Other hosts read at the owner: a gathered write goes there after WRITE_LINGER."""
    from dunix.storagefs.remote_nodes import WRITE_LINGER

    owned_by_1(net, "f", b"")
    seen = writes_seen(net)

    async def body(net: Net, inode: int, fh: int) -> None:
        assert await net.fs[2].write(fh, 0, b"line one\n") == 9
        assert await net.fs[2].write(fh, 9, b"line two\n") == 9
        assert seen == []  # gathered
        with trio.move_on_after(WRITE_LINGER + 10):  # no flush, no read, no stat
            while backing(net) != b"line one\nline two\n":
                await trio.sleep(WRITE_LINGER / 4)
        assert backing(net) == b"line one\nline two\n" and seen == [(0, 18)]

    on_host_2(net, body)
