"""Relays over real pipes, sockets and processes: two hubs joined in memory or by TLS."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trio

from dunix.errors import PeerUnreachable, ProtocolError
from dunix.fdmove import (
    BulkRelay,
    Outcome,
    Send,
    StreamData,
    StreamHub,
    StreamMessage,
)
from dunix.fdmove.inventory import blocked_readers
from dunix.wire import (
    Channel,
    TLSIdentity,
    keygen,
    listener_addresses,
    open_channel,
    serve_tls,
)

MiB = 1024 * 1024


def run(fn: Callable[[], Awaitable[None]], timeout: float = 60) -> None:
    async def main() -> None:
        with trio.fail_after(timeout):
            await fn()

    trio.run(main)


# -- helpers ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def linked_hubs(
    window: int | None = None,
    chunk: int | None = None,
    buffer: int = 8,
    *,
    bulk: BulkRelay | None = None,
    seen: list[StreamMessage] | None = None,
) -> AsyncIterator[tuple[StreamHub, StreamHub]]:
    """Two hubs whose links are in-memory channels, each pumped into the other's deliver;
    ``bulk``: both hand big streams over (test_bulk.py); ``seen`` gets every message."""
    kwargs: dict[str, int] = {}
    if window is not None:
        kwargs["window"] = window
    if chunk is not None:
        kwargs["chunk"] = chunk

    def sender(channel: trio.MemorySendChannel[StreamMessage]) -> Send:
        async def send(msg: StreamMessage) -> None:
            if seen is not None:
                seen.append(msg)
            await channel.send(msg)

        return send

    async with trio.open_nursery() as nursery:
        to_b, from_a = trio.open_memory_channel[StreamMessage](buffer)
        to_a, from_b = trio.open_memory_channel[StreamMessage](buffer)
        a = StreamHub(sender(to_b), odd=True, bulk=bulk, **kwargs)
        b = StreamHub(sender(to_a), odd=False, bulk=bulk, **kwargs)

        async def pump(source: trio.MemoryReceiveChannel[StreamMessage], hub: StreamHub) -> None:
            async for msg in source:
                assert hub.deliver(msg)

        nursery.start_soon(pump, from_a, b)
        nursery.start_soon(pump, from_b, a)
        await nursery.start(a.run)
        await nursery.start(b.run)
        yield a, b
        nursery.cancel_scope.cancel()


async def write_all(fd: int, data: bytes, chunk: int = MiB, close: bool = True) -> None:
    os.set_blocking(fd, False)
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view[:chunk])
        except BlockingIOError:
            await trio.lowlevel.wait_writable(fd)
            continue
        view = view[n:]
    if close:
        os.close(fd)


async def read_all(fd: int, chunk: int = MiB, delay: float = 0.0) -> bytes:
    os.set_blocking(fd, False)
    out = bytearray()
    while True:
        try:
            data = os.read(fd, chunk)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(fd)
            continue
        if not data:
            os.close(fd)
            return bytes(out)
        out += data
        if delay:
            await trio.sleep(delay)


async def yes_into_head(
    w1: int, r2: int, pids: list[int] | None = None, *,
    head_argv: tuple[str, ...] = ("head", "-1"), timeout: float = 3,
) -> None:  # fmt: skip
    """``yes`` writing ``w1``, ``head -1`` (or ``head_argv``) reading ``r2`` (its pid put
    in ``pids``): head prints one line and yes dies of SIGPIPE within ``timeout`` s."""
    yes = subprocess.Popen(["yes"], stdout=w1)
    os.close(w1)
    head = subprocess.Popen(list(head_argv), stdin=r2, stdout=subprocess.PIPE)
    if pids is not None:
        pids.append(head.pid)
    os.close(r2)
    try:
        with trio.fail_after(timeout):
            out, _ = await trio.to_thread.run_sync(head.communicate)
            assert out == b"y\n"
            assert await trio.to_thread.run_sync(yes.wait) == -signal.SIGPIPE
    finally:
        yes.kill()
        yes.wait()


def relay_pipe(sender: StreamHub, receiver: StreamHub) -> tuple[int, int, int]:
    """A pipe into ``sender`` relayed out of a pipe of ``receiver``: (stream, write end,
    read end) for the test to use."""
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    stream = sender.allocate()
    sender.open_sender(stream, r1)
    receiver.open_receiver(stream, w2)
    return stream, w1, r2


# -- semantics ------------------------------------------------------------------------------


def test_tens_of_megabytes_arrive_whole_and_in_order_then_eof() -> None:
    data = os.urandom(40 * MiB)

    async def body() -> None:
        async with linked_hubs() as (a, b):
            r1, w1 = os.pipe()
            r2, w2 = os.pipe()
            stream = a.allocate()
            sender = a.open_sender(stream, r1)
            receiver = b.open_receiver(stream, w2)
            got = b""

            async def read() -> None:
                nonlocal got
                got = await read_all(r2)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(write_all, w1, data, 300_000)
                nursery.start_soon(read)
            assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
            assert await sender.wait() is Outcome.EOF
            assert await receiver.wait() is Outcome.EOF
            with trio.fail_after(5):  # the final words cross; both sides forget the stream
                while len(a.mux) or len(b.mux):
                    await trio.sleep(0.01)
            assert not a.endpoints and not b.endpoints

    run(body)


def test_eof_travels_for_an_empty_stream_and_a_receiver_opened_late() -> None:
    async def body() -> None:
        async with linked_hubs() as (a, b):
            r1, w1 = os.pipe()
            r2, w2 = os.pipe()
            os.close(w1)
            sender = a.open_sender(7, r1)
            await trio.sleep(0.05)  # nothing may be sent before the receiver opens
            assert not sender.finished.is_set()
            b.open_receiver(7, w2)
            assert await read_all(r2) == b""
            assert await sender.wait() is Outcome.EOF

    run(body)


def test_yes_into_head_dies_of_sigpipe_promptly() -> None:
    async def body() -> None:
        async with linked_hubs() as (a, b):
            stream, w1, r2 = relay_pipe(a, b)
            await yes_into_head(w1, r2)
            sender = a.endpoints.get(stream)
            if sender is not None:
                assert await sender.wait() is Outcome.PEER_GONE

    run(body)


def test_an_idle_reader_going_away_reaches_the_far_writer_before_it_writes() -> None:
    async def body() -> None:
        async with linked_hubs() as (a, b):
            stream, w1, r2 = relay_pipe(a, b)
            sender, receiver = a.endpoints[stream], b.endpoints[stream]
            os.close(r2)
            assert await receiver.wait() is Outcome.BROKEN
            assert await sender.wait() is Outcome.PEER_GONE
            with pytest.raises(BrokenPipeError):
                os.write(w1, b"x")
            os.close(w1)

    run(body)


def test_a_slow_reader_keeps_in_flight_bytes_within_the_window() -> None:
    window = 256 * 1024
    data = os.urandom(8 * MiB)

    async def body() -> None:
        async with linked_hubs(window=window, chunk=64 * 1024) as (a, b):
            stream, w1, r2 = relay_pipe(a, b)
            sent_info, got_info = a.mux.info(stream), b.mux.info(stream)
            got = b""

            async def slow() -> None:
                nonlocal got
                got = await read_all(r2, chunk=16 * 1024, delay=0.0005)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(write_all, w1, data)
                nursery.start_soon(slow)
            assert got == data
            assert 0 < sent_info.max_in_flight <= window
            assert 0 < got_info.max_buffered <= window
            assert got_info.max_in_flight <= window

    run(body)


def test_many_streams_at_once_both_ways() -> None:
    n = 40
    payloads = [os.urandom(256 * 1024 + i) for i in range(n)]

    async def body() -> None:
        async with linked_hubs(window=128 * 1024) as (a, b):
            results: dict[int, bytes] = {}

            async def one(i: int) -> None:
                src, dst = (a, b) if i % 2 else (b, a)
                _, w, r = relay_pipe(src, dst)

                async def read() -> None:
                    results[i] = await read_all(r)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(write_all, w, payloads[i], 50_000)
                    nursery.start_soon(read)

            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(one, i)
            assert [results[i] == payloads[i] for i in range(n)] == [True] * n

    run(body)


def test_stopping_a_sender_gives_its_writer_epipe_and_the_far_reader_eof() -> None:
    async def body() -> None:
        async with linked_hubs() as (a, b):
            stream, w1, r2 = relay_pipe(a, b)
            os.write(w1, b"before")
            got = b""

            async def read() -> None:
                nonlocal got
                got = await read_all(r2)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                await trio.sleep(0.05)
                a.endpoints[stream].stop()
            assert got == b"before"
            with pytest.raises(BrokenPipeError):
                os.write(w1, b"after")
            os.close(w1)

    run(body)


def test_stopping_a_receiver_ends_the_far_sender() -> None:
    async def body() -> None:
        async with linked_hubs() as (a, b):
            stream, w1, r2 = relay_pipe(a, b)
            sender = a.endpoints[stream]
            b.endpoints[stream].stop()
            assert await sender.wait() is Outcome.PEER_GONE
            assert await read_all(r2) == b""
            with pytest.raises(BrokenPipeError):
                os.write(w1, b"x")
            os.close(w1)

    run(body)


def test_a_lost_link_closes_every_fd() -> None:
    async def body() -> None:
        async with linked_hubs() as (a, b):
            stream, w1, r2 = relay_pipe(a, b)
            sender = a.endpoints[stream]
            a.link_lost()
            assert await sender.wait() is Outcome.LOST
            with pytest.raises(BrokenPipeError):
                os.write(w1, b"x")
            os.close(w1)
            b.link_lost()
            assert await read_all(r2) == b""
            with pytest.raises(RuntimeError, match="lost"):
                a.open_sender(99, os.pipe()[0])

    run(body)


def test_cancelling_the_hub_closes_every_fd() -> None:
    async def body() -> None:
        async with linked_hubs() as (a, b):
            _, w1, r2 = relay_pipe(a, b)
        with pytest.raises(BrokenPipeError):
            os.write(w1, b"x")
        os.close(w1)
        assert await read_all(r2) == b""

    run(body)


def test_a_failing_send_is_a_lost_link() -> None:
    async def broken(msg: StreamMessage) -> None:
        raise PeerUnreachable("gone")

    async def body() -> None:
        hub = StreamHub(broken, odd=True)
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.run)
            r, w = os.pipe()
            endpoint = hub.open_receiver(2, w)
            assert await endpoint.wait() is Outcome.LOST
            assert await read_all(r) == b""
            nursery.cancel_scope.cancel()

    run(body)


def test_deliver_refuses_protocol_errors_and_ignores_other_messages() -> None:
    async def body() -> None:
        async with linked_hubs() as (a, _):
            assert a.deliver("not a stream message") is False
            with pytest.raises(ProtocolError):
                a.deliver(StreamData(5, b"x"))

    run(body)


def test_a_shared_description_is_never_made_non_blocking() -> None:
    async def body() -> None:
        async with linked_hubs() as (a, b):
            r1, w1 = os.pipe()
            r2, w2 = os.pipe()
            mine_r, mine_w = os.dup(r1), os.dup(w2)  # "another process" keeps these
            a.open_sender(1, r1, shared=True)
            b.open_receiver(1, w2, shared=True)
            await trio.sleep(0.05)
            for fd in (mine_r, mine_w):
                assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
            os.close(mine_r)
            await write_all(w1, b"shared")
            os.close(mine_w)
            assert await read_all(r2) == b"shared"

    run(body)


def test_a_socket_reader_sees_eof_while_we_still_read_the_same_socket() -> None:
    """A read-write fd (a tty stand-in) is two streams on two fds of one socket."""

    async def body() -> None:
        async with linked_hubs() as (a, b):
            ours, theirs = socket.socketpair()
            r1, w1 = os.pipe()
            r2, w2 = os.pipe()
            a.open_sender(1, r1)
            b.open_receiver(1, os.dup(ours.fileno()))  # far pipe -> process
            b.open_sender(3, ours.detach())  # process -> far pipe
            a.open_receiver(3, w2)
            await write_all(w1, b"to the process")
            theirs.setblocking(False)
            got = b""
            while True:
                await trio.lowlevel.wait_readable(theirs)
                data = theirs.recv(1024)
                if not data:
                    break
                got += data
            assert got == b"to the process"
            theirs.sendall(b"from the process")
            theirs.close()
            assert await read_all(r2) == b"from the process"

    run(body)


def test_a_socket_writer_gets_epipe_while_we_still_write_the_same_socket() -> None:
    async def body() -> None:
        async with linked_hubs() as (a, b):
            ours, theirs = socket.socketpair()
            r1, w1 = os.pipe()
            r2, w2 = os.pipe()
            a.open_sender(1, r1)
            b.open_receiver(1, os.dup(ours.fileno()))  # far pipe -> process: stays open
            sender = b.open_sender(3, ours.detach())  # process -> far pipe
            a.open_receiver(3, w2)
            os.close(r2)  # the far reader goes away
            assert await sender.wait() is Outcome.PEER_GONE
            with pytest.raises(BrokenPipeError):
                theirs.send(b"x")
            os.close(w1)
            theirs.setblocking(False)
            await trio.lowlevel.wait_readable(theirs)
            assert theirs.recv(10) == b""  # and the other direction still ends cleanly
            theirs.close()

    run(body)


def test_public_names_are_pinned() -> None:
    import dunix.fdmove

    assert sorted(dunix.fdmove.__all__) == sorted(
        [
            "DEFAULT_CHUNK",
            "DEFAULT_WINDOW",
            "PIPE_SIZE",
            "STREAM_AFTER",
            "STREAM_MESSAGES",
            "STREAM_MIN_READ",
            "TRANSITIONS",
            "BulkRelay",
            "Event",
            "Outcome",
            "Role",
            "Send",
            "State",
            "StreamBulk",
            "StreamCredit",
            "StreamData",
            "StreamEnd",
            "StreamEndpoint",
            "StreamGone",
            "StreamHub",
            "StreamInfo",
            "StreamMessage",
            "StreamMux",
            "StreamPull",
            "StreamReady",
            "StreamWant",
            "odd_side",
        ]
    )
    for name in dunix.fdmove.__all__:
        assert hasattr(dunix.fdmove, name)


# -- pull mode: a read end held elsewhere is read only for a blocked reader ---------------


def pulled_pipe(
    sender: StreamHub, receiver: StreamHub, pids: list[int]
) -> tuple[int, int, int, int]:
    """Like ``relay_pipe``, pulled by readers among ``pids``: (stream, write end, a second
    reader's fd of the home pipe, the far read end)."""
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    other = os.dup(r1)
    stream = sender.allocate()
    sender.open_sender(stream, r1, shared=True)
    receiver.open_receiver(stream, w2, pull=lambda key: blocked_readers(pids, key))
    return stream, w1, other, r2


def test_a_read_end_held_but_never_read_takes_nothing() -> None:
    """The procsub race (tests/e2e/scripts/procsub_two.sh): a process that inherited the
    read end must leave every byte to the reader at home."""

    async def body() -> None:
        async with linked_hubs() as (a, b):
            pids: list[int] = []
            stream, w1, other, r2 = pulled_pipe(a, b, pids)
            sender = a.endpoints[stream]
            holder = subprocess.Popen(["sleep", "0.6"], stdin=r2)  # holds, never reads
            pids.append(holder.pid)
            os.close(r2)
            os.write(w1, b"1\n2\n3\n")
            os.close(w1)
            await trio.sleep(0.3)  # the relay would have read it by now
            assert os.read(other, 100) == b"1\n2\n3\n"
            await trio.to_thread.run_sync(holder.wait)
            assert await sender.wait() in (Outcome.PEER_GONE, Outcome.EOF)
            os.close(other)

    run(body)


SELECT_THEN_READ = "import os, select; select.select([0], [], []); print(os.read(0, 2))"


@pytest.mark.parametrize("reader", ["head -c 3", f"python3 -c '{SELECT_THEN_READ}'"])
def test_a_blocked_reader_gets_exactly_one_read(reader: str) -> None:
    """read(2): the home gives up what that one read takes. A reader blocked in select(2)
    is taken to want POLL_WANT bytes (it then reads 2 of the 3 it was given)."""

    async def body() -> None:
        async with linked_hubs() as (a, b):
            pids: list[int] = []
            _, w1, other, r2 = pulled_pipe(a, b, pids)
            proc = subprocess.Popen(
                ["sh", "-c", f"exec {reader}"], stdin=r2, stdout=subprocess.PIPE
            )
            pids.append(proc.pid)
            os.close(r2)
            await trio.sleep(0.2)  # blocked before the data comes
            os.write(w1, b"abc")
            out, _ = await trio.to_thread.run_sync(proc.communicate)
            assert out.strip() in (b"abc", b"b'ab'")
            os.write(w1, b"def")
            os.close(w1)
            rest = os.read(other, 100)
            assert rest == b"def"
            os.close(other)

    run(body)


def test_a_pulled_pipe_carries_megabytes_whole_to_a_steady_reader() -> None:
    data = os.urandom(24 * MiB)

    async def body() -> None:
        async with linked_hubs() as (a, b):
            pids: list[int] = []
            stream, w1, other, r2 = pulled_pipe(a, b, pids)
            sender = a.endpoints[stream]
            os.close(other)
            sink = subprocess.Popen(["sha256sum"], stdin=r2, stdout=subprocess.PIPE)
            pids.append(sink.pid)
            os.close(r2)
            await write_all(w1, data, 300_000)
            out, _ = await trio.to_thread.run_sync(sink.communicate)
            assert out.split()[0].decode() == hashlib.sha256(data).hexdigest()
            assert await sender.wait() is Outcome.EOF

    run(body)


def test_yes_into_a_pulled_head_ends_promptly() -> None:
    async def body() -> None:
        async with linked_hubs() as (a, b):
            pids: list[int] = []
            _, w1, other, r2 = pulled_pipe(a, b, pids)
            os.close(other)
            await yes_into_head(w1, r2, pids)

    run(body)


# -- over a real TLS channel ------------------------------------------------------------------


@pytest.fixture(scope="module")
def identities(tmp_path_factory: pytest.TempPathFactory) -> tuple[TLSIdentity, TLSIdentity]:
    root = tmp_path_factory.mktemp("pki")
    keygen(root, ["n1", "n2"], [])
    return TLSIdentity.load(root, "n1", "node"), TLSIdentity.load(root, "n2", "node")


async def pump_channel(channel: Channel, hub: StreamHub) -> None:
    try:
        async for msg in channel:
            hub.deliver(msg)
    finally:
        hub.link_lost()


@contextlib.asynccontextmanager
async def tls_hubs(
    identities: tuple[TLSIdentity, TLSIdentity],
) -> AsyncIterator[tuple[StreamHub, StreamHub]]:
    """A client hub and a server hub on the two ends of a real mutual-TLS channel."""
    n1, n2 = identities
    opened: list[Channel] = []
    async with trio.open_nursery() as nursery:
        server_hub: list[StreamHub] = []
        ready = trio.Event()

        async def handler(channel: Channel) -> None:
            async with trio.open_nursery() as inner:
                hub = StreamHub(channel.send, odd=False)
                await inner.start(hub.run)
                server_hub.append(hub)
                ready.set()
                await pump_channel(channel, hub)
                inner.cancel_scope.cancel()

        listeners = await nursery.start(serve_tls, "127.0.0.1:0", n1, handler)
        channel = await open_channel(listener_addresses(listeners)[0], n2)
        opened.append(channel)
        client = StreamHub(channel.send, odd=True)
        await nursery.start(client.run)
        nursery.start_soon(pump_channel, channel, client)
        await ready.wait()
        yield client, server_hub[0]
        nursery.cancel_scope.cancel()
    await opened[0].aclose()


def test_over_a_real_tls_channel(identities: tuple[TLSIdentity, TLSIdentity]) -> None:
    data = os.urandom(24 * MiB)

    async def body() -> None:
        async with tls_hubs(identities) as (client, server):
            results: list[bytes] = [b"", b""]

            async def one(i: int, src: StreamHub, dst: StreamHub) -> None:
                _, w, r = relay_pipe(src, dst)

                async def read() -> None:
                    results[i] = await read_all(r)

                async with trio.open_nursery() as inner:
                    inner.start_soon(write_all, w, data)
                    inner.start_soon(read)

            async with trio.open_nursery() as both:
                both.start_soon(one, 0, client, server)
                both.start_soon(one, 1, server, client)
            assert results == [data, data]

    run(body)


def test_yes_into_head_over_tls(identities: tuple[TLSIdentity, TLSIdentity]) -> None:
    async def body() -> None:
        async with tls_hubs(identities) as (client, server):
            _, w1, r2 = relay_pipe(client, server)
            await yes_into_head(w1, r2)

    run(body)


def test_fifo_write_end_whose_reader_is_gone(tmp_path: Path) -> None:
    """A shared FIFO reopened for writing with no reader: the receiver is broken at once."""

    async def body() -> None:
        async with linked_hubs() as (a, b):
            fifo = tmp_path / "fifo"
            os.mkfifo(fifo)
            reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.close(reader)
            r1, w1 = os.pipe()
            sender = a.open_sender(1, r1)
            receiver = b.open_receiver(1, writer, shared=True)
            assert await receiver.wait() is Outcome.BROKEN
            assert await sender.wait() is Outcome.PEER_GONE
            with pytest.raises(BrokenPipeError):
                os.write(w1, b"x")
            os.close(w1)

    run(body)
