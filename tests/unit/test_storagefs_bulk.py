"""The bulk lane (dunix/storagefs/bulk.py) over real TLS on loopback: host 1's FileServer
serves its open files' contents to host 2's BulkClient; the e2e throughput and coherence
tests (tests/e2e/test_storagefs_bulk.py) run it between simulated hosts."""

from __future__ import annotations

import errno
import mmap
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from dunix.storagefs import bulk, lane_frames
from dunix.storagefs.bulk import BulkClient, BulkServer
from dunix.storagefs.peerfiles import FileRequest, FileServer
from dunix.storagefs.store import LocalStore
from dunix.wire import TLSIdentity, keygen

MIB = 1 << 20


class Lane:
    """Owner n1 (node 1) and asker n2 (node 2); ``n3`` holds a certificate nobody lists."""

    def __init__(self, tmp: Path) -> None:
        keygen(tmp / "tls", ["n1", "n2", "n3"], [])
        self.ids = {n: TLSIdentity.load(tmp / "tls", n, "node") for n in ("n1", "n2", "n3")}
        self.store = LocalStore(tmp / "n1", 1)
        self.files = FileServer(self.store)
        self.replicated: set[str] = set()
        self.wrote: list[str] = []
        self.server = BulkServer(
            self.ids["n1"].server_context(), self.files.dup_handle, {"n2": 2}.get,
            plain_write=lambda p: p not in self.replicated, wrote=self.wrote.append,
        )  # fmt: skip
        self.port = self.server.start("127.0.0.1")
        self.located = 0
        self.carrier = "frames"

    def client(self, name: str = "n2", claims: str = "n1") -> BulkClient:
        async def locate(peer: int) -> tuple[str, str, int] | None:
            self.located += 1
            return claims, "127.0.0.1", self.port

        return BulkClient(self.ids[name].client_context(), locate, timeout=5)

    async def open(self, path: str, origin: int = 2, flags: int = os.O_RDWR) -> int:
        reply = await self.files.handle(FileRequest(1, origin, "open", path=path, flags=flags))
        assert reply.error == 0, os.strerror(reply.error)
        return reply.handle

    def put(self, path: str, data: bytes) -> None:
        self.store.backing_path(path).write_bytes(data)

    def close(self) -> None:
        self.server.close()
        self.files.close()
        self.store.close()


#: how the lane's connections carry contents: native frames (lane_frames.py), TLS records
#: (no library), or TLS because the owner has no library though the caller has
CARRIERS = ["frames", "tls", "owner-tls"]


@pytest.fixture(params=CARRIERS)
def lane(tmp_path: Path, request: Any, monkeypatch: Any) -> Iterator[Lane]:
    # make setup builds it: missing, "frames" would pass on TLS and the others mean nothing
    assert lane_frames.available(), "native/build/libdunixlane.so is missing (make setup)"
    if request.param == "tls":
        monkeypatch.setattr(lane_frames, "available", lambda: False)
    elif request.param == "owner-tls":  # the owner's lane threads are named storagefs-bulk
        asker = lambda: threading.current_thread().name != "storagefs-bulk"  # noqa: E731
        monkeypatch.setattr(lane_frames, "available", asker)
    one = Lane(tmp_path)
    one.carrier = request.param
    yield one
    one.close()


def test_blocks_read_and_written_match_the_owners_file(lane: Lane) -> None:
    data = os.urandom(3 * MIB + 123)
    lane.put("f.bin", data)

    async def main() -> None:
        client = lane.client()
        handle = await lane.open("f.bin")
        got = bytearray()
        async with trio.open_nursery() as nursery:  # blocks in parallel: several connections
            parts: dict[int, bytearray] = {}

            async def one(off: int) -> None:
                part = await client.read(1, handle, off, MIB)
                assert part is not None
                parts[off] = part

            for off in range(0, len(data) + MIB, MIB):
                nursery.start_soon(one, off)
        for off in sorted(parts):
            got += parts[off]
        assert bytes(got) == data  # the last block short, the one past the end empty
        assert await client.write(1, handle, MIB, b"x" * 1000) == 1000
        reply = await client.carry(1, "read", {"handle": handle, "offset": MIB - 1, "size": 3})
        assert reply is not None and bytes(reply.data) == data[MIB - 1 : MIB] + b"xx"
        assert lane.wrote == ["f.bin"]
        assert client.used == 7 and lane.located == 1
        framed = [conn.frames is not None for conn in client._idle[1]]
        assert framed and all(framed) == (lane.carrier == "frames")
        client.close()

    trio.run(main)
    assert lane.store.backing_path("f.bin").read_bytes()[MIB : MIB + 1000] == b"x" * 1000


def test_owner_errors_come_back_as_the_same_oserror(lane: Lane) -> None:
    lane.put("ro.bin", b"abc")

    async def main() -> None:
        client = lane.client()
        handle = await lane.open("ro.bin", flags=os.O_RDONLY)
        with pytest.raises(OSError) as bad:
            await client.write(1, handle, 0, b"no")
        assert bad.value.errno == errno.EBADF  # pwrite on a read-only descriptor
        with pytest.raises(OSError) as unknown:
            await client.read(1, handle + 99, 0, 10)
        assert unknown.value.errno == errno.EBADF
        other = await lane.open("ro.bin", origin=3)  # node 3's handle: not node 2's to use
        with pytest.raises(OSError):
            await client.read(1, other, 0, 10)
        client.close()

    trio.run(main)


def test_replicated_writes_go_by_message(lane: Lane) -> None:
    lane.put("r.bin", b"")
    lane.replicated.add("r.bin")

    async def main() -> None:
        client = lane.client()
        handle = await lane.open("r.bin")
        assert await client.write(1, handle, 0, b"abc") is None  # the owner must replicate it
        assert await client.read(1, handle, 0, 10) == b""  # reads still ride the lane
        client.close()

    trio.run(main)
    assert lane.store.backing_path("r.bin").read_bytes() == b""


def test_wrong_or_unknown_peers_fall_back_to_messages(lane: Lane) -> None:
    lane.put("f.bin", b"data")

    async def main() -> None:
        handle = await lane.open("f.bin")
        impostor = lane.client(claims="n3")  # the listener's certificate says n1, not n3
        assert await impostor.read(1, handle, 0, 4) is None
        assert await impostor.read(1, handle, 0, 4) is None  # not retried at once
        assert lane.located == 1
        stranger = lane.client(name="n3")  # n3 is no member on the owner's side
        assert await stranger.read(1, handle, 0, 4) is None
        client = lane.client()
        assert await client.read(1, handle, 0, 4) == b"data"
        lane.server.close()  # the owner's lane goes away: by message from now on
        assert await client.read(1, handle, 0, 4) is None
        client.close()

    trio.run(main)


def test_no_lane_at_the_owner_means_messages(lane: Lane, monkeypatch: Any) -> None:
    async def nowhere(peer: int) -> None:
        return None

    async def main() -> None:
        client = BulkClient(lane.ids["n2"].client_context(), nowhere)
        assert await client.read(1, 1, 0, 4) is None
        assert await client.read(1, 1, 0, bulk.MAX_BLOCK + 1) is None

    trio.run(main)


def test_reads_from_the_disk_and_from_the_page_cache_are_the_same(tmp_path: Path) -> None:
    """bulk._read: direct reads where the page cache has nothing, plain ones elsewhere."""
    data = os.urandom(3 * MIB + 4321)
    path = tmp_path / "d.bin"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    buf = mmap.mmap(-1, bulk.ALIGN + MIB)
    view = memoryview(buf)
    try:
        for offset, size in ((0, MIB), (MIB, MIB), (3 * MIB, MIB), (100, 5000), (4 * MIB, MIB)):
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # from the disk (if it has one)
            block = view[bulk.ALIGN : bulk.ALIGN + size]
            for _ in range(2):  # cold, then cached by the plain path or still cold
                done = bulk._read(fd, block, offset)
                assert bytes(block[:done]) == data[offset : offset + size]
            del block
    finally:
        view.release()
        buf.close()
        os.close(fd)


def test_writes_direct_or_not_land_where_asked_and_appends_append(tmp_path: Path) -> None:
    """bulk._write: aligned blocks go O_DIRECT (a cached copy is dropped, not left stale),
    others and an O_APPEND descriptor's through the page cache."""
    path = tmp_path / "w.bin"
    path.write_bytes(b"x" * (2 * MIB))
    before = path.read_bytes()  # in the page cache now
    buf = mmap.mmap(-1, bulk.ALIGN + MIB)
    view = memoryview(buf)
    try:
        buf[bulk.ALIGN :] = os.urandom(MIB)
        fd = os.open(path, os.O_RDWR)
        try:
            assert bulk._write(fd, view[bulk.ALIGN :], MIB) == MIB  # aligned: direct
            assert bulk._write(fd, view[bulk.ALIGN : bulk.ALIGN + 10], 3) == 10  # not
        finally:
            os.close(fd)
        want = before[:3] + bytes(view[bulk.ALIGN : bulk.ALIGN + 10]) + before[13:MIB]
        assert path.read_bytes() == want + bytes(view[bulk.ALIGN :])
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            assert bulk._write(fd, view[bulk.ALIGN :], 0) == MIB  # appended, not at 0
        finally:
            os.close(fd)
        assert path.read_bytes() == want + 2 * bytes(view[bulk.ALIGN :])
    finally:
        view.release()
        buf.close()


def test_a_frame_changed_replayed_or_cut_short_is_refused() -> None:
    """Each frame is authenticated with its place in the stream: a flipped bit, a frame
    sent again and a connection cut mid-frame all fail, never give bytes."""
    keys = os.urandom(lane_frames.KEYS)
    a, b = socket.socketpair()
    caller = lane_frames.Frames.pair(keys, caller=True)
    owner = lane_frames.Frames.pair(keys, caller=False)
    frame = bytearray(lane_frames.HEAD + MIB + lane_frames.TAG)
    head = lane_frames.HEAD
    try:
        caller.send(a.fileno(), (b"one", memoryview(b"two")), 1.0)
        assert owner.recv(b.fileno(), frame, 1.0) == 6 and frame[head : head + 6] == b"onetwo"
        owner.send(b.fileno(), (b"back",), 1.0)  # the other direction has its own key
        assert caller.recv(a.fileno(), frame, 1.0) == 4 and frame[head : head + 4] == b"back"
        # pieces across the sealing chunks (32 KiB), from a thread: the socket holds less
        pieces = (os.urandom(100), bytearray(os.urandom(300_000)), memoryview(b"end"))
        sender = threading.Thread(target=caller.send, args=(a.fileno(), pieces, 5.0))
        sender.start()
        assert owner.recv(b.fileno(), frame, 5.0) == 300_103
        sender.join()
        assert frame[head : head + 300_103] == b"".join(pieces)
        # a copy of the next frame: sent twice, flipped in the middle
        caller.send(a.fileno(), (b"x" * 1000,), 1.0)
        wire = b.recv(65536)
        a2, b2 = socket.socketpair()
        b2.sendall(wire)
        assert owner.recv(a2.fileno(), frame, 1.0) == 1000
        b2.sendall(wire)  # replayed: its nonce is the next frame's no more
        with pytest.raises(lane_frames.FrameError):
            owner.recv(a2.fileno(), frame, 1.0)
        first = lane_frames.Frames.pair(keys, caller=True)  # a new lane, same keys
        first.send(a.fileno(), (b"y" * 1000,), 1.0)
        first.close()
        flipped = bytearray(b.recv(65536))
        flipped[head + 500] ^= 1  # the same frame but one bit: refused, though in its place
        fresh = lane_frames.Frames.pair(keys, caller=False)
        b2.sendall(flipped)
        with pytest.raises(lane_frames.FrameError):
            fresh.recv(a2.fileno(), frame, 1.0)
        fresh.close()
        b2.sendall(wire[:100])
        b2.close()
        with pytest.raises(lane_frames.FrameError):
            lane_frames.Frames.pair(keys, caller=False).recv(a2.fileno(), frame, 1.0)
        a2.close()
        b.close()
        with pytest.raises(lane_frames.EndOfLane):  # a clean end between frames
            caller.recv(a.fileno(), frame, 1.0)
    finally:
        caller.close()
        owner.close()
        a.close()
