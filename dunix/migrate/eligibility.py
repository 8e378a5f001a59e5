"""What keeps a process from moving, found before anything is frozen, with the reason.

CRIU dumps the whole tree under the pid, so every process of it is checked. A reason is
something CRIU cannot carry or dunix cannot reconnect on another host:

- an io_uring instance: CRIU has no io_uring support (DESIGN.md);
- shared memory other than the program's own files: POSIX shm under /dev/shm, System V
  segments (``/SYSV...``), shared memfds and shared anonymous memory are shared with
  processes that stay behind, and would silently fork into two copies;
- a device fd other than the terminal and the null-like memory devices: the target's
  device is another device;
- a listening socket: its address belongs to this host (the edge layer serves daemons);
- a tracer other than the one the caller will detach: CRIU must PTRACE_SEIZE every task
  and a task has one tracer (``dunix-tracer`` must let go first).

and, for a chosen target, a CPU that lacks a feature of the origin's
(``cpufeatures.CpuFeatures.can_host``; CRIU's own ``cpuinfo check`` is in ``swrk``).

The parsers take text, so they are tested on canned /proc output; ``unmovable_reasons``
reads a live /proc (or a host's, e.g. ``/proc/INIT/root/proc``).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dunix.errors import MigrationFailed
from dunix.migrate.cpufeatures import CpuFeatures

#: (major, minor) of device fds that move: null, zero, random, urandom (mem, major 1),
#: /dev/tty and /dev/ptmx (major 5); /dev/pts/* are majors 136-143 (Documentation/
#: admin-guide/devices.txt).
MOVABLE_DEVICES: frozenset[tuple[int, int]] = frozenset(
    {(1, 3), (1, 5), (1, 8), (1, 9), (5, 0), (5, 2)}
)
PTS_MAJORS = range(136, 144)

TCP_LISTEN = "0A"  # include/net/tcp_states.h, TCP_LISTEN = 10
SO_ACCEPTCON = 0x10000  # __SO_ACCEPTCON in /proc/net/unix flags: a listening socket


@dataclass(frozen=True)
class Reason:
    #: io_uring, shared-memory, device, listening-socket, traced, cpu, gone
    kind: str
    detail: str
    pid: int | None = None

    def __str__(self) -> str:
        where = f"pid {self.pid}: " if self.pid is not None else ""
        return f"{where}{self.detail}"


def reasons_from_maps(text: str) -> list[Reason]:
    """Shared mappings that cannot move, from /proc/PID/maps text (one reason per object)."""
    found: dict[str, Reason] = {}
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or fields[1][3:4] != "s":
            continue
        path = fields[5].strip()
        if path.startswith("/dev/shm/"):
            found[path] = Reason("shared-memory", f"maps POSIX shared memory {path}")
        elif path.startswith("/SYSV"):
            found[path] = Reason("shared-memory", f"maps System V shared memory {path}")
        elif path.startswith("/memfd:"):
            found[path] = Reason("shared-memory", f"maps a shared memfd {path}")
        elif path.startswith("/dev/zero") or path == "[anon_shmem]":
            found[path] = Reason("shared-memory", "maps shared anonymous memory")
        elif "io_uring" in path:
            found[path] = Reason("io_uring", "maps an io_uring ring (CRIU cannot dump io_uring)")
        elif path.startswith("/dev/"):
            found[path] = Reason("device", f"maps the device {path}")
    return list(found.values())


def reason_for_fd(fd: int, link: str, mode: int | None, rdev: int | None) -> Reason | None:
    """Why fd ``fd`` (readlink ``link``; ``mode``/``rdev`` from stat of it) cannot move."""
    if link == "anon_inode:[io_uring]":
        return Reason("io_uring", f"fd {fd} is an io_uring (CRIU cannot dump io_uring)")
    if mode is not None and rdev is not None and (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)):
        dev = (os.major(rdev), os.minor(rdev))
        if dev in MOVABLE_DEVICES or (stat.S_ISCHR(mode) and dev[0] in PTS_MAJORS):
            return None
        return Reason("device", f"fd {fd} is the device {link} ({dev[0]}:{dev[1]})")
    return None


def listening_inodes(tcp_tables: Iterable[str], unix_table: str) -> set[int]:
    """Socket inodes in LISTEN state, from /proc/PID/net/tcp{,6} and .../net/unix text."""
    inodes: set[int] = set()
    for table in tcp_tables:
        for line in table.splitlines()[1:]:
            fields = line.split()
            if len(fields) > 9 and fields[3] == TCP_LISTEN:
                inodes.add(int(fields[9]))
    for line in unix_table.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 6 and int(fields[3], 16) & SO_ACCEPTCON:
            inodes.add(int(fields[6]))
    return inodes


def tracer_of(status: str) -> int:
    for line in status.splitlines():
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    return 0


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def tree(pid: int, proc: Path = Path("/proc")) -> Iterator[int]:
    """``pid`` and its descendants (children of every thread), parents first."""
    todo = [pid]
    while todo:
        current = todo.pop(0)
        yield current
        try:
            tasks = list((proc / str(current) / "task").iterdir())
        except FileNotFoundError:
            continue
        for task in tasks:
            todo += [int(c) for c in _read(task / "children").split()]


def process_reasons(
    pid: int, proc: Path = Path("/proc"), allowed_tracers: Collection[int] = ()
) -> list[Reason]:
    """The reasons one process (not its children) cannot move."""
    base = proc / str(pid)
    status = _read(base / "status")
    if not status:
        return [Reason("gone", "the process is gone", pid)]
    found: list[Reason] = []
    tracer = tracer_of(status)
    if tracer and tracer not in allowed_tracers:
        found.append(Reason("traced", f"is traced by pid {tracer}"))
    found += reasons_from_maps(_read(base / "maps"))
    listening: set[int] | None = None
    try:
        fds = sorted(int(name) for name in os.listdir(base / "fd"))
    except FileNotFoundError:
        fds = []
    for fd in fds:
        try:
            link = os.readlink(base / "fd" / str(fd))
        except FileNotFoundError:
            continue
        if link.startswith("socket:["):
            if listening is None:
                net = base / "net"
                tcp = [_read(net / "tcp"), _read(net / "tcp6")]
                listening = listening_inodes(tcp, _read(net / "unix"))
            if int(link[8:-1]) in listening:
                found.append(Reason("listening-socket", f"fd {fd} is a listening socket"))
            continue
        mode = rdev = None
        if link.startswith("/dev/"):
            try:
                st = os.stat(base / "fd" / str(fd))
                mode, rdev = st.st_mode, st.st_rdev
            except OSError:
                pass
        reason = reason_for_fd(fd, link, mode, rdev)
        if reason is not None:
            found.append(reason)
    return [Reason(r.kind, r.detail, pid) for r in found]


def unmovable_reasons(
    pid: int, proc: Path = Path("/proc"), allowed_tracers: Collection[int] = ()
) -> list[Reason]:
    """Every reason the tree under ``pid`` cannot move; empty when it may.

    ``allowed_tracers``: tracer pids the caller detaches before the dump (the job's
    ``dunix-tracer``). Racy by nature (the process runs on): CRIU still has the last word.
    """
    found: list[Reason] = []
    for member in tree(pid, proc):
        found += process_reasons(member, proc, allowed_tracers)
    return found


def cpu_reason(origin: CpuFeatures, target: CpuFeatures, target_name: str) -> Reason | None:
    """Why a process started on a CPU like ``origin`` may not run on ``target``."""
    if target.can_host(origin):
        return None
    if target.level == 0 and target.flags == 0:  # a member heard of, but not its load yet
        return Reason("cpu", f"{target_name}'s CPU features are not known here yet (no load "
                      "report from it so far): try again in a second")  # fmt: skip
    missing = sorted(set(origin.names()) - set(target.names()))
    detail = f"{target_name} lacks CPU features " + (
        ", ".join(missing) if missing else f"(level {target.level} < {origin.level})"
    )
    return Reason("cpu", detail)


def require_movable(
    pid: int,
    *,
    proc: Path = Path("/proc"),
    allowed_tracers: Collection[int] = (),
    origin: CpuFeatures | None = None,
    target: CpuFeatures | None = None,
    target_name: str = "the target",
) -> None:
    """Raise ``MigrationFailed`` naming every reason the tree under ``pid`` cannot move."""
    reasons = unmovable_reasons(pid, proc, allowed_tracers)
    if origin is not None and target is not None:
        cpu = cpu_reason(origin, target, target_name)
        if cpu is not None:
            reasons.append(cpu)
    if reasons:
        raise MigrationFailed("cannot move: " + "; ".join(str(r) for r in reasons))
