"""A job's own terminal: a pty at home, relayed to the caller's terminal (as ``ssh -t``).

Why not hand the caller's terminal itself to the job: the job's processes are forked by
the agent, in another session (and PID namespace) than the caller, so the job can never be
that terminal's foreground process group (tcsetpgrp(3) wants a group of the terminal's own
session: EPERM), cannot open /dev/tty, and Ctrl-C/Ctrl-Z/SIGWINCH from the line discipline
would reach `dunix run`, not the job. So when the caller's fd 0 is a terminal, the job gets
the slave of a new pty as its controlling terminal (the tracer's ``--ctty``): the job's
line discipline sends Ctrl-C, Ctrl-Z and SIGWINCH to the job's own foreground group (a
`bash -i` in the job does job control), and raw mode set by a job applies where the keys
are interpreted. The client puts the caller's terminal in raw mode while the job runs, so
bytes pass unchanged both ways, and restores it afterwards; the agent copies the caller's
termios and window size to the pty at the start, and the window size again on each
SIGWINCH the client forwards.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import termios

import trio

log = logging.getLogger("dunix.agent.pty")

CHUNK = 65536
_WINSIZE = struct.Struct("4H")


def get_winsize(fd: int) -> bytes:
    """The window size of terminal ``fd`` (struct winsize, 8 bytes)."""
    return fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(_WINSIZE.size))


def set_winsize(fd: int, winsize: bytes) -> None:
    """Set it; the kernel sends SIGWINCH to the foreground group when it changes."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, winsize)


def same_terminal(fd: int, other: int) -> bool:
    a, b = os.fstat(fd), os.fstat(other)
    return os.isatty(other) and (a.st_rdev, a.st_dev, a.st_ino) == (b.st_rdev, b.st_dev, b.st_ino)


class JobTerminal:
    """The pty of one job and the relay between its master and the caller's terminal.

    The caller's fd is reopened through /proc/self/fd (a new open file description), so
    making it non-blocking does not touch the caller's shell. ``slave`` is for the job's
    tracer; close it (``slave_given``) once the tracer has it, or the master never sees EIO.
    """

    def __init__(self, caller_fd: int) -> None:
        self.caller = os.open(
            f"/proc/self/fd/{caller_fd}", os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
        )
        try:
            self.master, self.slave = os.openpty()
        except OSError:
            os.close(self.caller)
            raise
        os.set_blocking(self.master, False)
        try:
            termios.tcsetattr(self.slave, termios.TCSANOW, termios.tcgetattr(self.caller))
            set_winsize(self.master, get_winsize(self.caller))
        except (OSError, termios.error) as exc:
            log.warning("cannot copy the caller's terminal settings: %s", exc)
        self.paused = False  # the caller's shell owns its terminal (the job is stopped)
        self._resumed = trio.Event()
        self._ended = trio.Event()  # every slave fd is closed (EIO on the master)
        self._last_output = trio.current_time()  # bytes last came from the job or went on
        self._pending = 0  # bytes read from the job's pty that the caller has not taken

    def slave_given(self) -> None:
        if self.slave >= 0:
            os.close(self.slave)
            self.slave = -1

    def resize(self) -> None:
        """The caller's window changed (the client forwarded SIGWINCH): follow it."""
        try:
            set_winsize(self.master, get_winsize(self.caller))
        except OSError as exc:
            log.debug("resize: %s", exc)

    def pause(self) -> None:
        """Stop reading the caller's terminal: the job stopped, its shell reads it now."""
        self.paused = True
        self._resumed = trio.Event()

    def resume(self) -> None:
        self.paused = False
        self._resumed.set()

    async def run(self) -> None:
        """Relay both ways until every slave fd is closed; cancel to stop early."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keys)
            await self._output()
            nursery.cancel_scope.cancel()

    async def drained(self, idle: float = 0.1, limit: float = 2.0) -> None:
        """Wait until the job's output has reached the caller: the pty ended (EIO), or no
        byte came for ``idle`` seconds (a background process may hold it open) and none
        waits for the caller, at most ``limit`` seconds. A caller that reads slowly is not
        a quiet job: output blocked on it for more than ``idle`` was cut off."""
        with trio.move_on_after(limit):
            while not self._ended.is_set():
                quiet = trio.current_time() - self._last_output
                if quiet >= idle and not self._pending:
                    return
                with trio.move_on_after(max(idle - quiet, idle / 10)):
                    await self._ended.wait()

    async def _output(self) -> None:
        while True:
            await trio.lowlevel.wait_readable(self.master)
            try:
                data = os.read(self.master, CHUNK)
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno != errno.EIO:  # EIO: the last slave fd closed
                    log.warning("pty read: %s", exc)
                break
            if not data:
                break
            self._last_output = trio.current_time()
            self._pending = len(data)
            await _write_all(self.caller, data)
            self._pending = 0
            self._last_output = trio.current_time()
        self._ended.set()

    async def _keys(self) -> None:
        while True:
            if self.paused:
                await self._resumed.wait()
                continue
            await trio.lowlevel.wait_readable(self.caller)
            if self.paused:
                continue
            try:
                data = os.read(self.caller, CHUNK)
            except BlockingIOError:
                continue
            except OSError as exc:  # the caller's terminal hung up
                log.info("caller's terminal: %s", exc)
                return
            if not data:
                return
            await _write_all(self.master, data)

    def close(self) -> None:
        self.slave_given()
        for fd in (self.master, self.caller):
            os.close(fd)
        self.master = self.caller = -1


async def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(fd)
            continue
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.EPIPE):
                return  # the other side is gone: nothing to deliver to
            raise
        view = view[n:]
