"""Messages of `dunix migrate`: between a client and an agent, and between agents.

Client ⇄ any agent (control socket): ``MigrateRequest`` → ``MigrateReply`` (or an
``ErrorReply``, ``MigrationFailed`` with the reason). An agent that is not the process's
home asks the home with ``MigrateQuery`` → ``MigrateAnswer`` (peer links, by query number).

The home (where the deputy is) orders the move from the node that runs the process:
``MigrateOrder`` → ``MigrateDone`` (on the job links, by move id). The source then talks
to the target, also on the job links, in this order::

    source                                  target
    MigratePrepare (before freezing)  ───▶  MigrateStatus(step="ready") | error
    (dump: the process is frozen)
    MigrateImage* (every image file)  ───▶
    MigrateRestore                    ───▶  MigrateStatus(step="restored", pid, streams)
    (source killed, or resumed on error)
    MigrateAbort (on any failure)     ───▶  kills what a late restore left

``streams`` maps each relayed pipe's stream id on the source↔home link to the new one the
target opened on its link with the home; the home re-points its relays with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from dunix.wire._codec import message


@message
@dataclass(frozen=True)
class MigrateRequest:
    gpid: int
    node: str  # a node name, or "home"


@message
@dataclass(frozen=True)
class MigratePhase:
    name: str  # freeze, dump, send, restore, repoint ...
    ms: float  # when it ended, from the start of the move


@message
@dataclass(frozen=True)
class MigrateReply:
    gpid: int
    source: str
    target: str
    pid: int  # kernel pid on the target (the same as on the source: CRIU keeps it)
    phases: tuple[MigratePhase, ...]
    freeze_ms: float  # start of the dump to the process frozen
    downtime_ms: float  # frozen to running on the target
    total_ms: float
    image_bytes: int
    moves: int  # how often this process has moved, this move included


@message
@dataclass(frozen=True)
class MigrateQuery:
    query: int
    gpid: int
    node: str
    uid: int  # -1: an administrator asks


@message
@dataclass(frozen=True)
class MigrateAnswer:
    query: int
    reply: MigrateReply | None
    error_kind: str  # "" when moved
    error: str


@message
@dataclass(frozen=True)
class MigrateOrder:
    """Home → the node that runs the process: move it to ``target``."""

    move: str
    job: str
    home_pid: int
    target: str
    origin_flags: int  # the CPU features of the process's origin (its home)
    origin_level: int


@message
@dataclass(frozen=True)
class MigrateDone:
    move: str
    reply: MigrateReply | None
    streams: tuple[tuple[int, int], ...]  # (stream on the source link, on the target link)
    error_kind: str
    error: str


@message
@dataclass(frozen=True)
class MigratePipe:
    """A pipe end of the moved process that the source relays to the home."""

    inode: int  # pipe:[INODE] on the source: CRIU's inherit_fd key
    writable: bool  # the process writes it (output, relayed towards the home)
    stream: int  # its stream id on the source↔home link
    #: CRIU's inherit_fd key when it is not ``pipe:[INODE]``: a regular file the process
    #: only writes (``file[MNT:INODE]``, dumped as external), relayed home like a pipe so
    #: that every writer keeps sharing its one offset (agent/homemove.py)
    key: str = ""


@message
@dataclass(frozen=True)
class MigrateSocket:
    """A connected stream socket of a process moved from home: the connection stays at
    home, relayed both ways to a socketpair on the target (dunix/migrate/sockets.py)."""

    inode: int  # socket:[INODE] on the home: CRIU's inherit_fd key
    tcp: bool  # a TCP socket, whose image entry the target rewrites as a unix one
    nonblock: bool  # O_NONBLOCK on the process's file description
    out_stream: int  # index for the process → home direction (as MigratePipe.stream)
    in_stream: int  # index for the home → process direction


@message
@dataclass(frozen=True)
class MigrateLazy:
    """Post-copy (dunix/migrate/lazy.py): the target's lazy-pages daemon connects to
    ``port`` at the source's address (from membership) with TLS, trusting only ``cert``
    and showing it with ``key`` (made for this move, sent only over the agents'
    mutual-TLS link)."""

    port: int
    cert: bytes
    key: bytes


@message
@dataclass(frozen=True)
class MigratePrepare:
    move: str
    job: str
    home: str
    home_pid: int
    gpid: int
    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...]
    mode: str
    cmd: str
    origin_flags: int
    origin_level: int
    pipes: tuple[MigratePipe, ...]
    moves: int
    #: CRIU ``file[MNT:INODE]`` keys of null devices on mounts the source's host does not
    #: show (a `dunix run` client's /dev/null): dumped as external, the target inherits
    #: its own /dev/null for each (agent/homemove.py)
    nulls: tuple[str, ...] = ()
    #: connected stream sockets relayed through the home (moves from home only)
    sockets: tuple[MigrateSocket, ...] = ()
    #: post-copy: where the source's page server will listen, and its one-move key
    lazy: MigrateLazy | None = None
    #: the job's shared /tmp (agent/storage.py) as a path under the storagefs mount, when
    #: the process runs with it: the target's criu restores with that folder bound on /tmp
    tmp: str = ""


@message
@dataclass(frozen=True)
class MigrateImage:
    move: str
    name: str
    offset: int
    data: bytes


@message
@dataclass(frozen=True)
class MigrateRestore:
    move: str
    files: int  # how many image files were sent
    nbytes: int


@message
@dataclass(frozen=True)
class MigrateStatus:
    """Target → source: a step done (``ready``, ``restored``) or refused (error set)."""

    move: str
    step: str
    pid: int
    streams: tuple[tuple[int, int], ...]
    error_kind: str
    error: str


@message
@dataclass(frozen=True)
class MigrateAbort:
    move: str
    reason: str


@message
@dataclass(frozen=True)
class MigrateLost:
    """Target → home: a post-copy move lost the process (its pages stopped coming from
    the source); the target kills it, and its exit (SIGKILL) follows."""

    job: str
    home_pid: int
    reason: str


@message
@dataclass(frozen=True)
class MigrateTail:
    """Source → target, after a guest holding a relayed socket moved: the bytes its home
    had relayed to it that it had not read (its socketpair end's queue and what was still
    on the way, which CRIU does not restore into an inherited socket), in order; the
    target writes them into the new socketpair before it relays the home's stream again.
    ``last`` ends them (dunix/migrate/sockets.py)."""

    move: str
    stream: int  # the socket's ``MigrateSocket.in_stream``
    data: bytes
    last: bool


MIGRATE_PEER_MESSAGES: tuple[type, ...] = (
    MigrateOrder, MigrateDone, MigratePrepare, MigrateImage, MigrateRestore, MigrateStatus,
    MigrateAbort, MigrateLost, MigrateTail,
)  # fmt: skip
