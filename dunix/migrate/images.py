"""CRIU image files as bytes: split into entries, joined again, rewritten in place.

An image is a magic head (``IMG_COMMON`` and the image's own magic, or one magic) and
entries, each a little-endian u32 size and a protobuf body (criu/include/magic.h,
criu/protobuf.c). The targets of a move rewrite a few entries before the restore:
``sockets.py`` (a TCP socket becomes a unix one) and ``relayed_files.py`` (a relayed
file loses its offset, size and mode).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

#: CRIU's image magics (criu/include/magic.h): every image starts with IMG_COMMON
IMG_COMMON = 0x54564319


def split(image: bytes) -> tuple[bytes, list[bytes]]:
    """An image's magic head and its entries' bodies (each stored as u32 size + body)."""
    head = 8 if struct.unpack_from("<I", image)[0] == IMG_COMMON else 4
    bodies, pos = [], head
    while pos < len(image):
        (size,) = struct.unpack_from("<I", image, pos)
        bodies.append(image[pos + 4 : pos + 4 + size])
        pos += 4 + size
    return image[:head], bodies


def join(head: bytes, bodies: list[bytes]) -> bytes:
    return head + b"".join(struct.pack("<I", len(b)) + b for b in bodies)


def rewrite(images_dir_fd: int, name: str, change: Callable[[bytes], bytes]) -> None:
    """Image ``name`` of the folder replaced by ``change(its bytes)``, when that differs."""
    fd = os.open(name, os.O_RDWR | os.O_CLOEXEC, dir_fd=images_dir_fd)
    try:
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read()
        new = change(data)
        if new != data:
            os.ftruncate(fd, 0)
            os.pwrite(fd, new, 0)
    finally:
        os.close(fd)
