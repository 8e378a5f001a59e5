"""The native deputy against the Python DeputyListener, over a real SEQPACKET socket.

Waits are on events (a message, EOF, waitpid, a bit in SigCgt), never on a sleep.
"""

from __future__ import annotations

import os
import resource
import signal
import stat
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import pytest
import trio

from dunix.errors import ConfigError, ProtocolError
from dunix.fdmove.deputy import (
    DeputyConnection,
    DeputyHello,
    DeputyListener,
    DeputySignal,
    decode_deputy_msg,
    encode_deputy_msg,
    parse_deputy_event,
)
from dunix.fdmove.inventory import SignalState, inventory, movable, signal_state
from dunix.fdmove.pidfd import pidfd_getfd, pidfd_open

NATIVE = Path(__file__).resolve().parents[2] / "native"
TIMEOUT = 10


@pytest.fixture(scope="session")
def deputy_bin() -> Path:
    # only our target: the rest of native/ may be mid-change
    subprocess.run(["make", "-s", "-C", str(NATIVE), "build/dunix-deputy"], check=True)
    return NATIVE / "build" / "dunix-deputy"


class Deputy:
    """A running deputy and the agent's connection to it."""

    def __init__(self, proc: subprocess.Popen[bytes], conn: DeputyConnection) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.conn = conn
        self.reaped = False

    async def recv(self) -> list[str] | None:
        with trio.fail_after(TIMEOUT):
            return await self.conn.recv()

    async def hello(self) -> int:
        msg = await self.recv()
        assert msg is not None
        assert msg[0] == "hello"
        return int(msg[1])

    async def ready(self) -> None:
        """Send `ready` and wait until the deputy catches signals (SigCgt has SIGTERM)."""
        await self.conn.send("ready")
        with trio.fail_after(TIMEOUT):
            while not _caught(self.pid) >> (signal.SIGTERM - 1) & 1:
                await trio.sleep(0.005)

    async def wait(self, options: int = 0) -> int:
        with trio.fail_after(TIMEOUT):
            _, status = await trio.to_thread.run_sync(
                os.waitpid, self.pid, options, abandon_on_cancel=True
            )
        if not os.WIFSTOPPED(status):
            self.reaped = True
            self.proc.returncode = -1
        return status

    def kill(self) -> None:
        if not self.reaped:
            os.kill(self.pid, signal.SIGKILL)
            with suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            self.reaped = True
            self.proc.returncode = -1


def _caught(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return int(line.split()[1], 16)
    return 0


@asynccontextmanager
async def running_deputy(
    deputy_bin: Path,
    sock: Path,
    *,
    stdout: int = subprocess.DEVNULL,
    preexec_fn: Callable[[], None] | None = None,
    cwd: Path | None = None,
    argv: tuple[str, ...] = ("the-program", "arg"),
) -> AsyncIterator[Deputy]:
    send, recv = trio.open_memory_channel[tuple[int, DeputyConnection]](1)

    async def handler(pid: int, conn: DeputyConnection) -> None:
        await send.send((pid, conn))
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        await nursery.start(DeputyListener(sock, handler).serve)
        proc = subprocess.Popen(
            list(argv),  # as after a redirected exec: the program's argv, the deputy's image
            executable=deputy_bin,
            env={**os.environ, "DUNIX_DEPUTY_SOCKET": str(sock)},
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.DEVNULL,
            preexec_fn=preexec_fn,
            cwd=cwd,
        )
        try:
            with trio.fail_after(TIMEOUT):
                pid, conn = await recv.receive()
            assert pid == proc.pid  # SO_PEERCRED
            deputy = Deputy(proc, conn)
            try:
                yield deputy
            finally:
                deputy.kill()
        finally:
            if proc.returncode is None:
                proc.kill()
                proc.wait()
            nursery.cancel_scope.cancel()


def test_before_ready_nothing_changes_after_ready_fds_close_and_signals_flow(
    deputy_bin: Path, tmp_path: Path
) -> None:
    def setup() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})

    async def main() -> None:
        r, w = os.pipe()
        async with running_deputy(
            deputy_bin, tmp_path / "deputy.sock", stdout=w, preexec_fn=setup
        ) as d:
            os.close(w)
            sockfd = await d.hello()

            state = signal_state(d.pid)
            assert signal.SIGINT in SignalState.signals(state.ignored)
            assert SignalState.signals(state.blocked) == [signal.SIGUSR1]
            held = inventory(d.pid, exclude={sockfd})
            assert [(f.fd, f.kind) for f in held] == [(0, "null"), (1, "pipe"), (2, "null")]
            assert movable(held) is None

            pidfd = pidfd_open(d.pid)
            dup = pidfd_getfd(pidfd, 1)
            os.close(pidfd)
            os.write(dup, b"through the agent's copy\n")
            os.close(dup)

            os.kill(d.pid, signal.SIGUSR1)  # blocked: pends until the deputy unblocks
            await d.conn.send("ready")
            # EOF: the deputy closed its stdout and the agent's copy is closed too
            with trio.fail_after(TIMEOUT):
                data = await trio.to_thread.run_sync(_read_all, r, abandon_on_cancel=True)
            assert data == b"through the agent's copy\n"
            assert await d.recv() == ["signal", str(int(signal.SIGUSR1))]

            # SIGINT stays ignored (no message); SIGCHLD is not forwarded; SIGWINCH is
            await d.ready()
            os.kill(d.pid, signal.SIGINT)
            os.kill(d.pid, signal.SIGCHLD)
            os.kill(d.pid, signal.SIGTERM)
            assert await d.recv() == ["signal", str(int(signal.SIGTERM))]
            os.kill(d.pid, signal.SIGWINCH)
            assert await d.recv() == ["signal", str(int(signal.SIGWINCH))]
            # what is left besides the socket is the deputy's own self-pipe
            assert {f.kind for f in inventory(d.pid, exclude={sockfd})} == {"pipe"}

            await d.conn.send("exit", 3)
            status = await d.wait()
            assert os.WIFEXITED(status)
            assert os.WEXITSTATUS(status) == 3

    trio.run(main)


def _read_all(fd: int) -> bytes:
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


@pytest.mark.parametrize(
    "sig",
    [signal.SIGHUP, signal.SIGSEGV, signal.SIGPIPE, signal.SIGTSTP, signal.SIGRTMIN + 1],
)
def test_signals_are_forwarded(deputy_bin: Path, tmp_path: Path, sig: int) -> None:
    async def main() -> None:
        async with running_deputy(deputy_bin, tmp_path / "deputy.sock") as d:
            await d.hello()
            await d.ready()
            os.kill(d.pid, sig)  # from kill(2): a SIGSEGV too is the user's, not a fault
            assert await d.recv() == ["signal", str(int(sig))]

    trio.run(main)


@pytest.mark.parametrize("after_ready", [False, True])
def test_exit(deputy_bin: Path, tmp_path: Path, after_ready: bool) -> None:
    async def main() -> None:
        async with running_deputy(deputy_bin, tmp_path / "deputy.sock") as d:
            await d.hello()
            if after_ready:
                await d.ready()
            await d.conn.send("exit", 3)
            status = await d.wait()
            assert os.WIFEXITED(status)
            assert os.WEXITSTATUS(status) == 3

    trio.run(main)


@pytest.mark.parametrize(
    "sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGQUIT, signal.SIGSEGV, signal.SIGINT]
)
def test_killed_by_the_remote_signal_without_core(
    deputy_bin: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    def allow_cores() -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_CORE)
        resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))

    async def main() -> None:
        async with running_deputy(
            deputy_bin, tmp_path / "deputy.sock", cwd=tmp_path, preexec_fn=allow_cores
        ) as d:
            await d.hello()
            await d.ready()
            await d.conn.send("killed", int(sig))
            status = await d.wait()
            assert os.WIFSIGNALED(status)
            assert os.WTERMSIG(status) == sig
            assert not os.WCOREDUMP(status)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["deputy.sock"]

    trio.run(main)


@pytest.mark.parametrize(
    ("sig", "setup", "stopped_by"),
    [
        (signal.SIGSTOP, os.setpgrp, signal.SIGSTOP),
        (signal.SIGTSTP, os.setpgrp, signal.SIGTSTP),
        (signal.SIGTTIN, os.setpgrp, signal.SIGTTIN),
        # an orphaned process group: the kernel drops a default-action SIGTSTP
        (signal.SIGTSTP, os.setsid, signal.SIGSTOP),
    ],
)
def test_stop_and_continue(
    deputy_bin: Path,
    tmp_path: Path,
    sig: signal.Signals,
    setup: Callable[[], None],
    stopped_by: signal.Signals,
) -> None:
    async def main() -> None:
        async with running_deputy(deputy_bin, tmp_path / "deputy.sock", preexec_fn=setup) as d:
            await d.hello()
            await d.ready()
            await d.conn.send("stop", int(sig))
            status = await d.wait(os.WUNTRACED)
            assert os.WIFSTOPPED(status)
            assert os.WSTOPSIG(status) == stopped_by
            # the agent sends nothing for continue: the deputy forwards SIGCONT
            os.kill(d.pid, signal.SIGCONT)
            assert await d.recv() == ["signal", str(int(signal.SIGCONT))]
            status = await d.wait(os.WCONTINUED)
            assert os.WIFCONTINUED(status)
            # it catches the stop signal again
            again = sig if sig != signal.SIGSTOP else signal.SIGTSTP
            os.kill(d.pid, again)
            assert await d.recv() == ["signal", str(int(again))]
            await d.conn.send("killed", int(signal.SIGTERM))
            assert os.WTERMSIG(await d.wait()) == signal.SIGTERM

    trio.run(main)


def test_local_runs_the_program_here_unchanged(deputy_bin: Path, tmp_path: Path) -> None:
    """`local` PATH: the remote start failed; the program runs in the deputy's place."""
    script = tmp_path / "no-shebang"
    script.write_text('grep SigIgn /proc/$$/status; echo "$$ $0 $1"; exit 4\n')
    script.chmod(0o755)

    def ignore_int() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    async def main() -> None:
        r, w = os.pipe()
        async with running_deputy(
            deputy_bin,
            tmp_path / "deputy.sock",
            stdout=w,
            preexec_fn=ignore_int,
            argv=("the-program", "arg"),
        ) as d:
            os.close(w)
            await d.hello()
            # ENOEXEC: run by sh, as execvp(3) would
            await d.conn.send("local", str(script))
            assert await d.recv() is None  # the socket was close-on-exec
            status = await d.wait()
            assert os.WIFEXITED(status)
            assert os.WEXITSTATUS(status) == 4
            ignored, ran = _read_all(r).decode().splitlines()
            assert int(ignored.split()[1], 16) >> (signal.SIGINT - 1) & 1
            assert ran == f"{d.pid} {script} arg"

    trio.run(main)


def test_local_of_a_missing_program(deputy_bin: Path, tmp_path: Path) -> None:
    async def main() -> None:
        async with running_deputy(deputy_bin, tmp_path / "deputy.sock") as d:
            await d.hello()
            await d.conn.send("local", str(tmp_path / "missing"))
            status = await d.wait()
            assert os.WIFEXITED(status)
            assert os.WEXITSTATUS(status) == 127

    trio.run(main)


@pytest.mark.parametrize("after_ready", [False, True])
def test_agent_hangup_kills_the_deputy(deputy_bin: Path, tmp_path: Path, after_ready: bool) -> None:
    async def main() -> None:
        async with running_deputy(deputy_bin, tmp_path / "deputy.sock") as d:
            await d.hello()
            if after_ready:
                await d.ready()
            await d.conn.aclose()
            status = await d.wait()
            assert os.WIFSIGNALED(status)
            assert os.WTERMSIG(status) == signal.SIGKILL

    trio.run(main)


def test_no_agent(deputy_bin: Path, tmp_path: Path) -> None:
    sock = tmp_path / "nobody.sock"
    done = subprocess.run(
        [str(deputy_bin), "the-program"],
        env={**os.environ, "DUNIX_DEPUTY_SOCKET": str(sock)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 127
    assert done.stderr.decode() == f"dunix-deputy: no agent: {sock}: No such file or directory\n"


def test_listener_replaces_a_stale_socket_and_refuses_other_files(tmp_path: Path) -> None:
    async def handler(pid: int, conn: DeputyConnection) -> None:
        raise AssertionError("no deputy connects here")

    async def main() -> None:
        sock = tmp_path / "run" / "deputy.sock"
        for _ in range(2):  # the second bind finds the first one's file
            async with trio.open_nursery() as nursery:
                await nursery.start(DeputyListener(sock, handler).serve)
                assert stat.S_ISSOCK(sock.lstat().st_mode)
                assert stat.S_IMODE(sock.lstat().st_mode) == 0o666
                nursery.cancel_scope.cancel()
        plain = tmp_path / "plain"
        plain.write_text("keep me")
        with pytest.raises(ConfigError):
            await DeputyListener(plain, handler).serve()
        assert plain.read_text() == "keep me"

    trio.run(main)


def test_codec() -> None:
    assert encode_deputy_msg("signal", 15) == b"signal\x0015"
    assert decode_deputy_msg(b"signal\x0015") == ["signal", "15"]
    assert decode_deputy_msg(b"ready") == ["ready"]
    assert parse_deputy_event(["hello", "3"]) == DeputyHello(3)
    assert parse_deputy_event(["signal", "28"]) == DeputySignal(28)
    with pytest.raises(ValueError):
        encode_deputy_msg("a\0b")
    with pytest.raises(ValueError):
        encode_deputy_msg()
    with pytest.raises(ProtocolError):
        decode_deputy_msg(b"\xff")
    with pytest.raises(ProtocolError):
        decode_deputy_msg(b"")
    for bad in (["signal", "0"], ["signal", "x"], ["hello"], ["bye"]):
        with pytest.raises(ProtocolError):
            parse_deputy_event(bad)
