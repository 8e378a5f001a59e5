"""The hand-over of a big stream to the native relay (dunix/fdmove/bulk.py), on real pipes,
processes and loopback connections; the two hubs are joined in memory."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import threading

import pytest
import trio

from dunix.fdmove import (
    BulkRelay,
    Outcome,
    StreamBulk,
    StreamEndpoint,
    StreamHub,
    StreamMessage,
)
from dunix.fdmove.inventory import blocked_readers

from .test_relay import MiB, linked_hubs, read_all, run, write_all, yes_into_head

AFTER = 1 * MiB


def bulk_hubs(
    seen: list[StreamMessage] | None = None,
) -> contextlib.AbstractAsyncContextManager[tuple[StreamHub, StreamHub]]:
    """Two hubs that hand a stream over after ``AFTER`` bytes; ``seen`` gets every message."""
    return linked_hubs(bulk=BulkRelay("127.0.0.1", after=AFTER), seen=seen)


def pipe_between(a: StreamHub, b: StreamHub, *, pull: list[int] | None = None) -> tuple[int, int]:
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    stream = a.allocate()
    a.open_sender(stream, r1, shared=pull is not None)
    demand = None if pull is None else (lambda key: blocked_readers(pull, key))
    b.open_receiver(stream, w2, pull=demand)
    return w1, r2


def handed_over(seen: list[StreamMessage]) -> int:
    return sum(isinstance(m, StreamBulk) for m in seen)


async def handed_over_pipe(
    a: StreamHub, b: StreamHub, seen: list[StreamMessage]
) -> tuple[int, int, StreamEndpoint, StreamEndpoint]:
    """A pipe from ``a`` to ``b`` handed over after 3 MiB that nobody reads yet: (write
    end, read end, sender, receiver); the writer is idle."""
    w1, r2 = pipe_between(a, b)
    sender = next(iter(a.endpoints.values()))
    receiver = next(iter(b.endpoints.values()))
    await write_all(w1, bytes(3 * MiB), close=False)
    with trio.fail_after(10):
        while not handed_over(seen):
            await trio.sleep(0.01)
    return w1, r2, sender, receiver


def test_megabytes_arrive_whole_and_in_order_across_the_hand_over_then_eof() -> None:
    data = os.urandom(20 * MiB + 12345)
    seen: list[StreamMessage] = []

    async def body() -> None:
        async with bulk_hubs(seen) as (a, b):
            w1, r2 = pipe_between(a, b)
            sender = next(iter(a.endpoints.values()))
            receiver = next(iter(b.endpoints.values()))
            got: list[bytes] = []

            async def read() -> None:
                got.append(await read_all(r2))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(write_all, w1, data, 300_000)
                nursery.start_soon(read)
            assert got[0] == data
            assert await sender.wait() is Outcome.EOF
            assert await receiver.wait() is Outcome.EOF
            with trio.fail_after(5):
                while len(a.mux) or len(b.mux):  # both final words exchanged: forgotten
                    await trio.sleep(0.01)

    run(body)
    assert handed_over(seen) == 1
    assert not any(isinstance(m, StreamBulk) for m in seen if m.stream % 2 == 0)


def test_a_short_stream_stays_on_the_channel() -> None:
    seen: list[StreamMessage] = []

    async def body() -> None:
        async with bulk_hubs(seen) as (a, b):
            w1, r2 = pipe_between(a, b)
            os.write(w1, b"hello\n")
            os.close(w1)
            assert await read_all(r2) == b"hello\n"

    run(body)
    assert handed_over(seen) == 0


def test_yes_into_head_dies_of_sigpipe_after_the_hand_over() -> None:
    seen: list[StreamMessage] = []

    async def body() -> None:
        async with bulk_hubs(seen) as (a, b):
            w1, r2 = pipe_between(a, b)
            # head starts reading once the stream is handed over (yes fills pipes and window)
            late_head = ("sh", "-c", "sleep 0.5; exec head -1")
            await yes_into_head(w1, r2, head_argv=late_head, timeout=5)

    run(body)
    assert handed_over(seen) == 1


def test_yes_into_head_right_away() -> None:
    async def body() -> None:
        async with bulk_hubs() as (a, b):
            w1, r2 = pipe_between(a, b)
            await yes_into_head(w1, r2)

    run(body)


def test_a_far_reader_going_away_after_the_hand_over_gives_the_writer_epipe() -> None:
    seen: list[StreamMessage] = []

    async def body() -> None:
        async with bulk_hubs(seen) as (a, b):
            w1, r2, sender, _ = await handed_over_pipe(a, b, seen)
            os.close(r2)  # the far reader goes away while the writer is idle
            assert await sender.wait() is Outcome.PEER_GONE
            with pytest.raises(BrokenPipeError):
                os.write(w1, b"x")
            os.close(w1)

    run(body)


def test_a_pulled_pipe_is_handed_over_for_a_steady_reader() -> None:
    data = os.urandom(12 * MiB)
    seen: list[StreamMessage] = []

    async def body() -> None:
        async with bulk_hubs(seen) as (a, b):
            pids: list[int] = []
            w1, r2 = pipe_between(a, b, pull=pids)
            sink = subprocess.Popen(["sha256sum"], stdin=r2, stdout=subprocess.PIPE)
            pids.append(sink.pid)
            os.close(r2)
            await write_all(w1, data, 300_000)
            out, _ = await trio.to_thread.run_sync(sink.communicate)
            assert out.split()[0].decode() == hashlib.sha256(data).hexdigest()

    run(body)
    assert handed_over(seen) == 1


def test_stopping_a_handed_over_receiver_ends_both_relays() -> None:
    seen: list[StreamMessage] = []

    async def body() -> None:
        async with bulk_hubs(seen) as (a, b):
            w1, r2, sender, receiver = await handed_over_pipe(a, b, seen)
            receiver.stop()
            assert await receiver.wait() is Outcome.STOPPED
            assert await sender.wait() is Outcome.PEER_GONE
            with pytest.raises(BrokenPipeError):
                os.write(w1, b"x")
            os.close(w1)
            os.close(r2)

    run(body)


def test_a_lost_link_ends_a_handed_over_stream() -> None:
    seen: list[StreamMessage] = []

    async def body() -> None:
        async with bulk_hubs(seen) as (a, b):
            w1, r2, sender, _ = await handed_over_pipe(a, b, seen)
            a.link_lost()
            assert await sender.wait() is Outcome.LOST
            os.close(w1)
            os.close(r2)

    run(body)


def test_a_stranger_without_the_key_is_dropped_and_the_peer_still_gets_through() -> None:
    data = os.urandom(3 * MiB)

    async def body() -> None:
        bulk = BulkRelay("127.0.0.1")
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        sender, address, key = await bulk.start_sender(5, r1)
        os.close(r1)
        host, _, port = address.rpartition(":")
        with socket.create_connection((host, int(port))) as stranger:  # plaintext junk
            stranger.sendall(b"GET / HTTP/1.0\r\n\r\n")
            stranger.settimeout(5)
            assert stranger.recv(100) is not None  # an alert or EOF: dropped
        spare = os.dup(w2)
        wrong = await bulk.start_receiver(5, spare, address, bytes(32))
        os.close(spare)
        assert await wrong.wait() != 0  # the binder does not verify
        receiver = await bulk.start_receiver(5, w2, address, key)
        os.close(w2)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_all, w1, data)
            assert await read_all(r2) == data
        assert await sender.wait() == 0
        assert await receiver.wait() == 0

    run(body)


def test_ending_a_handed_over_sender_delivers_all_it_read_and_leaves_the_rest() -> None:
    """``end()`` (a move re-points the stream, dunix/agent/migration.py): the relay stops
    reading and ends the stream after what it read; the receiver writes all of that, then
    EOF; what it had not read stays in the sender's pipe for the next relay."""
    data = os.urandom(3 * MiB)
    seen: list[StreamMessage] = []

    async def body() -> None:
        async with bulk_hubs(seen) as (a, b):
            r1, w1 = os.pipe()
            r2, w2 = os.pipe()
            spare = os.dup(r1)
            stream = a.allocate()
            sender = a.open_sender(stream, r1)
            receiver = b.open_receiver(stream, w2)
            await write_all(w1, data, close=False)
            with trio.fail_after(10):
                while not handed_over(seen):
                    await trio.sleep(0.01)
            sender.end()
            with trio.fail_after(20):
                got = await read_all(r2)
                assert await sender.wait() is Outcome.STOPPED
                assert await receiver.wait() is Outcome.EOF
            os.close(w1)
            rest = await read_all(spare)
            assert len(got) >= AFTER
            assert got + rest == data

    run(body)


def _flipping_proxy(target: tuple[str, int], at: int) -> tuple[int, threading.Thread]:
    """A man in the middle between the relays: passes everything on, but flips one bit of
    the sender's bytes at offset ``at`` (past the handshake: in the data)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def run() -> None:
        near, _ = listener.accept()
        listener.close()
        far = socket.create_connection(target)

        def up() -> None:  # the receiver's bytes, as they are
            with contextlib.suppress(OSError):
                while data := near.recv(65536):
                    far.sendall(data)

        threading.Thread(target=up, daemon=True).start()
        seen = 0
        with contextlib.suppress(OSError):
            while data := far.recv(65536):
                if seen <= at < seen + len(data):
                    flipped = bytearray(data)
                    flipped[at - seen] ^= 1
                    data = bytes(flipped)
                seen += len(data)
                near.sendall(data)
        near.close()
        far.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return port, thread


def test_a_changed_byte_on_the_way_is_refused_and_never_written() -> None:
    """The bytes after the handshake are authenticated frame by frame: one bit flipped on
    the wire makes the receiver fail, and nothing of that frame or after it reaches its
    pipe (what was written before is the stream's own prefix)."""
    data = os.urandom(3 * MiB)

    async def body() -> None:
        bulk = BulkRelay("127.0.0.1")
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        sender, address, key = await bulk.start_sender(7, r1)
        os.close(r1)
        host, _, port = address.rpartition(":")
        proxy, thread = _flipping_proxy((host, int(port)), at=2 * MiB)
        receiver = await bulk.start_receiver(7, w2, f"127.0.0.1:{proxy}", key)
        os.close(w2)
        got: list[bytes] = []

        async def read() -> None:
            got.append(await read_all(r2))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            with contextlib.suppress(BrokenPipeError):
                await write_all(w1, data)
        assert await receiver.wait() == 1  # FAILED: a frame failed authentication
        assert await sender.wait() != 0
        assert got[0] == data[: len(got[0])] and len(got[0]) < len(data)
        thread.join(5)

    run(body)
