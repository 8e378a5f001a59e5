"""A remote process's terminal: a pty on the guest's host, relayed to the home's terminal.

Home: the deputy's terminal fds (its job's pty, see ``dunix.agent.pty``) are described
once per terminal: one stream carries the program's output home, one (only when the
program reads the terminal on fd 0) carries the keys to the guest; both ride the
ordinary stream relays. The guest opens a pty with the home terminal's termios and window
size; its slave becomes every one of those fds, and its controlling terminal (the guest
tracer's ``--ctty``).

Who interprets the keys: the guest's line discipline, because the program sets its modes
there. It watches them (TCGETS on the master reads the slave's termios) and reports every
change home (``RemoteTtyMode``); the home terminal takes the same modes but leaves echo,
line editing and the signal keys to the guest (``ECHO*``, ``ICANON``, ``ISIG`` off), so
nothing is echoed twice, each key reaches the guest at once, and Ctrl-C/Ctrl-Z signal the
guest terminal's foreground group (a stop then travels home: the deputy stops too, and
`dunix run` when it is the job's first process). When the program ends, the
home terminal gets exactly the modes it left. Window size changes at home go to the guest
(``RemoteWinsize``); its kernel then signals the guest's foreground group.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import struct
import termios
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger("dunix.fdmove.ttyrelay")

#: struct termios as TCGETS/TCSETS move it (the kernel's, not glibc's: 4 flags, line, 19 cc)
_KTERMIOS = struct.Struct("4IB19s")
_WINSIZE_BYTES = 8
WATCH_PERIOD = 0.05  # how often a guest looks at its pty's modes (a TCGETS each)
CR_WAIT = 0.02  # how long a CR that ends a read waits for its LF before it goes alone
#: what the guest's line discipline does with keys, never done twice: echo, line editing,
#: and the signal keys (only the guest knows its terminal's foreground group: a `bash -i`
#: there puts its `sleep` in front, and Ctrl-Z must reach that, not bash)
GUEST_LFLAGS = (
    termios.ECHO | termios.ECHOE | termios.ECHOK | termios.ECHONL | termios.ICANON | termios.ISIG
)


def get_modes(fd: int) -> bytes:
    """The termios of terminal ``fd`` (of the slave, when ``fd`` is a pty master)."""
    return bytes(fcntl.ioctl(fd, termios.TCGETS, bytes(_KTERMIOS.size)))


def set_modes(fd: int, modes: bytes) -> None:
    if len(modes) != _KTERMIOS.size:
        raise ValueError(f"termios of {len(modes)} bytes")
    fcntl.ioctl(fd, termios.TCSETS, modes)


def get_winsize(fd: int) -> bytes:
    return bytes(fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(_WINSIZE_BYTES)))


def set_winsize(fd: int, winsize: bytes) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, winsize)


def _onlcr(modes: bytes) -> bool:
    oflag = _KTERMIOS.unpack(modes)[1]
    return bool(oflag & termios.OPOST and oflag & termios.ONLCR)


def home_modes(guest: bytes) -> bytes:
    """The modes the home terminal takes while a guest interprets keys with ``guest``."""
    iflag, oflag, cflag, lflag, line, cc = _KTERMIOS.unpack(guest)
    return _KTERMIOS.pack(iflag, oflag, cflag, lflag & ~GUEST_LFLAGS, line, cc)


class CrLfFolder:
    """Turns CR LF back into LF in a byte stream read in chunks: a CR that ends one chunk
    is held until the next shows whether LF follows (``flush`` lets it go alone)."""

    def __init__(self) -> None:
        self.held = b""

    def feed(self, data: bytes, fold: bool = True) -> bytes:
        data, self.held = self.held + data, b""
        if not fold:
            return data
        if data.endswith(b"\r"):
            data, self.held = data[:-1], b"\r"
        return data.replace(b"\r\n", b"\n")

    def flush(self) -> bytes:
        data, self.held = self.held, b""
        return data


class HomeTerminal:
    """Home side of one deputy's terminal: mirrors the guest's modes, sends size changes.

    ``fd`` is the agent's duplicate of the deputy's terminal fd (its own; closed here).
    """

    def __init__(self, fd: int, reads: bool, pid: int = 0) -> None:
        self.fd = fd
        self.reads = reads  # the program reads this terminal (fd 0): keys go to the guest
        self.pid = pid  # the deputy: keys go to its guest only while it is in front
        self._keys = -1
        self._keys_scope = trio.CancelScope()
        self.path = ""  # which terminal (/dev/pts/N): the program's fds on it share one pty
        self.stream_in = 0  # the stream of the keys, when it reads
        self.modes = get_modes(fd)
        self.winsize = get_winsize(fd)
        self.last_guest_modes = b""
        self._scope = trio.CancelScope()

    def mirror(self, guest: bytes) -> None:
        """The guest's pty took ``guest`` modes."""
        self.last_guest_modes = guest
        if not self.reads:
            return
        with contextlib.suppress(OSError, ValueError):
            set_modes(self.fd, home_modes(guest))

    async def watch_size(self, send_winsize: Callable[[bytes], Awaitable[None]]) -> None:
        """``send_winsize(size)`` whenever the home terminal's size changes."""
        with self._scope:
            while True:
                await trio.sleep(WATCH_PERIOD * 4)
                try:
                    size = get_winsize(self.fd)
                except OSError:
                    return
                if size != self.winsize:
                    self.winsize = size
                    await send_winsize(size)

    def keys_fd(self) -> int:
        """The read end of a pipe that carries the keys (see :meth:`pump_keys`), for the
        relay sender (which owns it)."""
        r, self._keys = os.pipe2(os.O_CLOEXEC)
        return r

    def in_front(self) -> bool:
        """Whether the deputy may read its terminal as a program would: not stopped, and
        its group is the terminal's foreground one (or it has no controlling terminal).
        A stopped or background remote reader must leave the keys to its shell (proc(5):
        stat fields 3 state, 5 pgrp, 8 tpgid)."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return False
        state, pgrp, tpgid = fields[0], int(fields[2]), int(fields[5])
        return state not in ("T", "t") and (tpgid <= 0 or tpgid == pgrp)

    async def pump_keys(self) -> None:
        """Move keys from the terminal into the pipe of :meth:`keys_fd` while the deputy is
        in front; its own open file description, so being non-blocking touches no one."""
        if self.fd < 0 or self._keys < 0:
            return  # the program ended before this task ran (end() closed both)
        flags = os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
        tty = os.open(f"/proc/self/fd/{self.fd}", flags)
        os.set_blocking(self._keys, False)
        try:
            with self._keys_scope:
                while True:
                    if not self.in_front():
                        await trio.sleep(WATCH_PERIOD)
                        continue
                    with trio.move_on_after(WATCH_PERIOD * 2):
                        await trio.lowlevel.wait_readable(tty)
                    if not self.in_front():
                        continue
                    try:
                        data = os.read(tty, 4096)
                    except BlockingIOError:
                        continue
                    except OSError:
                        return
                    if not data:
                        return
                    view = memoryview(data)
                    while view:
                        try:
                            view = view[os.write(self._keys, view) :]
                        except BlockingIOError:
                            await trio.lowlevel.wait_writable(self._keys)
        except OSError as exc:  # EPIPE: the relay stopped
            log.info("keys: %s", exc)
        finally:
            os.close(tty)

    def end(self) -> None:
        """The program ended: the terminal keeps the modes it left (as without dunix)."""
        self._scope.cancel()
        self._keys_scope.cancel()
        if self._keys >= 0:
            os.close(self._keys)
            self._keys = -1
        if self.reads and self.last_guest_modes:
            with contextlib.suppress(OSError, ValueError):
                set_modes(self.fd, self.last_guest_modes)
        os.close(self.fd)
        self.fd = -1


class GuestTerminal:
    """Guest side: the pty standing in for the home's terminal."""

    def __init__(self, modes: bytes, winsize: bytes) -> None:
        self.master, self.slave = os.openpty()
        try:
            if modes:
                set_modes(self.master, modes)  # on a master: the slave's termios
            if winsize:
                set_winsize(self.master, winsize)
        except (OSError, ValueError) as exc:
            log.warning("pty settings from home: %s", exc)
        self.modes = get_modes(self.master)
        self._sent = b""  # the modes home has (RemoteTtyMode)
        self._scope = trio.CancelScope()
        self._out = -1

    def slave_fd(self) -> int:
        """A new fd of the slave, for one of the program's fds (the caller closes it)."""
        return os.dup(self.slave)

    def master_fd(self) -> int:
        """A new fd of the master, for a relay endpoint (which owns it)."""
        return os.dup(self.master)

    def output_fd(self) -> int:
        """The read end of a pipe that carries the pty's output (see :meth:`pump`), for
        the relay sender (which owns it)."""
        r, self._out = os.pipe2(os.O_CLOEXEC)
        return r

    async def pump(self) -> None:
        """Move the pty's output into the pipe of :meth:`output_fd` until the program and
        its children have closed the pty (EIO), then end the pipe.

        The guest's line discipline turned each newline into CR LF (ONLCR) and the home's
        will do it again: each CR LF becomes LF here (:class:`CrLfFolder`), so the caller
        sees one CR (what the program wrote as CR LF itself comes out the same, CR CR LF
        as directly).
        """
        master = self.master_fd()
        os.set_blocking(master, False)
        os.set_blocking(self._out, False)
        fold = CrLfFolder()
        try:
            while True:
                try:
                    data = os.read(master, 65536)
                except BlockingIOError:
                    with trio.move_on_after(CR_WAIT if fold.held else math.inf) as waited:
                        await trio.lowlevel.wait_readable(master)
                    if waited.cancelled_caught:  # a lone CR (a progress line): show it
                        await self._write_out(fold.flush())
                    continue
                except OSError:  # EIO: every slave fd is closed
                    break
                if not data:
                    break
                await self._write_out(fold.feed(data, _onlcr(self.modes)))
            await self._write_out(fold.flush())
        except OSError as exc:  # EPIPE: the relay stopped
            log.info("pty output: %s", exc)
        finally:
            os.close(master)
            self._close_out()

    async def _write_out(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._out, view) :]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self._out)

    def _close_out(self) -> None:
        if self._out >= 0:
            os.close(self._out)
            self._out = -1

    def spawned(self) -> None:
        """The program holds the slave now: ours would keep the master from seeing EIO."""
        if self.slave >= 0:
            os.close(self.slave)
            self.slave = -1

    def resize(self, winsize: bytes) -> None:
        with contextlib.suppress(OSError):
            set_winsize(self.master, winsize)

    async def watch_modes(self, send_modes: Callable[[bytes], Awaitable[None]]) -> None:
        """``send_modes(modes)`` now and at every change of the pty's modes."""
        with self._scope:
            while await self._report(send_modes):
                await trio.sleep(WATCH_PERIOD)

    async def last_modes(self, send_modes: Callable[[bytes], Awaitable[None]]) -> None:
        """The program ended: report modes it set since the last report home."""
        self._scope.cancel()
        await self._report(send_modes)

    async def _report(self, send_modes: Callable[[bytes], Awaitable[None]]) -> bool:
        """Send the pty's modes unless home has them; False once the pty is gone.

        What home has is what was sent, not what was seen: a watcher cancelled while it
        sends (the program ended) leaves the change to :meth:`last_modes`."""
        try:
            self.modes = get_modes(self.master)
        except OSError:
            return False
        if self.modes != self._sent:
            modes = self.modes
            await send_modes(modes)
            self._sent = modes
        return True

    def close(self) -> None:
        self._scope.cancel()
        self._close_out()
        self.spawned()
        if self.master >= 0:
            os.close(self.master)
            self.master = -1
