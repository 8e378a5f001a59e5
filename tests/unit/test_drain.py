"""``drain.flush``: a process's output is relayed after its exit as long as it moves."""

from __future__ import annotations

import fcntl
import os

import trio

from dunix.agent.drain import flush
from tests.unit.test_relay import linked_hubs, read_all, run

KiB = 1024
F_SETPIPE_SZ = 1031


def big_pipe() -> tuple[int, int]:
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 1024 * KiB)
    return r, w


def test_a_slow_reader_gets_everything_past_the_idle_time() -> None:
    """512 KiB left in the pipe, a reader taking 8 KiB every 5 ms (~0.3 s in all) past a
    64 KiB pipe and a 32 KiB window: with 0.1 s of idle allowed, the flush waits until
    all of it was sent, since bytes keep moving."""
    data = os.urandom(512 * KiB)

    async def body() -> None:
        async with linked_hubs(window=32 * KiB, chunk=8 * KiB) as (a, b):
            r1, w1 = big_pipe()
            r2, w2 = os.pipe()
            os.write(w1, data)  # what the process left; a child of it holds the pipe on
            stream = a.allocate()
            sender = a.open_sender(stream, r1)
            receiver = b.open_receiver(stream, w2)
            fcntl.fcntl(r2, F_SETPIPE_SZ, 64 * KiB)  # the relay made it 1 MiB: undone
            got = bytearray()

            async def slow() -> None:
                os.set_blocking(r2, False)
                while len(got) < len(data):
                    try:
                        got.extend(os.read(r2, 8 * KiB))
                    except BlockingIOError:
                        await trio.lowlevel.wait_readable(r2)
                        continue
                    await trio.sleep(0.005)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(slow)
                started = trio.current_time()
                assert await flush([sender], idle=0.1)
                assert trio.current_time() - started > 0.1
                assert await flush([receiver], idle=0.1)
            assert bytes(got) == data
            assert sender.running  # no EOF: the child still holds the write end
            os.close(w1)
            os.close(r2)

    run(body)


def test_no_progress_gives_up_after_the_idle_time() -> None:
    async def body() -> None:
        async with linked_hubs(window=32 * KiB, chunk=8 * KiB) as (a, b):
            r1, w1 = big_pipe()
            r2, w2 = os.pipe()
            os.write(w1, os.urandom(512 * KiB))
            stream = a.allocate()
            sender = a.open_sender(stream, r1)
            b.open_receiver(stream, w2)  # nobody reads r2: the window fills, then nothing
            fcntl.fcntl(r2, F_SETPIPE_SZ, 64 * KiB)
            with trio.fail_after(5):
                assert not await flush([sender], idle=0.2)
            os.close(w1)
            os.close(r2)

    run(body)


def test_bytes_written_after_the_exit_do_not_hold_it() -> None:
    """A child that writes on and on: the flush ends once what was there at the start
    is sent."""

    async def body() -> None:
        async with linked_hubs() as (a, b):
            r1, w1 = big_pipe()
            r2, w2 = os.pipe()
            os.write(w1, b"left by the process\n")
            stream = a.allocate()
            sender = a.open_sender(stream, r1)
            b.open_receiver(stream, w2)

            async def child() -> None:
                while True:
                    os.write(w1, b"more\n")
                    await trio.sleep(0.001)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(child)
                nursery.start_soon(read_all, r2)
                with trio.fail_after(5):
                    assert await flush([sender], idle=1.0)
                nursery.cancel_scope.cancel()
            os.close(w1)

    run(body)
