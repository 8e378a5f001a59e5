"""Open a file with another user's rights, from a thread of a root daemon.

A guest's files are reopened on the peer by path (DESIGN.md, "Fds across the move"). The
agent runs as root, but the open must be checked as the job's user, or a path that names
a different, protected file on the peer would be opened for them. The file-system ids
(fsuid, fsgid) and the supplementary groups are per thread in the kernel; glibc's wrappers
change them for every thread of the process (its setxid broadcast, nptl/nptl_setxid.c),
so the raw system calls are made in a short-lived thread of our own, which is then ended.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Sequence

from dunix.errors import AccessDenied, DunixError

_libc = ctypes.CDLL(None, use_errno=True)
# x86_64 and aarch64 numbers (asm/unistd.h)
_NR = {
    "x86_64": {"setfsuid": 122, "setfsgid": 123, "setgroups": 116},
    "aarch64": {"setfsuid": 151, "setfsgid": 152, "setgroups": 159},
}[os.uname().machine]


def _syscall(name: str, *args: int | ctypes.Array[ctypes.c_uint]) -> int:
    return int(_libc.syscall(_NR[name], *args))


def open_as(
    uid: int, gid: int, groups: Sequence[int], path: str, flags: int, mode: int = 0o666
) -> int:
    """``os.open(path, flags)`` checked as ``uid``/``gid``/``groups``; the fd is ours."""
    result: list[int | OSError] = []

    def worker() -> None:
        array = (ctypes.c_uint * max(1, len(groups)))(*groups)
        _syscall("setgroups", len(groups), array)
        _syscall("setfsgid", gid)
        _syscall("setfsuid", uid)
        try:
            result.append(os.open(path, flags, mode))
        except OSError as exc:
            result.append(exc)
        # the thread ends here, and its ids with it

    thread = threading.Thread(target=worker, name=f"open-as-{uid}")
    thread.start()
    thread.join()
    outcome = result[0] if result else DunixError(f"cannot open {path}")
    if isinstance(outcome, PermissionError):
        raise AccessDenied(f"uid {uid} may not open {path}") from outcome
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome
