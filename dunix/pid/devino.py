"""Structured device and inode numbers for storagefs.

Every file in storagefs has one owning host. ``cp -a``, ``tar`` and ``find -samefile``
decide "same file" by the pair (st_dev, st_ino), so that pair must be unique cluster-wide
and stable for the life of the file. The owner's node id goes into both::

    st_dev = makedev(DEV_MAJOR, node_id)          what `dunix fs where` reports
    st_ino = node_id << LOCAL_BITS | local        what stat(2) on the mount shows

Why the inode carries the node id too: FUSE cannot set st_dev per file. The kernel fills
``stat.st_dev`` from the mount's superblock (``generic_fillattr`` takes ``inode->i_sb->s_dev``
in fs/stat.c; fuse_getattr never looks at a device from the server), so every file under one
mount shows the same st_dev. Uniqueness across owners therefore has to live in st_ino, and
the per-owner device number is what storagefs reports through its own interfaces.

``local`` (53 bits) is stable and unique per owner. It is the backing file's own inode
number when that is below ``2**52`` (ext4 and xfs numbers in practice; hard links then share
it for free), otherwise a number from a counter persisted in the owner's metadata store,
tagged with bit 52 so the two kinds never collide. Bit 63 stays clear so a signed 64-bit
reader (SQLite, Java, some archivers) sees a positive number.

Node id 0 is "no node": it owns the inodes of the tree's merged root (FUSE's root inode is 1).
Nothing here does IO.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from dunix.errors import ConfigError
from dunix.pid.gpid import MAX_NODE_ID, NODE_BITS

LOCAL_BITS = 53
LOCAL_MASK = (1 << LOCAL_BITS) - 1
#: tag of a counter-allocated local number (backing inode too large to use directly)
ALLOCATED_FLAG = 1 << (LOCAL_BITS - 1)
#: largest backing inode number used as it is
MAX_DIRECT_INO = ALLOCATED_FLAG - 1
MAX_ALLOCATED = ALLOCATED_FLAG - 1
#: major number of storagefs device ids: from the "local/experimental use" block 240..254
#: of Documentation/admin-guide/devices.txt, so it is no real driver's
DEV_MAJOR = 242
ROOT_INO = 1

assert NODE_BITS + LOCAL_BITS == 63


@dataclass(frozen=True, order=True)
class DevIno:
    """The owner and owner-local number of one storagefs file."""

    node_id: int
    local: int

    @property
    def ino(self) -> int:
        return make_ino(self.node_id, self.local)

    @property
    def dev(self) -> int:
        return make_dev(self.node_id)


def make_ino(node_id: int, local: int) -> int:
    """The cluster-wide inode number of ``local`` on owner ``node_id``."""
    if not 0 <= node_id <= MAX_NODE_ID:
        raise ConfigError(f"node id {node_id} outside 0..{MAX_NODE_ID}")
    if not 1 <= local <= LOCAL_MASK:
        raise ConfigError(f"local inode number {local} outside 1..{LOCAL_MASK}")
    return node_id << LOCAL_BITS | local


def split_ino(ino: int) -> DevIno:
    """The owner and owner-local number of a storagefs inode number."""
    if not 0 < ino < 1 << 63 or ino & LOCAL_MASK == 0:
        raise ConfigError(f"{ino} is not a storagefs inode number")
    return DevIno(ino >> LOCAL_BITS, ino & LOCAL_MASK)


def make_dev(node_id: int) -> int:
    """The st_dev that names owner ``node_id``."""
    if not 0 <= node_id <= MAX_NODE_ID:
        raise ConfigError(f"node id {node_id} outside 0..{MAX_NODE_ID}")
    return os.makedev(DEV_MAJOR, node_id)


def dev_node(dev: int) -> int:
    """The owner node id a storagefs st_dev names."""
    if os.major(dev) != DEV_MAJOR or os.minor(dev) > MAX_NODE_ID:
        raise ConfigError(f"device {os.major(dev)}:{os.minor(dev)} is not a storagefs owner")
    return os.minor(dev)


def direct_local(backing_ino: int) -> int | None:
    """The local number of a backing inode used as it is, or None if it needs a counter."""
    if 1 <= backing_ino <= MAX_DIRECT_INO:
        return backing_ino
    return None


def allocated_local(counter: int) -> int:
    """The local number for the ``counter``-th allocated inode (counter from 1)."""
    if not 1 <= counter <= MAX_ALLOCATED:
        raise ConfigError(f"inode counter {counter} outside 1..{MAX_ALLOCATED}")
    return ALLOCATED_FLAG | counter


def is_allocated(local: int) -> bool:
    """Whether a local number came from the counter rather than the backing inode."""
    return bool(local & ALLOCATED_FLAG)
