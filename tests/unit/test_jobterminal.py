"""The job's own terminal at home (dunix.agent.pty.JobTerminal) on real local ptys."""

from __future__ import annotations

import contextlib
import os
import threading
import tty

import trio

from dunix.agent.pty import JobTerminal


def test_drained_waits_for_a_caller_that_reads_slowly() -> None:
    """The job wrote its last output and ended while the caller's terminal was full: its
    reader pausing longer than the idle time must not cut the output off."""
    data = b"".join(b"%d\n" % n for n in range(8000))  # ~40 KB: more than the ptys hold

    async def main() -> None:
        caller_master, caller_slave = os.openpty()
        tty.setraw(caller_slave)  # the client's raw mode: bytes pass unchanged
        term = JobTerminal(caller_slave)
        tty.setraw(term.slave)
        job = os.dup(term.slave)
        term.slave_given()

        def program() -> None:  # writes everything (blocking), then exits
            os.write(job, data)
            os.close(job)

        got = bytearray()
        relay = trio.CancelScope()

        async def relay_until_closed() -> None:
            with relay:
                await term.run()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay_until_closed)
            writer = threading.Thread(target=program)
            writer.start()
            await trio.sleep(0.3)  # the caller reads nothing for 3x the idle time
            os.set_blocking(caller_master, False)

            async def read_caller() -> None:
                while True:
                    await trio.lowlevel.wait_readable(caller_master)
                    with contextlib.suppress(BlockingIOError):
                        got.extend(os.read(caller_master, 65536))
                    await trio.sleep(0.25)  # and then slowly: pauses longer than idle

            nursery.start_soon(read_caller)
            await trio.to_thread.run_sync(writer.join)  # the job ended
            with trio.fail_after(10):
                await term.drained(limit=5)
            relay.cancel()  # as the runner does: the terminal is closed next
            nursery.cancel_scope.cancel()
        with contextlib.suppress(BlockingIOError):  # what reached the caller's terminal
            while chunk := os.read(caller_master, 65536):
                got.extend(chunk)
        term.close()
        os.close(caller_master)
        os.close(caller_slave)
        assert bytes(got) == data

    trio.run(main)
