"""pidfds: take a copy of another process's file descriptor.

The agent duplicates a deputy's (or a process about to be checkpointed) fds with
``pidfd_getfd(2)`` (Linux 5.6): the copy shares the open file description, so offsets,
flags and pipe ends are the very same objects. It needs PTRACE_MODE_ATTACH_REALCREDS on
the target, which root has. OSError is translated into ``dunix.errors`` here and nowhere
else.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

from dunix.errors import AccessDenied, DunixError, FdCaptureFailed, NoSuchProcess

# pidfd_getfd is 438 in the generic table (include/uapi/asm-generic/unistd.h) and in the
# x86 and arm tables; alpha and mips offset their numbers.
_PIDFD_GETFD: dict[str, int] = {
    "x86_64": 438,
    "aarch64": 438,
    "arm64": 438,
    "armv7l": 438,
    "i686": 438,
    "riscv64": 438,
    "ppc64le": 438,
    "s390x": 438,
    "loongarch64": 438,
    "alpha": 548,
}

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def translate_oserror(err: OSError, what: str) -> DunixError:
    """The dunix error for an OSError met while reaching into another process."""
    if err.errno == errno.ESRCH:
        return NoSuchProcess(f"{what}: no such process")
    if err.errno in (errno.EPERM, errno.EACCES):
        return AccessDenied(f"{what}: {os.strerror(err.errno)}")
    return FdCaptureFailed(f"{what}: {os.strerror(err.errno or 0)}")


def pidfd_open(pid: int) -> int:
    """A pidfd for ``pid`` (close-on-exec)."""
    try:
        return os.pidfd_open(pid)
    except OSError as err:
        raise translate_oserror(err, f"pidfd_open({pid})") from err


def pidfd_getfd(pidfd: int, targetfd: int) -> int:
    """A duplicate, in this process, of fd ``targetfd`` of the process behind ``pidfd``.

    The kernel sets close-on-exec on the new fd (pidfd_getfd(2)). A closed ``targetfd``
    gives EBADF, reported as ``FdCaptureFailed``.
    """
    nr = _PIDFD_GETFD.get(platform.machine(), 438)
    fd = _syscall(ctypes.c_long(nr), ctypes.c_int(pidfd), ctypes.c_int(targetfd), ctypes.c_uint(0))
    if fd < 0:
        code = ctypes.get_errno()
        err = OSError(code, os.strerror(code))
        raise translate_oserror(err, f"pidfd_getfd(fd {targetfd})") from err
    return int(fd)
