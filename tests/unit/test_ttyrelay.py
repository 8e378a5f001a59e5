"""The terminal pieces of a remote process (dunix.fdmove.ttyrelay) on real local ptys."""

from __future__ import annotations

import fcntl
import os
import struct
import termios
import tty

import trio

from dunix.fdmove.ttyrelay import (
    GuestTerminal,
    HomeTerminal,
    get_modes,
    get_winsize,
    home_modes,
)


def _lflag(modes: bytes) -> int:
    return int(struct.unpack_from("4I", modes)[3])


def test_home_leaves_echo_line_editing_and_signal_keys_to_the_guest() -> None:
    master, slave = os.openpty()
    try:
        cooked = get_modes(slave)
        assert _lflag(cooked) & termios.ICANON and _lflag(cooked) & termios.ECHO
        home = _lflag(home_modes(cooked))
        assert not home & (termios.ICANON | termios.ECHO | termios.ECHOE | termios.ECHOK)
        assert not home & termios.ISIG  # Ctrl-C and Ctrl-Z go to the guest's foreground
        assert home_modes(cooked)[:8] == cooked[:8]  # input and output flags as they are
    finally:
        os.close(master)
        os.close(slave)


def test_guest_pty_starts_as_the_home_terminal() -> None:
    master, slave = os.openpty()
    tty.setraw(slave)
    size = struct.pack("4H", 33, 101, 0, 0)
    fcntl.ioctl(master, termios.TIOCSWINSZ, size)
    guest = GuestTerminal(get_modes(slave), get_winsize(slave))
    try:
        inner = guest.slave_fd()
        assert get_modes(inner) == get_modes(slave)
        assert get_winsize(inner) == size
        os.close(inner)
    finally:
        guest.close()
        os.close(master)
        os.close(slave)


def test_modes_set_by_the_program_travel_home_and_stay_after_it() -> None:
    async def main() -> None:
        guest = GuestTerminal(b"", b"")
        home_master, home_slave = os.openpty()
        home = HomeTerminal(os.dup(home_slave), reads=True)
        program = guest.slave_fd()
        guest.spawned()
        seen: list[bytes] = []

        async def send(modes: bytes) -> None:
            seen.append(modes)
            home.mirror(modes)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(guest.watch_modes, send)
            await trio.sleep(0.01)
            tty.setraw(program)  # the program goes raw on the guest's pty
            with trio.fail_after(5):
                while len(seen) < 2:
                    await trio.sleep(0.01)
            assert not _lflag(get_modes(home_slave)) & termios.ICANON
            nursery.cancel_scope.cancel()
        os.close(program)
        await guest.last_modes(send)
        guest.close()
        home.end()  # the home terminal keeps what the program left: raw
        assert get_modes(home_slave) == seen[-1]
        os.close(home_master)
        os.close(home_slave)

    trio.run(main)


def test_output_leaves_the_newline_to_the_home_terminal() -> None:
    async def main() -> None:
        guest = GuestTerminal(b"", b"")
        out = guest.output_fd()
        program = guest.slave_fd()
        guest.spawned()
        os.write(program, b"one\ntwo\r\n")  # the pty makes it one\r\ntwo\r\r\n
        os.close(program)
        with trio.fail_after(5):
            await guest.pump()  # ends at EIO: no slave fd is left
        assert os.read(out, 100) == b"one\ntwo\r\n"
        assert os.read(out, 100) == b""  # the pipe ended with the pty
        os.close(out)
        guest.close()

    trio.run(main)
