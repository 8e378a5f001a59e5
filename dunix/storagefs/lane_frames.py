"""The bulk lane's native frames (``native/lib/dunixlane.c``) as seen from Python.

A lane connection (bulk.py) starts as mutual TLS; the caller then sends :data:`KEYS` fresh
random bytes inside it, both ends close TLS and carry on over the same TCP connection with
AES-128-GCM frames (a 4-byte length, the ciphertext, a 16-byte tag; a key and IV per
direction, the nonce counting frames). Why, and the frame format: see the C file.

:class:`Frames` is one connection's pair of directions. Each call drops the GIL once (ctypes)
and raises :class:`FrameError` for a frame that failed authentication or a connection that
broke, :class:`EndOfLane` for a clean end before a frame. Without the built library
(``make -C native``), :func:`available` is False and the lane stays on TLS records.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Sequence
from pathlib import Path

from dunix.errors import DunixError

LIBRARY = Path(__file__).resolve().parents[2] / "native" / "build" / "libdunixlane.so"
KEY_LEN, IV_LEN = 16, 12
#: bytes the caller sends inside TLS: key and IV of its sending direction, then the owner's
KEYS = 2 * (KEY_LEN + IV_LEN)
#: a frame's bytes around its payload: the length before it, the tag after
HEAD, TAG = 4, 16

Buffer = bytes | bytearray | memoryview


class FrameError(DunixError):
    """A frame failed authentication, or the connection broke mid-frame."""


class EndOfLane(FrameError):
    """The peer closed the connection between frames."""


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_lib: ctypes.CDLL | None = None
_tried = False


def _library() -> ctypes.CDLL | None:
    global _lib, _tried
    if not _tried:
        _tried = True
        try:
            lib = ctypes.CDLL(str(LIBRARY))
        except OSError:
            return None
        lib.lane_new.restype = ctypes.c_void_p
        lib.lane_new.argtypes = [ctypes.c_char_p] * 4
        lib.lane_free.argtypes = [ctypes.c_void_p]
        lib.lane_free.restype = None
        lib.lane_send.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(_Iovec),
                                  ctypes.c_int, ctypes.c_int]  # fmt: skip
        lib.lane_send.restype = ctypes.c_int
        lib.lane_seal_send.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                       ctypes.c_size_t, ctypes.c_int]  # fmt: skip
        lib.lane_seal_send.restype = ctypes.c_int
        lib.lane_recv.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                  ctypes.c_size_t, ctypes.c_int]  # fmt: skip
        lib.lane_recv.restype = ctypes.c_long
        lib.lane_recv_len.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        lib.lane_recv_len.restype = ctypes.c_long
        _lib = lib
    return _lib


#: ``0`` in the agent's environment: the lane's connections stay on TLS records
FRAMES_ENV = "DUNIX_LANE_FRAMES"


def available() -> bool:
    """Whether the native frames can be used here (the library is built, not turned off)."""
    if os.environ.get(FRAMES_ENV, "1") in ("0", "off", "no"):
        return False
    return _library() is not None


def address(buf: bytearray | memoryview | mmap.mmap) -> tuple[int, object]:
    """(address, keeper) of a writable buffer; keep ``keeper`` while the address is used."""
    keeper = ctypes.c_char.from_buffer(buf)
    return ctypes.addressof(keeper), keeper


def _check(result: int, what: str) -> int:
    if result == -errno.ENODATA:
        raise EndOfLane(f"the peer closed the lane ({what})")
    if result == -errno.EBADMSG:
        raise FrameError(f"a frame failed authentication or is too long ({what})")
    if result < 0:
        raise FrameError(f"{what}: {os.strerror(-result)}")
    return result


class Frames:
    """One lane connection's frames: ``tx`` keys what this end sends, ``rx`` what it reads."""

    def __init__(self, tx: bytes, rx: bytes) -> None:
        lib = _library()
        if lib is None:
            raise FrameError("native/build/libdunixlane.so is not built")
        assert len(tx) == len(rx) == KEY_LEN + IV_LEN
        handle = lib.lane_new(tx[:KEY_LEN], tx[KEY_LEN:], rx[:KEY_LEN], rx[KEY_LEN:])
        if not handle:
            raise FrameError("no memory for a lane")
        self._lib = lib
        self._handle: int | None = handle

    @classmethod
    def pair(cls, keys: bytes, *, caller: bool) -> Frames:
        """This end's frames from the :data:`KEYS` bytes the caller sent."""
        mine, theirs = keys[: KEY_LEN + IV_LEN], keys[KEY_LEN + IV_LEN :]
        return cls(mine, theirs) if caller else cls(theirs, mine)

    def close(self) -> None:
        if self._handle is not None:
            self._lib.lane_free(self._handle)
            self._handle = None

    def _h(self) -> int:
        if self._handle is None:
            raise FrameError("the lane is closed")
        return self._handle

    def send(self, fd: int, pieces: Sequence[Buffer], timeout: float | None) -> None:
        """The pieces as one frame, encrypted a chunk at a time into the buffer written."""
        iov = (_Iovec * len(pieces))()
        keep: list[object] = []
        for i, piece in enumerate(pieces):
            if isinstance(piece, memoryview) and piece.readonly:
                obj = piece.obj
                piece = obj if isinstance(obj, bytes) and len(obj) == len(piece) else bytes(piece)
            if isinstance(piece, bytes):
                keep.append(piece)
                iov[i].base = ctypes.cast(ctypes.c_char_p(piece), ctypes.c_void_p).value
            else:
                addr, keeper = address(piece) if len(piece) else (0, None)
                keep.append(keeper)
                iov[i].base = addr
            iov[i].len = len(piece)
        _check(self._lib.lane_send(self._h(), fd, iov, len(pieces), _ms(timeout)), "send")

    def seal_send(self, fd: int, frame_at: int, length: int, timeout: float | None) -> None:
        """Seal in place and write the frame at address ``frame_at``: ``HEAD`` bytes of room,
        ``length`` bytes of payload, ``TAG`` bytes of room."""
        _check(self._lib.lane_seal_send(self._h(), fd, frame_at, length, _ms(timeout)), "send")

    def recv_at(self, fd: int, frame_at: int, cap: int, timeout: float | None) -> int:
        """Read one frame to address ``frame_at`` (``cap`` bytes there) and open it in place:
        the payload's length (it starts ``HEAD`` bytes in)."""
        return _check(self._lib.lane_recv(self._h(), fd, frame_at, cap, _ms(timeout)), "recv")

    def recv_len(self, fd: int, timeout: float | None) -> int:
        """The next frame's payload length (then :meth:`recv` into ``HEAD + length + TAG``
        bytes reads the rest): a buffer sized to what came, not to what may come."""
        return _check(self._lib.lane_recv_len(self._h(), fd, _ms(timeout)), "recv")

    def recv(self, fd: int, frame: bytearray, timeout: float | None) -> int:
        addr, keeper = address(frame)
        try:
            return self.recv_at(fd, addr, len(frame), timeout)
        finally:
            del keeper


def _ms(timeout: float | None) -> int:
    return -1 if timeout is None else max(int(timeout * 1000), 1)
