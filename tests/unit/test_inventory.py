"""The /proc inventory and pidfd_getfd against real child processes."""

from __future__ import annotations

import errno
import os
import resource
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from dunix.errors import AccessDenied, NoSuchProcess
from dunix.fdmove.inventory import (
    FdInfo,
    SignalState,
    inventory,
    movable,
    ns_pids,
    rlimits,
    signal_state,
)
from dunix.fdmove.pidfd import FdCaptureFailed, pidfd_getfd, pidfd_open, translate_oserror


@pytest.fixture
def fds(tmp_path: Path) -> Iterator[dict[str, int]]:
    """One fd of each kind, open in this process (the child inherits them)."""
    with ExitStack() as stack:
        opened: dict[str, int] = {}

        def keep(name: str, fd: int) -> None:
            opened[name] = fd
            stack.callback(os.close, fd)

        r, w = os.pipe()
        keep("pipe_r", r)
        keep("pipe_w", w)
        data = tmp_path / "data"
        data.write_bytes(b"0123456789")
        keep("append", os.open(data, os.O_WRONLY | os.O_APPEND))
        os.lseek(opened["append"], 5, os.SEEK_SET)
        keep("null", os.open("/dev/null", os.O_RDWR))
        sock = socket.socket()
        keep("socket", sock.detach())
        keep("dir", os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY))
        master, slave = os.openpty()
        keep("pty_master", master)
        keep("tty", slave)
        yield opened


def _child(
    pass_fds: list[int], preexec_fn: Callable[[], None] | None = None
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["sleep", "1000"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        pass_fds=pass_fds,
        preexec_fn=preexec_fn,
    )


@pytest.fixture
def reap() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def test_inventory_kinds_directions_offsets(
    fds: dict[str, int], tmp_path: Path, reap: list[subprocess.Popen[bytes]]
) -> None:
    child = _child([fds[k] for k in fds if k != "pty_master"])
    reap.append(child)
    by_fd = {f.fd: f for f in inventory(child.pid)}

    stdin = by_fd[0]
    assert (stdin.kind, stdin.path) == ("null", "/dev/null")

    r, w = by_fd[fds["pipe_r"]], by_fd[fds["pipe_w"]]
    assert (r.kind, r.readable, r.writable) == ("pipe", True, False)
    assert (w.kind, w.readable, w.writable) == ("pipe", False, True)
    assert r.inode == w.inode == os.fstat(fds["pipe_r"]).st_ino
    assert r.target == f"pipe:[{r.inode}]"
    assert r.path is None

    f = by_fd[fds["append"]]
    assert (f.kind, f.path, f.pos) == ("file", str(tmp_path / "data"), 5)
    assert f.flags & os.O_APPEND
    assert (f.readable, f.writable, f.deleted) == (False, True, False)

    null = by_fd[fds["null"]]
    assert (null.kind, null.readable, null.writable) == ("null", True, True)
    assert by_fd[fds["socket"]].kind == "socket"
    assert by_fd[fds["dir"]].kind == "dir"
    tty = by_fd[fds["tty"]]
    assert tty.kind == "tty"
    assert tty.path == os.ttyname(fds["tty"])

    assert movable(by_fd.values()) == f"holds a socket (fd {fds['socket']})"
    assert movable(f for f in by_fd.values() if f.kind != "socket") is None
    assert [f.fd for f in inventory(child.pid, exclude={0, 1, 2})] == sorted(
        fds[k] for k in fds if k != "pty_master"
    )


def test_movable_reasons(tmp_path: Path, reap: list[subprocess.Popen[bytes]]) -> None:
    with ExitStack() as stack:
        full = os.open("/dev/full", os.O_WRONLY)
        stack.callback(os.close, full)
        gone = os.open(tmp_path / "gone", os.O_RDWR | os.O_CREAT)
        stack.callback(os.close, gone)
        os.unlink(tmp_path / "gone")
        efd = os.eventfd(0)
        stack.callback(os.close, efd)
        child = _child([full, gone, efd])
        reap.append(child)
    by_fd = {f.fd: f for f in inventory(child.pid)}

    assert movable([by_fd[full]]) == f"holds device /dev/full (fd {full})"
    assert by_fd[gone].deleted
    assert movable([by_fd[gone]]) == f"holds deleted file {tmp_path / 'gone'} (fd {gone})"
    assert by_fd[efd].kind == "other"
    assert movable([by_fd[efd]]) == f"holds anon_inode:[eventfd] (fd {efd})"


def test_signal_state_and_rlimits(reap: list[subprocess.Popen[bytes]]) -> None:
    def setup() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGRTMIN + 2})
        resource.setrlimit(resource.RLIMIT_NOFILE, (100, 200))

    child = _child([], preexec_fn=setup)
    reap.append(child)
    state = signal_state(child.pid)
    assert signal.SIGINT in SignalState.signals(state.ignored)
    assert SignalState.signals(state.blocked) == [signal.SIGUSR1, signal.SIGRTMIN + 2]

    assert ns_pids(child.pid)[0] == child.pid

    limits = {lim.resource: lim for lim in rlimits(child.pid)}
    assert (limits[resource.RLIMIT_NOFILE].soft, limits[resource.RLIMIT_NOFILE].hard) == (100, 200)
    assert limits[resource.RLIMIT_CPU].hard == resource.RLIM_INFINITY
    assert len(limits) == 16


def test_pidfd_getfd_duplicate_reaches_the_reader(reap: list[subprocess.Popen[bytes]]) -> None:
    r, w = os.pipe()
    # cat reads the pipe and also holds its write end, as a deputy holds a pipe end
    child = subprocess.Popen(["cat"], stdin=r, stdout=subprocess.PIPE, pass_fds=[w])
    reap.append(child)
    os.close(r)
    os.close(w)
    pidfd = pidfd_open(child.pid)
    try:
        dup = pidfd_getfd(pidfd, w)
        assert not os.get_inheritable(dup)
        os.write(dup, b"through the duplicate\n")
        os.close(dup)
        assert child.stdout is not None
        assert child.stdout.readline() == b"through the duplicate\n"

        with pytest.raises(FdCaptureFailed, match="Bad file descriptor"):
            pidfd_getfd(pidfd, 999)
    finally:
        os.close(pidfd)


def test_errors_translate(reap: list[subprocess.Popen[bytes]]) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    with pytest.raises(NoSuchProcess):
        pidfd_open(gone.pid)
    with pytest.raises(NoSuchProcess):
        inventory(gone.pid)
    with pytest.raises(NoSuchProcess):
        signal_state(gone.pid)

    # a pidfd whose process was reaped: ESRCH from pidfd_getfd itself
    child = _child([])
    pidfd = pidfd_open(child.pid)
    child.kill()
    child.wait()
    try:
        with pytest.raises(NoSuchProcess):
            pidfd_getfd(pidfd, 0)
    finally:
        os.close(pidfd)

    assert isinstance(translate_oserror(OSError(errno.EPERM, "x"), "t"), AccessDenied)
    assert isinstance(translate_oserror(OSError(errno.EMFILE, "x"), "t"), FdCaptureFailed)


def test_fdinfo_directions_of_access_modes() -> None:
    def info(flags: int) -> FdInfo:
        return FdInfo(fd=3, kind="file", target="/x", path="/x", inode=1, pos=0, flags=flags)

    assert (info(os.O_RDONLY).readable, info(os.O_RDONLY).writable) == (True, False)
    assert (info(os.O_RDWR).readable, info(os.O_RDWR).writable) == (True, True)
    assert (info(os.O_PATH).readable, info(os.O_PATH).writable) == (False, False)
