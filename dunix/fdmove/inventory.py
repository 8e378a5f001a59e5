"""What a process holds, read from /proc: its fds, its signal state, its rlimits.

The agent reads this for a deputy before sending `ready` (docs/run.md, "Deputy") and for
a process about to move, to decide whether it can run elsewhere and what to recreate
there. A process's fd table changes under our feet: an fd closed between the listing and
the reading of its details is skipped, and one that was reused for another file in between
is recognised by its inode and skipped as well.
"""

from __future__ import annotations

import os
import re
import resource
import stat
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, NamedTuple

from dunix.errors import AccessDenied, DunixError, NoSuchProcess

FdKind = Literal["pipe", "fifo", "file", "tty", "null", "device", "socket", "dir", "other"]

# (major, minor) of /dev/null, /dev/zero, /dev/random, /dev/urandom (devices.txt); by
# number, so a private /dev with other names still counts.
_NULL_LIKE = {(1, 3), (1, 5), (1, 8), (1, 9)}
# /dev/ttyN (4), /dev/tty, /dev/console, /dev/ptmx (5), /dev/pts/N (136-143).
_TTY_MAJORS = {4, 5, *range(136, 144)}

_O_PATH = 0o10000000


@dataclass(frozen=True)
class FdInfo:
    """One fd of a process as /proc/PID/fd and /proc/PID/fdinfo show it."""

    fd: int
    kind: FdKind
    #: what /proc/PID/fd/N links to: a path, or ``pipe:[INODE]``, ``socket:[INODE]`` ...
    target: str
    #: the file's path for files, fifos, dirs, ttys and devices; None otherwise
    path: str | None
    inode: int
    #: file offset (fdinfo ``pos``)
    pos: int
    #: open flags (fdinfo ``flags``, octal there): access mode, O_APPEND, O_NONBLOCK ...
    flags: int
    #: the file was unlinked (link count 0, e.g. a memfd or a deleted temporary)
    deleted: bool = False

    @property
    def readable(self) -> bool:
        return not self.flags & _O_PATH and self.flags & os.O_ACCMODE in (os.O_RDONLY, os.O_RDWR)

    @property
    def writable(self) -> bool:
        return not self.flags & _O_PATH and self.flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)

    @property
    def written_only(self) -> bool:
        """A regular file it only writes, without O_APPEND (`> log`): its offset is shared
        with every other writer of the description, so a process elsewhere gets it as a
        pipe relayed into this one (agent/remote.py, agent/homemove.py), not reopened."""
        return (
            self.kind == "file" and self.writable and not self.readable
            and not self.flags & os.O_APPEND
        )  # fmt: skip


@dataclass(frozen=True)
class SignalState:
    """Signal masks from /proc/PID/status: bit ``sig - 1`` stands for signal ``sig``."""

    ignored: int
    blocked: int

    @staticmethod
    def signals(mask: int) -> list[int]:
        return [sig for sig in range(1, 65) if mask >> (sig - 1) & 1]

    @classmethod
    def from_status(cls, fields: Mapping[str, str], pid: int) -> SignalState:
        """The masks in ``proc_status(pid)`` (when its other fields are wanted too)."""
        try:
            return cls(ignored=int(fields["SigIgn"], 16), blocked=int(fields["SigBlk"], 16))
        except (KeyError, ValueError) as err:
            raise DunixError(f"/proc/{pid}/status has no signal masks") from err


class Rlimit(NamedTuple):
    """One resource limit; ``resource.RLIM_INFINITY`` stands for unlimited."""

    resource: int
    soft: int
    hard: int


# The row names of /proc/PID/limits (lim_names in fs/proc/base.c).
_LIMIT_NAMES: dict[str, int] = {
    "Max cpu time": resource.RLIMIT_CPU,
    "Max file size": resource.RLIMIT_FSIZE,
    "Max data size": resource.RLIMIT_DATA,
    "Max stack size": resource.RLIMIT_STACK,
    "Max core file size": resource.RLIMIT_CORE,
    "Max resident set": resource.RLIMIT_RSS,
    "Max processes": resource.RLIMIT_NPROC,
    "Max open files": resource.RLIMIT_NOFILE,
    "Max locked memory": resource.RLIMIT_MEMLOCK,
    "Max address space": resource.RLIMIT_AS,
    "Max file locks": 10,  # RLIMIT_LOCKS, absent from the resource module
    "Max pending signals": resource.RLIMIT_SIGPENDING,
    "Max msgqueue size": resource.RLIMIT_MSGQUEUE,
    "Max nice priority": resource.RLIMIT_NICE,
    "Max realtime priority": resource.RLIMIT_RTPRIO,
    "Max realtime timeout": resource.RLIMIT_RTTIME,
}
_LIMIT_ROW = re.compile(r"^(\S.*?)\s{2,}(\S+)\s+(\S+)")


def _process_error(err: OSError, pid: int) -> DunixError:
    if isinstance(err, FileNotFoundError | ProcessLookupError):
        return NoSuchProcess(f"process {pid} is gone")
    if isinstance(err, PermissionError):
        return AccessDenied(f"cannot read /proc/{pid}: {err.strerror}")
    return DunixError(f"cannot read /proc/{pid}: {err.strerror}")


def _read_proc(pid: int, name: str) -> str:
    try:
        return _read_text(f"/proc/{pid}/{name}")
    except OSError as err:
        raise _process_error(err, pid) from err


def _read_text(path: str) -> str:
    """A /proc file's text by plain open, read and close: ``open()`` adds an fstat, a
    TCGETS, two lseeks and another fstat per file (9 syscalls instead of 3 or 4, and its
    buffered wrapper), and a remote exec's home reads eight such files."""
    return read_proc_bytes(path).decode("utf-8", "surrogateescape")


def read_proc_bytes(path: str) -> bytes:
    """A /proc file's bytes (see ``_read_text``): reads until EOF, as a short read says
    nothing there."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        parts = []
        while chunk := os.read(fd, 65536):
            parts.append(chunk)
    finally:
        os.close(fd)
    return b"".join(parts)


def _parse_fdinfo(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key] = value.strip()
    return fields


def _kind(st: os.stat_result, target: str) -> FdKind:
    mode = st.st_mode
    if stat.S_ISFIFO(mode):
        return "pipe" if target.startswith("pipe:[") else "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISREG(mode):
        return "other" if target.startswith("anon_inode:") else "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISCHR(mode):
        dev = (os.major(st.st_rdev), os.minor(st.st_rdev))
        if dev in _NULL_LIKE:
            return "null"
        if dev[0] in _TTY_MAJORS:
            return "tty"
        return "device"
    if stat.S_ISBLK(mode):
        return "device"
    return "other"


def _one_fd(pid: int, fd: int) -> FdInfo | None:
    """The details of one fd, or None when it was closed or reused while we looked."""
    link = f"/proc/{pid}/fd/{fd}"
    try:
        st = os.stat(link)
        target = os.readlink(link)
        info = _parse_fdinfo(_read_text(f"/proc/{pid}/fdinfo/{fd}"))
    except FileNotFoundError:
        return None
    # fdinfo has `ino` since Linux 5.14: a mismatch means the fd was reused in between.
    if "ino" in info and int(info["ino"]) != st.st_ino:
        return None
    kind = _kind(st, target)
    has_path = kind in ("fifo", "file", "dir", "tty", "null", "device")
    deleted = kind in ("file", "fifo", "dir") and st.st_nlink == 0
    path = target.removesuffix(" (deleted)") if has_path and deleted else target
    return FdInfo(
        fd=fd,
        kind=kind,
        target=target,
        path=path if has_path else None,
        inode=st.st_ino,
        pos=int(info.get("pos", "0")),
        flags=int(info.get("flags", "0"), 8),
        deleted=deleted,
    )


def inventory(pid: int, exclude: Collection[int] = ()) -> list[FdInfo]:
    """Every open fd of ``pid`` but those in ``exclude``, by fd number.

    Raises NoSuchProcess when the process is gone, AccessDenied without the rights
    (reading another user's fds needs PTRACE_MODE_READ, proc(5)).
    """
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError as err:
        raise _process_error(err, pid) from err
    fds: list[FdInfo] = []
    for fd in sorted(int(name) for name in names):
        if fd in exclude:
            continue
        try:
            info = _one_fd(pid, fd)
        except OSError as err:
            raise _process_error(err, pid) from err
        if info is not None:
            fds.append(info)
    return fds


def movable(fds: Iterable[FdInfo]) -> str | None:
    """Why a process holding ``fds`` cannot run on another node, or None if it can.

    Files, fifos and dirs are reached through the shared file tree, pipes and ttys are
    relayed, null-like devices exist everywhere. The wording follows the tracer's
    ``unmovable PID REASON`` (docs/run.md).
    """
    for f in fds:
        if f.kind == "socket":
            return f"holds a socket (fd {f.fd})"
        if f.kind == "device":
            return f"holds device {f.path} (fd {f.fd})"
        if f.deleted:
            return f"holds deleted file {f.path} (fd {f.fd})"
        if f.kind == "other":
            return f"holds {f.target} (fd {f.fd})"
    return None


def proc_status(pid: int) -> dict[str, str]:
    """The fields of /proc/PID/status, by name."""
    return _parse_fdinfo(_read_proc(pid, "status"))


def signal_state(pid: int) -> SignalState:
    """SigIgn and SigBlk of ``pid`` (the main thread's blocked mask)."""
    return SignalState.from_status(proc_status(pid), pid)


def ns_pids(pid: int) -> tuple[int, ...]:
    """The pids of ``pid`` in each PID namespace, ours first (``NSpid`` in /proc/PID/status).

    SO_PEERCRED gives a deputy's pid in the agent's namespace, while the tracer reports
    pids of the namespace it runs in; the last entry is the pid the process sees itself.
    """
    fields = _parse_fdinfo(_read_proc(pid, "status"))
    return tuple(int(p) for p in fields.get("NSpid", str(pid)).split())


def rlimits(pid: int) -> tuple[Rlimit, ...]:
    """The resource limits of ``pid`` from /proc/PID/limits, readable by anyone.

    prlimit(2) would need CAP_SYS_RESOURCE for another user's process, which the agent
    lacks on some machines (DESIGN.md, "Facts"). A text is parsed once: a job's execs
    mostly share one set, and the parse cost a remote exec ~60 us of the home's CPU (the
    read alone ~10).
    """
    return _parse_rlimits(_read_proc(pid, "limits"))


@lru_cache(maxsize=64)
def _parse_rlimits(text: str) -> tuple[Rlimit, ...]:
    limits: list[Rlimit] = []
    for line in text.splitlines()[1:]:
        m = _LIMIT_ROW.match(line)
        if m is None or m.group(1) not in _LIMIT_NAMES:
            continue
        soft, hard = (resource.RLIM_INFINITY if v == "unlimited" else int(v) for v in m.group(2, 3))
        limits.append(Rlimit(_LIMIT_NAMES[m.group(1)], soft, hard))
    return tuple(limits)


# -- readers blocked on a pipe (pull-mode relays, dunix/fdmove/streams.py) ----------------

#: what a reader blocked in poll, select or epoll on the pipe is taken to ask for: the
#: size of a default pipe buffer, as much as one read of a local pipe usually gets
POLL_WANT = 64 * 1024

# x86_64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl) -> (fd arg, count arg);
# a count of -1: an iovec array (args 1, 2) to sum
_READS = {0: (0, 2), 19: (0, -1), 295: (0, -1), 327: (0, -1), 40: (1, 3), 275: (0, 4),
          276: (0, 2), 326: (0, 4)}  # fmt: skip
_POLLS = {7, 271}  # poll, ppoll: struct pollfd array (arg 0), count (arg 1)
_SELECTS = {23, 270}  # select, pselect6: nfds (arg 0), readfds (arg 1)
_EPOLLS = {232, 281, 441}  # epoll_wait, epoll_pwait, epoll_pwait2: epfd (arg 0)
_POLLIN = 0x1 | 0x40  # POLLIN | POLLRDNORM (EPOLLIN is 0x1 too)


def _same_file(pid: int, fd: int, key: tuple[int, int]) -> bool:
    try:
        st = os.stat(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == key


def _memory(pid: int, address: int, size: int) -> bytes:
    if not address or size <= 0 or size > 1 << 20:
        return b""
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, size, address)
    finally:
        os.close(fd)


def _one_blocked_read(pid: int, tid: int, key: tuple[int, int]) -> int:
    """Bytes that thread ``tid`` of ``pid`` waits to read from the pipe ``key`` (0: none)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/syscall") as f:
            fields = f.read().split()
    except OSError:  # gone, or not ours to look at
        return 0
    if len(fields) < 7 or not fields[0].isdigit():  # "running", or "-1 ..." (not in a call)
        return 0
    nr, args = int(fields[0]), [int(a, 16) for a in fields[1:7]]
    try:
        if nr in _READS:
            fd_arg, count_arg = _READS[nr]
            if not _same_file(pid, args[fd_arg], key):
                return 0
            if count_arg >= 0:
                return args[count_arg]
            raw = _memory(pid, args[1], 16 * min(args[2], 1024))
            lengths = (raw[i + 8 : i + 16] for i in range(0, len(raw), 16))
            return sum(int.from_bytes(n, "little") for n in lengths)
        if nr in _POLLS:
            raw = _memory(pid, args[0], 8 * min(args[1], 4096))
            for i in range(0, len(raw) - 7, 8):
                fd = int.from_bytes(raw[i : i + 4], "little", signed=True)
                events = int.from_bytes(raw[i + 4 : i + 6], "little")
                if fd >= 0 and events & _POLLIN and _same_file(pid, fd, key):
                    return POLL_WANT
            return 0
        if nr in _SELECTS:
            nfds = min(args[0], 1 << 16)
            raw = _memory(pid, args[1], (nfds + 63) // 64 * 8)
            bits = int.from_bytes(raw, "little")
            for fd in range(nfds):
                if bits >> fd & 1 and _same_file(pid, fd, key):
                    return POLL_WANT
            return 0
        if nr in _EPOLLS:
            text = _read_proc(pid, f"fdinfo/{args[0]}")
            for m in re.finditer(r"^tfd:\s*(\d+)\s+events:\s*([0-9a-f]+)", text, re.M):
                if int(m[2], 16) & _POLLIN and _same_file(pid, int(m[1]), key):
                    return POLL_WANT
    except (OSError, DunixError):
        return 0
    return 0


def blocked_readers(pids: Iterable[int], key: tuple[int, int]) -> int:
    """The largest read that a thread of ``pids`` is blocked in on the pipe or FIFO whose
    ``(st_dev, st_ino)`` is ``key``: 0 if none waits for it.

    A pull-mode relay asks this before taking anything from the home pipe, so a process
    that merely inherited the read end takes nothing (docs/run.md, "fd forwarding").
    /proc/PID/syscall (proc(5)) names the call a sleeping thread is in and its arguments;
    it says "running" for a thread that runs or was just woken, so a read that our last
    write satisfied is never taken for a new one. read, readv, splice and their kin name
    the fd and the size; poll, select and epoll name a set of fds, read from the process's
    memory or its epoll fdinfo, and count as a want of ``POLL_WANT`` bytes. x86_64 only.
    """
    best = 0
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except (OSError, ValueError):
            continue
        for tid in tids:
            best = max(best, _one_blocked_read(pid, tid, key))
    return best
