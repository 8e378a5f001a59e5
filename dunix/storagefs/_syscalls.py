"""The few *at system calls the os module does not offer in the form storagefs needs.

storagefs holds each file it serves as an ``O_PATH`` descriptor (as libfuse's
passthrough_ll does), so attribute changes act on that descriptor with ``AT_EMPTY_PATH``
rather than on a path that a rename could have changed meanwhile. Python's ``os`` has no
``AT_EMPTY_PATH`` form of chown or utimensat, and no renameat2 (flags NOREPLACE, EXCHANGE).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from pathlib import Path

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
MNT_DETACH = 2
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_fchownat = _libc.fchownat
_fchownat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_int]
_utimensat = _libc.utimensat
_utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]
_umount2 = _libc.umount2
_umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def renameat2(old_dir: int, old: bytes, new_dir: int, new: bytes, flags: int) -> None:
    """rename(2) with flags (RENAME_NOREPLACE = 1, RENAME_EXCHANGE = 2)."""
    _check(_renameat2(old_dir, old, new_dir, new, flags), "renameat2")


def chown_fd(fd: int, uid: int, gid: int) -> None:
    """Change the owner of the file an (``O_PATH``) descriptor holds; -1 keeps a value.

    Works on symlinks too: ``fchownat(fd, "", ..., AT_EMPTY_PATH)`` acts on the descriptor's
    own inode.
    """
    _check(
        _fchownat(fd, b"", uid & 0xFFFFFFFF, gid & 0xFFFFFFFF, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW),
        "fchownat",
    )


def utimens_fd(fd: int, atime_ns: int | None, mtime_ns: int | None) -> None:
    """Set the times of the file an (``O_PATH``) descriptor holds; None leaves one as it is."""

    def spec(ns: int | None) -> _Timespec:
        if ns is None:
            return _Timespec(0, UTIME_OMIT)
        return _Timespec(*divmod(ns, 1_000_000_000))

    times = (_Timespec * 2)(spec(atime_ns), spec(mtime_ns))
    _check(_utimensat(fd, b"", times, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW), "utimensat")


def detach_mount(path: str) -> None:
    """umount2(MNT_DETACH): drop a mount (a stale FUSE mount of a dead server included)."""
    _check(_umount2(os.fsencode(path), MNT_DETACH), "umount2")


def load_global(library: Path, without: str) -> ctypes.CDLL | None:
    """Load one of native/lib's libraries into the global scope (RTLD_GLOBAL: libfuse's
    symbols it interposes must be found before pyfuse3's); None, logging ``without`` (what
    storagefs does without it), when it is not built or does not load."""
    if not library.exists():
        return None
    try:
        return ctypes.CDLL(str(library), mode=os.RTLD_NOW | os.RTLD_GLOBAL)
    except OSError as exc:
        logging.getLogger("dunix.storagefs").warning("storagefs: %s: %s", without, exc)
        return None
