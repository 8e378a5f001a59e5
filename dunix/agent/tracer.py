"""The agent's handle on one ``dunix-tracer`` process (native/dunix-tracer.c).

The tracer runs one job's processes on this node under ptrace and reports what they do;
see docs/run.md for its command line and protocol. This module spawns it with the job's
fds at their final numbers and turns its packets into typed events.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import shutil
import signal
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from dunix.agent.storage import job_tmp_wrapper
from dunix.errors import DunixError, NoSuchProcess, TracerRefused

log = logging.getLogger("dunix.agent.tracer")

NATIVE = Path(__file__).resolve().parents[2] / "native" / "build"
TRACER = NATIVE / "dunix-tracer"
DEPUTY = NATIVE / "dunix-deputy"
#: where jobs exec the deputy from: they run as their user, who may not be able to reach the
#: checkout (a 0700 folder); a copy here is world-executable (a root-owned folder, 0755)
PUBLIC_DEPUTY = Path("/run/dunix/bin/dunix-deputy")
#: where the tracer is started from: a job with one /tmp on every host has the job's folder
#: bound over /tmp before the tracer is exec'd (storage.job_tmp_wrapper), which hides a
#: checkout under /tmp (what `mktemp -d` makes): the job never started
PUBLIC_TRACER = Path("/run/dunix/bin/dunix-tracer")


def public_copy(source: Path, dest: Path) -> Path:
    """``source`` (a native program) where every job user can exec it: a copy made once per
    build (same size and mtime), written under a temporary name and renamed, as agents may
    race here."""
    st = source.stat()
    try:
        have = dest.stat()
        if (have.st_size, int(have.st_mtime)) == (st.st_size, int(st.st_mtime)):
            return dest
    except FileNotFoundError:
        pass
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(dest.parent, 0o755)
        shutil.copyfile(source, tmp)
        os.chmod(tmp, 0o755)
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(tmp, dest)
    except OSError as e:  # not root (a test's agent): jobs run as us and reach the build
        log.info("%s stays at %s: %s", source.name, source, e)
        return source
    return dest


def public_deputy() -> Path:
    return public_copy(DEPUTY, PUBLIC_DEPUTY)


def public_tracer() -> Path:
    return public_copy(TRACER, PUBLIC_TRACER)


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


@dataclass(frozen=True)
class Released:
    """Answer to ``release``: no longer traced, left group-stopped (for CRIU)."""

    pid: int


@dataclass(frozen=True)
class Seized:
    """Answer to ``seize``: traced again; a stop the release made is undone."""

    pid: int


@dataclass(frozen=True)
class Deputized:
    """Answer to ``deputize``: the process execs the deputy in place (same PID, parent)."""

    pid: int
    node: str


@dataclass(frozen=True)
class CommandFailed:
    """``error PID REASON``: a release, seize or deputize of ``pid`` did not happen."""

    pid: int
    reason: str


TracerEvent = (
    Started
    | Forked
    | Execed
    | WentRemote
    | Unmovable
    | Exited
    | Stopped
    | Continued
    | Done
    | Released
    | Seized
    | Deputized
    | CommandFailed
)
Answer = Released | Seized | Deputized | CommandFailed


def parse_event(packet: bytes) -> TracerEvent:
    """One tracer packet (``\\0``-separated fields) as an event."""
    return _event(packet.rstrip(b"\0").decode("utf-8", "surrogateescape").split("\0"), packet)


def _event(fields: list[str], packet: bytes) -> TracerEvent:
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
        if kind == "released":
            return Released(int(args[0]))
        if kind == "seized":
            return Seized(int(args[0]))
        if kind == "deputized":
            return Deputized(int(args[0]), args[1])
        if kind == "error":
            return CommandFailed(int(args[0]), args[1])
    except (IndexError, ValueError):
        pass
    raise DunixError(f"tracer sent an unreadable message: {packet[:80]!r}")


def parse_events(packet: bytes) -> list[TracerEvent]:
    """One tracer packet as its events: a ``batch`` packet holds several messages, each
    as its field count and its fields (the tracer batches process-table events)."""
    if not packet.startswith(b"batch\0"):
        return [parse_event(packet)]
    fields = packet.decode("utf-8", "surrogateescape").split("\0")
    events, i = [], 1
    try:
        while i < len(fields):
            n = int(fields[i])
            if n < 1 or i + 1 + n > len(fields):
                raise ValueError(n)
            events.append(_event(fields[i + 1 : i + 1 + n], packet))
            i += 1 + n
    except ValueError:
        raise DunixError(f"tracer sent an unreadable batch: {packet[:80]!r}") from None
    return events


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
        str(public_tracer()),
        "--sock", str(SOCK_FD),
        "--uid", str(ctx.uid),
        "--gid", str(ctx.gid),
        "--groups", ",".join(map(str, ctx.groups)) or str(ctx.gid),
        "--umask", f"{ctx.umask:03o}",
        "--cwd", ctx.cwd,
        "--sigign", f"{ctx.sigign:x}",
        "--sigblock", f"{ctx.sigblock:x}",
        "--deputy", str(public_deputy()),
        "--mode", ctx.mode,
    ]  # fmt: skip
    if ctx.mode == "local":  # nothing ever leaves: no exec stops (docs/run.md, "Tracer")
        out.append("--home-only")
    for resource, soft, hard in ctx.rlimits:
        out += ["--rlimit", f"{resource}:{soft}:{hard}"]
    return [*out, *ctx.extra, "--", *argv]


class _Waiter:
    """One ``release``/``seize``/``deputize`` waiting for the tracer's answer."""

    def __init__(self, answer: type[Answer]) -> None:
        self.answer = answer
        self.done = trio.Event()
        self.reply: Answer | None = None


class Tracer:
    """A running tracer: ``events()`` yields what it reports, ``send`` pushes data to it.

    ``release``, ``seize`` and ``deputize`` return when the tracer answered; the answers
    arrive through ``next_event`` (which also returns them), so the job's event reader
    (``JobService.follow`` in the agent) must be running meanwhile.
    """

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self._sock = trio.socket.from_stdlib_socket(sock)
        self._pidfd = os.pidfd_open(pid)
        self.returncode: int | None = None
        self._waiters: dict[int, list[_Waiter]] = {}
        self._queued: collections.deque[TracerEvent] = collections.deque()

    @classmethod
    def spawn(
        cls, ctx: JobContext, argv: Sequence[str], fds: dict[int, int],
        warm: WarmTracer | None = None,
    ) -> Tracer:  # fmt: skip
        """Start a tracer whose first child gets ``fds`` ({target fd: our fd}) and ``argv``.

        With ``warm`` (a tracer started before: ``WarmTracer``), that one gets the job when
        it can take it (``WarmTracer.hand_over``); else, or when it cannot, a new one."""
        if warm is not None:
            started = warm.hand_over(ctx, argv, fds)
            if started is not None:
                return started
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
            # a job with one /tmp on every host: the tracer starts in its own mount namespace
            full = job_tmp_wrapper(ctx.env, tracer_argv(ctx, argv))
            pid = _spawn_tracer(full, ctx.env, actions)
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

    async def push_spill(self, at: int, slots: Sequence[tuple[str, int]]) -> None:
        """Peers for an auto job's execs once ``at`` of its processes run here (-1: off)."""
        flat: list[str | int] = [at]
        for node, count in slots:
            flat += [node, count]
        await self.send("spill", *flat)

    async def next_event(self) -> TracerEvent | None:
        """The next event; None once the tracer has closed its socket."""
        if self._queued:
            return self._queued.popleft()
        try:
            data = await self._sock.recv(65536)
        except ConnectionResetError:
            # the tracer exited with a message of ours unread (a table pushed to a guest
            # that execs nothing more): the kernel reports that once, *before* the events
            # still queued for us (its `started`, `exit`, `done`); losing them left a
            # remote exec waiting 15 s for its start
            return await self.next_event()
        except OSError as e:
            log.warning("tracer socket: %s", e)
            data = b""
        if not data:
            self._answer_all(CommandFailed(0, "the tracer is gone"))
            return None
        events = parse_events(data)
        for event in events:
            if isinstance(event, Released | Seized | Deputized | CommandFailed):
                self._answer(event)
        self._queued.extend(events[1:])
        return events[0]

    async def release(self, pid: int) -> None:
        """Stop tracing ``pid`` (only it) and leave it stopped, so CRIU can seize it.

        Until ``seize`` or ``deputize``, it must stay stopped: under the job's seccomp
        filter an exec without a tracer fails with ENOSYS."""
        await self._command(Released, "release", pid)

    async def seize(self, pid: int, *, cont: bool = False) -> None:
        """Trace ``pid`` again; if this tracer's release stopped it, it goes on.

        ``cont``: it goes on in any case (SIGCONT, its stop not reported): for a process
        CRIU restored from a released one, since CRIU restores a stopped task stopped."""
        if cont:
            await self._command(Seized, "seize", pid, "cont")
        else:
            await self._command(Seized, "seize", pid)

    async def deputize(self, pid: int, node: str) -> None:
        """Turn ``pid`` into the deputy of a process now running on ``node`` (x86_64).

        The tracer makes it exec the deputy in place (same PID, parent, fds); the deputy
        then says ``hello`` with a ``migrated`` flag (docs/run.md)."""
        await self._command(Deputized, "deputize", pid, node)

    async def hold_forks(self, on: bool) -> None:
        """New processes stay at their first stop (not run yet) until ``resume``,
        ``release`` or ``deputize`` (groundwork for placement at fork time)."""
        await self.send("hold", int(on))

    async def resume(self, pid: int) -> None:
        await self.send("resume", pid)

    async def _command(self, answer: type[Answer], kind: str, pid: int, *rest: str) -> Answer:
        waiter = _Waiter(answer)
        self._waiters.setdefault(pid, []).append(waiter)
        try:
            await self.send(kind, pid, *rest)
        except OSError as exc:
            self._waiters[pid].remove(waiter)
            raise TracerRefused(f"{kind} {pid}: tracer unreachable: {exc}") from None
        await waiter.done.wait()
        reply = waiter.reply
        if isinstance(reply, CommandFailed):
            if reply.reason in ("no such process traced", "exited") or "No such process" in (
                reply.reason
            ):
                raise NoSuchProcess(f"{kind} {pid}: {reply.reason}")
            raise TracerRefused(f"{kind} {pid}: {reply.reason}")
        assert reply is not None
        return reply

    def _answer(self, event: Answer) -> None:
        waiters = self._waiters.get(event.pid, [])
        for waiter in waiters:
            if isinstance(event, CommandFailed | waiter.answer):
                waiters.remove(waiter)
                waiter.reply = event
                waiter.done.set()
                break
        if not waiters:
            self._waiters.pop(event.pid, None)

    def _answer_all(self, failure: CommandFailed) -> None:
        for pid, waiters in self._waiters.items():
            for waiter in waiters:
                waiter.reply = CommandFailed(pid, failure.reason)
                waiter.done.set()
        self._waiters.clear()

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


class WarmTracer:
    """A tracer started before its job (``dunix-tracer --warm``), waiting on its socket for
    the command line, environment and fds that ``Tracer.spawn`` would have given it.

    A remote exec otherwise waits for the guest's tracer to be spawned and exec'd (~1 ms
    of its ~7 in docs/run.md, "Where a remote exec's time goes"); the agent keeps one
    ready and starts the next once it is used. A job whose tracer needs a wrapper (its own
    /tmp), or whose command line or fds do not fit in one packet, gets a new one.
    """

    MAX_PACKET = 60000  # the tracer reads up to 64 KiB
    MAX_FDS = 250  # SCM_MAX_FD is 253

    def __init__(self) -> None:
        if not TRACER.exists():
            raise DunixError(f"{TRACER} is missing: run `make setup` (it builds native/)")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        high = _park(theirs.fileno())
        try:
            tracer = str(public_tracer())
            argv = [tracer, "--sock", str(SOCK_FD), "--warm"]
            self.pid = _spawn_tracer(argv, {}, [(os.POSIX_SPAWN_DUP2, high, SOCK_FD)])
        except OSError as exc:
            ours.close()
            raise DunixError(f"cannot start the tracer: {exc.strerror}") from None
        finally:
            os.close(high)
            theirs.close()
        self._sock: socket.socket | None = ours

    def hand_over(self, ctx: JobContext, argv: Sequence[str], fds: dict[int, int]) -> Tracer | None:
        """This tracer runs the job, or None (it stays unused) when it cannot."""
        sock = self._sock
        full = tracer_argv(ctx, argv)
        if sock is None or job_tmp_wrapper(ctx.env, full) != full or len(fds) > self.MAX_FDS:
            return None
        if SOCK_FD in fds:
            return None
        targets = sorted(fds)
        env = [f"{k}={v}" for k, v in ctx.env.items()]
        data = packet("spawn", len(targets), *targets, len(env), *env, *full[1:])
        if len(data) > self.MAX_PACKET:
            return None
        try:
            socket.send_fds(sock, [data], [fds[t] for t in targets])
        except OSError as exc:  # it died meanwhile: a new one then
            log.info("warm tracer %d: %s", self.pid, exc)
            self.close()
            return None
        self._sock = None
        return Tracer(self.pid, sock)

    def close(self) -> None:
        """End an unused one (it waits in recvmsg: SIGKILL ends it at once) and reap it."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            with contextlib.suppress(ChildProcessError, ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)

    @property
    def used(self) -> bool:
        return self._sock is None


# valid_signals(): glibc's own 32 and 33 are not settable (Python warns); the tracer resets
# those itself with a raw rt_sigaction before the job's exec
_ALL_SIGNALS = tuple(
    int(s) for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP)
)


def _spawn_tracer(argv: list[str], env: Mapping[str, str], actions: list[Any]) -> int:
    """A tracer in a session of its own, every signal at its default (see Tracer.spawn)."""
    return os.posix_spawn(
        argv[0], argv, env, file_actions=actions, setsid=True,
        setsigdef=_ALL_SIGNALS, setsigmask=(),
    )  # fmt: skip


def _park(fd: int) -> int:
    """A close-on-exec duplicate of ``fd`` numbered above every fd a job may use."""
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, HIGH_FD)
