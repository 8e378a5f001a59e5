"""The agent's handle on one ``dunix-tracer`` process (native/dunix-tracer.c).

The tracer runs one job's processes on this node under ptrace and reports what they do;
see docs/run.md for its command line and protocol. This module spawns it with the job's
fds at their final numbers and turns its packets into typed events.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from dunix.errors import DunixError

NATIVE = Path(__file__).resolve().parents[2] / "native" / "build"
TRACER = NATIVE / "dunix-tracer"
DEPUTY = NATIVE / "dunix-deputy"
SOCK_FD = 800  # where the tracer finds its socket (it marks it close-on-exec)
HIGH_FD = 801  # sources are parked from here while the child's fds are laid out


@dataclass(frozen=True)
class Started:
    pid: int


@dataclass(frozen=True)
class Forked:
    parent: int
    child: int


@dataclass(frozen=True)
class Execed:
    pid: int
    path: str


@dataclass(frozen=True)
class WentRemote:
    pid: int
    node: str
    path: str


@dataclass(frozen=True)
class Unmovable:
    pid: int
    reason: str


@dataclass(frozen=True)
class Exited:
    pid: int
    status: int


@dataclass(frozen=True)
class Stopped:
    pid: int
    signal: int


@dataclass(frozen=True)
class Continued:
    pid: int


@dataclass(frozen=True)
class Done:
    pass


TracerEvent = (
    Started | Forked | Execed | WentRemote | Unmovable | Exited | Stopped | Continued | Done
)


def parse_event(packet: bytes) -> TracerEvent:
    """One tracer packet (``\\0``-separated fields) as an event."""
    fields = packet.rstrip(b"\0").decode("utf-8", "surrogateescape").split("\0")
    kind, args = fields[0], fields[1:]
    try:
        if kind == "started":
            return Started(int(args[0]))
        if kind == "fork":
            return Forked(int(args[0]), int(args[1]))
        if kind == "exec":
            return Execed(int(args[0]), args[1])
        if kind == "remote":
            return WentRemote(int(args[0]), args[1], args[2])
        if kind == "unmovable":
            return Unmovable(int(args[0]), args[1])
        if kind == "exit":
            return Exited(int(args[0]), int(args[1]))
        if kind == "stopped":
            return Stopped(int(args[0]), int(args[1]))
        if kind == "continued":
            return Continued(int(args[0]))
        if kind == "done":
            return Done()
    except (IndexError, ValueError):
        pass
    raise DunixError(f"tracer sent an unreadable message: {packet[:80]!r}")


def packet(*fields: str | int) -> bytes:
    return b"\0".join(str(f).encode("utf-8", "surrogateescape") for f in fields)


@dataclass(frozen=True)
class JobContext:
    """Who the job's processes are and what exec keeps: applied by the tracer's child."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    umask: int
    cwd: str
    env: dict[str, str]
    sigign: int = 0
    sigblock: int = 0
    rlimits: tuple[tuple[int, int, int], ...] = ()
    mode: str = "auto"
    extra: tuple[str, ...] = field(default=())


def tracer_argv(ctx: JobContext, argv: Sequence[str]) -> list[str]:
    out = [
        str(TRACER),
        "--sock", str(SOCK_FD),
        "--uid", str(ctx.uid),
        "--gid", str(ctx.gid),
        "--groups", ",".join(map(str, ctx.groups)) or str(ctx.gid),
        "--umask", f"{ctx.umask:03o}",
        "--cwd", ctx.cwd,
        "--sigign", f"{ctx.sigign:x}",
        "--sigblock", f"{ctx.sigblock:x}",
        "--deputy", str(DEPUTY),
        "--mode", ctx.mode,
    ]  # fmt: skip
    for resource, soft, hard in ctx.rlimits:
        out += ["--rlimit", f"{resource}:{soft}:{hard}"]
    return [*out, *ctx.extra, "--", *argv]


class Tracer:
    """A running tracer: ``events()`` yields what it reports, ``send`` pushes data to it."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self._sock = trio.socket.from_stdlib_socket(sock)
        self._pidfd = os.pidfd_open(pid)
        self.returncode: int | None = None

    @classmethod
    def spawn(cls, ctx: JobContext, argv: Sequence[str], fds: dict[int, int]) -> Tracer:
        """Start a tracer whose first child gets ``fds`` ({target fd: our fd}) and ``argv``."""
        if not TRACER.exists():
            raise DunixError(f"{TRACER} is missing: run `make setup` (it builds native/)")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parked: list[int] = []
        try:
            actions = []
            for target, source in sorted(fds.items()):
                high = _park(source)
                parked.append(high)
                actions.append((os.POSIX_SPAWN_DUP2, high, target))
            high_sock = _park(theirs.fileno())
            parked.append(high_sock)
            actions.append((os.POSIX_SPAWN_DUP2, high_sock, SOCK_FD))
            # The agent ignores or catches signals of its own (Python ignores SIGPIPE, glibc
            # and trio hold some real-time ones): the job starts from defaults, then the
            # tracer applies the dispositions exec would have kept (--sigign).
            pid = os.posix_spawn(
                str(TRACER),
                tracer_argv(ctx, argv),
                ctx.env,
                file_actions=actions,
                setsid=True,
                setsigdef=_ALL_SIGNALS,
                setsigmask=(),
            )
        except OSError as exc:
            ours.close()
            raise DunixError(f"cannot start the tracer: {exc.strerror}") from None
        finally:
            for fd in parked:
                os.close(fd)
            theirs.close()
        return cls(pid, ours)

    async def send(self, *fields: str | int) -> None:
        await self._sock.send(packet(*fields))

    async def push_slots(self, slots: Sequence[tuple[str, int]]) -> None:
        flat: list[str | int] = []
        for node, count in slots:
            flat += [node, count]
        await self.send("slots", *flat)

    async def next_event(self) -> TracerEvent | None:
        """The next event; None once the tracer has closed its socket."""
        data = await self._sock.recv(65536)
        return parse_event(data) if data else None

    async def wait(self) -> int:
        """Reap the tracer (it exits after ``done``); its raw wait status."""
        if self.returncode is None:
            await trio.lowlevel.wait_readable(self._pidfd)
            _, status = os.waitpid(self.pid, 0)
            self.returncode = status
            os.close(self._pidfd)
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)  # PTRACE_O_EXITKILL takes the tracees too

    def close(self) -> None:
        self._sock.close()


_ALL_SIGNALS = tuple(s for s in range(1, signal.NSIG) if s not in (signal.SIGKILL, signal.SIGSTOP))


def _park(fd: int) -> int:
    """A close-on-exec duplicate of ``fd`` numbered above every fd a job may use."""
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, HIGH_FD)
