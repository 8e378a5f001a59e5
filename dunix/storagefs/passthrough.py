"""FUSE passthrough for files this host owns: their reads and writes never reach Python.

Kernel 6.9+ passes a read or write on a FUSE file opened with ``FOPEN_PASSTHROUGH`` straight
to a backing file the server registered (``FUSE_DEV_IOC_BACKING_OPEN`` gives a backing id;
Documentation/filesystems/fuse-passthrough.rst). libfuse 3.14 and pyfuse3 3.5 know nothing
of it; ``native/lib/fusepassthrough.c`` (loaded before pyfuse3, like libfuselocks) asks for
it in the INIT reply and puts the id into the open/create reply of a handle given here.

The kernel's rules (fs/fuse/iomode.c) shape the bookkeeping, per inode:

- every open of an inode that has a passthrough open must be passthrough too, with the same
  backing file (else the open fails with EIO), and a passthrough open while a plain
  (page-cached) open exists fails too: so an inode is either plain or passthrough while
  any of its files is open here, decided by its first open;
- the kernel looks the id up when the opener resumes, after the reply was written: an id
  is closed only when the last handle that was given it is released;
- ``FOPEN_KEEP_CACHE`` is refused together with passthrough (the C side drops it).

The backing file is opened read-write without ``O_APPEND`` (one file serves every open of
the inode; an appending open still appends: the kernel passes its IOCB_APPEND on). Only
files without replicas qualify: a replicated file's writes must reach the replicas before
they return, so they stay on the Python path. Anything refused (no library, a kernel
without passthrough, a backing file that cannot be opened read-write) falls back to the
Python path silently; the agent's log says once which path local files take.

The agent loads the library before pyfuse3 (dunix/agent/storage.py); a standalone
``python -m dunix.storagefs.fs`` gets it with ``LD_PRELOAD=native/build/libfusepassthrough.so``.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from dunix.storagefs._syscalls import load_global

log = logging.getLogger(__name__)

LIBRARY = Path(__file__).resolve().parents[2] / "native" / "build" / "libfusepassthrough.so"
_HOOKED, _OFFERED, _ASKED = 1, 2, 4
_DIO_MMAP = 16  # the INIT reply asked for FUSE_DIRECT_IO_ALLOW_MMAP (see shared_mmap_direct)

_library: ctypes.CDLL | None = None
_off: str | None = None  # why it was turned off (the agent's switch), None: it is not


def turn_off(reason: str) -> None:
    """Local files stay on the Python path in this process: :func:`preload` gives None."""
    global _off
    _off = reason


def preload() -> ctypes.CDLL | None:
    """Load the library before pyfuse3 is imported (its mount and replies are interposed).

    None when it is not built (``make -C native``), cannot load, or was turned off: local
    files then go through Python.
    """
    global _library
    if _off is not None:
        return None
    if _library is None:
        lib = load_global(LIBRARY, "no FUSE passthrough library")
        if lib is None:
            return None
        lib.dunix_pt_give.argtypes = [ctypes.c_uint64, ctypes.c_int32]
        lib.dunix_pt_give.restype = None
        lib.dunix_pt_nocaps.argtypes = [ctypes.c_uint64, ctypes.c_int]
        lib.dunix_pt_nocaps.restype = None
        _library = lib
    return _library


@dataclass
class _Backing:
    backing_id: int
    handles: set[int] = field(default_factory=set)


class Passthrough:
    """Which local open files pass through to their backing file (module docstring)."""

    def __init__(self, library: ctypes.CDLL | None = None) -> None:
        self._lib = library if library is not None else preload()
        self._disabled: str | None = None
        self._told = False
        self._backing: dict[int, _Backing] = {}  # inode -> its backing id, while open
        self._plain: dict[int, set[int]] = {}  # inode -> handles open the Python way
        self._inode_of: dict[int, int] = {}  # handle -> inode (either kind)

    def describe(self) -> str:
        """One line for the agent's log: which path local files take."""
        if self._lib is None and _off is not None:
            return f"local files go through Python (FUSE passthrough turned off: {_off})"
        if self._lib is None:
            return "local files go through Python (native/build/libfusepassthrough.so not built)"
        state = int(self._lib.dunix_pt_state())
        if not state & _HOOKED:
            return "local files go through Python (pyfuse3 was loaded before the library)"
        if not state & _OFFERED:
            return "local files go through Python (the kernel offers no FUSE passthrough)"
        if self._disabled is not None:
            return f"local files go through Python (FUSE passthrough refused: {self._disabled})"
        return "local files pass through to the disk in the kernel (FUSE passthrough)"

    def announce(self) -> None:
        """Log which path local files take, once the kernel took the INIT reply; when
        passthrough was asked for, the first backing id (or its refusal) says it instead."""
        if not self._ready():
            self._tell()

    def _tell(self) -> None:
        if not self._told:
            self._told = True
            log.info("storagefs: %s", self.describe())

    def shared_mmap_direct(self) -> bool:
        """Whether a file opened ``direct_io`` may still be mmapped ``MAP_SHARED``: the INIT
        reply asked for ``FUSE_DIRECT_IO_ALLOW_MMAP`` (kernel 6.6+), else such an mmap fails
        with ENODEV (fs/fuse/file.c ``fuse_file_mmap``). Peers' files are opened direct_io
        only then (fs.py ``open``)."""
        return self._lib is not None and bool(int(self._lib.dunix_pt_state()) & _DIO_MMAP)

    def _ready(self) -> bool:
        if self._disabled is not None or self._lib is None:
            return False
        return bool(int(self._lib.dunix_pt_state()) & _ASKED)

    def open(self, inode: int, fh: int, backing: str) -> bool:
        """Handle ``fh`` of ``inode`` is about to be replied: passthrough (True) or plain.

        Must be the last thing before the open/create handler returns: the library puts
        the id into the very next open reply carrying ``fh``. ``backing`` names the backing
        file (a /proc/self/fd link). A plain answer is recorded too (see the module rules).
        """
        entry = self._backing.get(inode)
        if entry is None:
            if not self._ready() or inode in self._plain:
                self._plain_open(inode, fh)
                return False
            backing_id = self._register(backing)
            if backing_id is None:
                self._plain_open(inode, fh)
                return False
            entry = self._backing[inode] = _Backing(backing_id)
            self._mark_nocaps(inode, backing)
        entry.handles.add(fh)
        self._inode_of[fh] = inode
        assert self._lib is not None
        self._lib.dunix_pt_give(fh, entry.backing_id)
        return True

    def direct(self, inode: int) -> bool:
        """Whether ``inode`` has files open passthrough now (its next open must be too)."""
        return inode in self._backing

    def plain(self, inode: int, fh: int) -> None:
        """Handle ``fh`` of ``inode`` stays on the Python path (a replicated file)."""
        if self._ready():
            self._plain_open(inode, fh)

    def released(self, fh: int) -> None:
        """The kernel released handle ``fh`` (its RELEASE request)."""
        inode = self._inode_of.pop(fh, None)
        if inode is None:
            return
        plain = self._plain.get(inode)
        if plain is not None and fh in plain:
            plain.discard(fh)
            if not plain:
                del self._plain[inode]
            return
        entry = self._backing.get(inode)
        if entry is None:
            return
        entry.handles.discard(fh)
        if not entry.handles:
            del self._backing[inode]
            assert self._lib is not None
            self._lib.dunix_pt_nocaps(inode, 0)
            err = int(self._lib.dunix_pt_close(entry.backing_id))
            if err < 0:
                log.warning("storagefs: backing id %d: close: %s", entry.backing_id,
                            os.strerror(-err))  # fmt: skip

    def xattrs_changed(self, inode: int) -> None:
        """An xattr of ``inode`` was set or removed here: the kernel asks us again."""
        if self._lib is not None and inode in self._backing:
            self._lib.dunix_pt_nocaps(inode, 0)

    def _mark_nocaps(self, inode: int, backing: str) -> None:
        """The kernel asks getxattr("security.capability") before every write (to drop file
        capabilities, as it drops set-id bits): the library answers for a file without."""
        assert self._lib is not None
        try:
            os.getxattr(backing, "security.capability")
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                self._lib.dunix_pt_nocaps(inode, 1)

    def _plain_open(self, inode: int, fh: int) -> None:
        if self._lib is None:
            return
        self._plain.setdefault(inode, set()).add(fh)
        self._inode_of[fh] = inode

    def _register(self, backing: str) -> int | None:
        try:
            fd = os.open(backing, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return None  # ETXTBSY, EROFS...: this inode stays plain while open
        try:
            assert self._lib is not None
            backing_id = int(self._lib.dunix_pt_open(fd))
        finally:
            os.close(fd)
        if backing_id < 0:
            # EPERM (INIT did not take it), ELOOP (backing fs stacked too deep), ...: the
            # same for every file of this mount
            self._disabled = os.strerror(-backing_id)
            self._tell()
            return None
        self._tell()
        return backing_id
