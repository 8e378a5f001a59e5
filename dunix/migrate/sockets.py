"""Connected stream sockets across a move: the connection stays at home, relayed.

A process that holds a TCP connection or a connected unix stream socket to something
outside the moved set keeps it: the home takes a duplicate of the socket with
pidfd_getfd before the dump and keeps the connection open there; on the target the
process gets one end of a new ``socketpair(AF_UNIX, SOCK_STREAM)`` in its place, whose
other end the target's agent relays to the home's duplicate (two streams, one per
direction, on the job link; ``dunix/fdmove/relay.py``). The peer sees one unbroken
connection; EOF and half-close travel as stream ends (``shutdown(SHUT_WR)``).

How CRIU is made to hand the new socket in (read from CRIU 4.2.1's source):

- a unix socket: ``open_unix_sk`` (criu/sk-unix.c) looks its ``socket:[INODE]`` up in
  ``inherit_fd`` first. Dumping a connected stream socket whose peer is outside the tree
  fails ("Can't dump half of stream unix connection") unless the socket's own inode is
  listed as ``--external unix[INODE]`` (``unix_sk_exception_lookup_id``);
- a TCP socket: CRIU's inet code has no ``inherit_fd`` lookup (criu/sk-inet.c), and an
  established connection needs ``--tcp-established`` (TCP repair, which would take the
  connection away from the home) or ``--tcp-close``, which dumps it without touching it
  (``dump_one_tcp`` returns early). The dump uses ``tcp_close``; before the restore the
  target rewrites that socket's ``FileEntry`` in ``files.img`` into a unix stream socket
  entry with the same file id and inode (:func:`rewrite_tcp_as_unix`), so the unix path
  above inherits the socketpair end. Nothing of the TCP state is restored.

Bytes in flight are neither lost nor doubled: CRIU peeks at a unix socket's queue
(``MSG_PEEK``, criu/sk-queue.c) and does not restore a queue into an inherited socket,
and with ``tcp_close`` it does not read a TCP queue at all; whatever the process had not
read stays in the home's socket, which the home relays to the target.

Limits (the process sees a unix socketpair end, not its original socket):
``getpeername``/``getsockname`` return an unnamed AF_UNIX address; TCP and IP socket
options (``TCP_NODELAY``, ``IP_TOS`` ...) fail with EOPNOTSUPP (checked), and the
options set before the move stay on the home socket (socket-level
ones too: ``SO_RCVTIMEO``, buffer sizes; only ``O_NONBLOCK`` is copied); ``SO_PEERCRED``
names the target's agent; out-of-band data and ``SCM_RIGHTS`` do not pass; UDP,
datagram and seqpacket sockets and listening sockets are refused. A unix socket's peer
must be in the host's network namespace: CRIU finds it with sock_diag, which lists one
namespace ("Unix socket N without peer M" otherwise).

Moving on (guest to guest, agent/migration.py): the process's socketpair end is dumped
as ``external unix[INODE]`` and the next target gives it a new socketpair by
``inherit_fd`` as above; the home re-points its two streams. What the home had relayed
to it and it had not read (its end's queue, which CRIU only peeks at and does not
restore into an inherited socket, and what was still on the way) is read back by the
source from a pidfd_getfd duplicate of its end once the home has ended the old stream
(the source's relay then writes the rest and shuts our end: EOF), sent as
``MigrateTail``, and written into the new socketpair before the target relays the home's
new stream (whose sender waits for the receiver's opening credit, so the connection's
later bytes stay queued at home meanwhile). The home's output relay into the connection
is opened shared, so the old stream's end during a move does not shut the connection
down; an end while no move is under way (the process's shutdown or exit) is passed on
as ``shutdown(SHUT_WR)`` (``migration.half_close``). Back home is refused: bytes relayed
to it unread cannot be put back into the connection's queue there.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Protocol

from dunix.migrate.images import join, rewrite, split

#: FileEntry.type values (images/fdinfo.proto, enum fd_types)
FD_INETSK = 4
FD_UNIXSK = 5
#: the kernel's TCP_ESTABLISHED, as CRIU stores a unix socket's state
TCP_ESTABLISHED = 1
#: UnixSkEntry.uflags bit (criu/sk-unix.c)
USK_CALLBACK = 1 << 2


@dataclass(frozen=True)
class RelayedSocket:
    """One socket of the moved process, relayed through its home."""

    fd: int  # its number in the process
    inode: int  # socket:[INODE]: CRIU's key
    tcp: bool  # TCP (rewritten in the images) rather than unix
    nonblock: bool  # O_NONBLOCK on the process's open file description


def classify(fd: int, dup: int, flags: int) -> RelayedSocket | str:
    """What to do with the process's socket ``fd``, given a duplicate ``dup`` of it and
    its file flags (fdinfo ``flags``): a plan, or why it cannot move."""
    sock = socket.socket(fileno=os.dup(dup))
    try:
        family, kind = sock.family, sock.type
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        try:
            sock.getpeername()
            connected = True
        except OSError:
            connected = False
        inode = os.fstat(dup).st_ino
    finally:
        sock.close()
    if listening:
        return f"fd {fd} is a listening socket"
    if kind != socket.SOCK_STREAM:
        return f"fd {fd} is a {kind.name} socket (only stream connections are relayed)"
    if family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
        return f"fd {fd} is a {family.name} socket"
    if not connected:
        return f"fd {fd} is a socket that is not connected"
    tcp = family != socket.AF_UNIX
    return RelayedSocket(fd, inode, tcp, bool(flags & os.O_NONBLOCK))


class _Relayed(Protocol):
    @property
    def inode(self) -> int: ...

    @property
    def tcp(self) -> bool: ...


def socket_holders(inodes: Collection[int], skip: int, proc: str = "/proc") -> dict[int, int]:
    """{inode: a pid other than ``skip`` holding ``socket:[inode]``} for the sockets of
    ``inodes`` held by another process too (a parent, a sibling): relaying such a
    socket would take that process's incoming bytes, so it is refused."""
    wanted = {f"socket:[{i}]": i for i in inodes}
    found: dict[int, int] = {}
    if not wanted:
        return found
    for name in os.listdir(proc):
        if not name.isdigit() or int(name) == skip:
            continue
        try:
            fds = os.listdir(f"{proc}/{name}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"{proc}/{name}/fd/{fd}")
            except OSError:
                continue
            inode = wanted.get(link)
            if inode is not None:
                found.setdefault(inode, int(name))
    return found


def dump_externals(sockets: Iterable[_Relayed]) -> tuple[str, ...]:
    """CRIU ``external`` keys that let the dump take the unix ones."""
    return tuple(f"unix[{s.inode}]" for s in sockets if not s.tcp)


def fd_flags(pid: int, fd: int) -> int:
    """The ``flags`` of /proc/PID/fdinfo/FD (octal): access mode and O_NONBLOCK."""
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
    return os.O_RDWR


def rewrite_tcp_as_unix(files_img: bytes, inodes: set[int]) -> tuple[bytes, dict[int, int]]:
    """``files.img`` with the TCP sockets of ``inodes`` turned into unix stream socket
    entries (same file id and inode, no peer), and {file id: inode} of those found."""
    from pycriu.images import pb  # generated by `make lib`; only agents need it

    head, bodies = split(files_img)
    found: dict[int, int] = {}
    for i, body in enumerate(bodies):
        entry = pb.file_entry()
        entry.ParseFromString(body)
        if entry.type != FD_INETSK or entry.isk.ino not in inodes:
            continue
        isk = entry.isk
        new = pb.file_entry(type=FD_UNIXSK, id=entry.id)
        usk = new.usk
        usk.id, usk.ino = isk.id, isk.ino
        usk.type, usk.state = socket.SOCK_STREAM, TCP_ESTABLISHED
        # USK_CALLBACK: an established socket without a peer would otherwise get a fake
        # peer to restore its queue into (add_fake_unix_queuers), which waits forever
        # for an inherited socket's second end; the flag's other use (a plugin opens
        # it) is not reached for an inherited socket (open_unix_sk)
        usk.flags, usk.uflags, usk.backlog, usk.peer = isk.flags, USK_CALLBACK, 0, 0
        usk.fown.CopyFrom(isk.fown)
        usk.opts.CopyFrom(isk.opts)
        usk.name = b""
        bodies[i] = new.SerializeToString()
        found[entry.id] = isk.ino
    return join(head, bodies), found


def rewrite_fdinfo(fdinfo_img: bytes, ids: Collection[int]) -> bytes:
    """An ``fdinfo-N.img`` whose fds of the rewritten file ``ids`` name the unix type
    (CRIU finds an fd's file by type and id, criu/files.c ``find_file_desc``)."""
    from pycriu.images import pb

    head, bodies = split(fdinfo_img)
    for i, body in enumerate(bodies):
        entry = pb.fdinfo_entry()
        entry.ParseFromString(body)
        if entry.type == FD_INETSK and entry.id in ids:
            entry.type = FD_UNIXSK
            bodies[i] = entry.SerializeToString()
    return join(head, bodies)


def rewrite_images(images_dir_fd: int, inodes: set[int]) -> None:
    """Turn the TCP sockets of ``inodes`` into unix ones in the folder's images, in place
    (``files.img`` and every ``fdinfo-*.img``)."""
    if not inodes:
        return
    found: dict[int, int] = {}

    def files(data: bytes) -> bytes:
        new, ids = rewrite_tcp_as_unix(data, inodes)
        found.update(ids)
        return new

    rewrite(images_dir_fd, "files.img", files)
    missing = inodes - set(found.values())
    if missing:
        from dunix.errors import MigrationFailed

        raise MigrationFailed(f"no TCP socket with inode {sorted(missing)} in the images")
    for name in os.listdir(f"/proc/self/fd/{images_dir_fd}"):
        if name.startswith("fdinfo-") and name.endswith(".img"):
            rewrite(images_dir_fd, name, lambda data: rewrite_fdinfo(data, found))
