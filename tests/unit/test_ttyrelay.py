"""The terminal pieces of a remote process (dunix.fdmove.ttyrelay) on real local ptys."""

from __future__ import annotations

import fcntl
import os
import struct
import termios
import tty

import trio

from dunix.fdmove.ttyrelay import (
    CrLfFolder,
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


def test_a_cr_lf_split_between_reads_still_becomes_lf() -> None:
    """seq 1 100000 on a remote pty lost ~17 lines to CR CR LF: a read ended between the
    CR and the LF of a newline, so neither half was folded."""
    fold = CrLfFolder()
    out = fold.feed(b"1\r\n2\r") + fold.feed(b"\n3\r\r") + fold.feed(b"\n4\r") + fold.flush()
    assert out == b"1\n2\n3\r\n4\r"  # a CR the program wrote before its newline stays
    assert fold.feed(b"a\r\nb\r", fold=False) == b"a\r\nb\r"  # raw output: as it is
    assert fold.held == b""


def test_a_mode_report_cancelled_on_its_way_is_sent_at_the_end() -> None:
    """The program went raw and ended while the watcher's report waited for the link: the
    end's report still carries the raw modes (the home terminal must keep them)."""

    async def main() -> None:
        guest = GuestTerminal(b"", b"")
        program = guest.slave_fd()
        guest.spawned()
        sent: list[bytes] = []
        stuck = trio.Event()

        async def busy_link(modes: bytes) -> None:
            if sent:  # the first report goes; the next one finds the link busy
                stuck.set()
                await trio.sleep_forever()
            sent.append(modes)

        async def link(modes: bytes) -> None:
            sent.append(modes)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(guest.watch_modes, busy_link)
            with trio.fail_after(5):
                while not sent:
                    await trio.sleep(0.01)
                tty.setraw(program)
                await stuck.wait()
            await guest.last_modes(link)  # cancels the watcher, whose report never went
        assert len(sent) == 2 and sent[-1] == get_modes(program)
        assert not _lflag(sent[-1]) & termios.ICANON
        os.close(program)
        guest.close()

    trio.run(main)
