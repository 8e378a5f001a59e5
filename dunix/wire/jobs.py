"""Messages of `dunix run`: between a client and its agent, and between agents.

Client ⇄ agent (control socket): ``RunRequest`` → ``RunAccepted`` → the client passes its
stdio with SCM_RIGHTS (one byte, right after ``RunAccepted``) → ``RunStarted`` →
``RunSignal``* / ``RunStopped``* → ``RunExited``. ``PsRequest`` → ``PsReply``;
``KillRequest`` → ``KillReply``.

Agent ⇄ agent (TLS link, fire and forget, answered by messages the other way):
``RemoteExec`` → ``RemoteStarted`` | ``RemoteFailed``; ``RemoteSignal``; ``RemoteExited``;
``PsQuery`` → ``PsAnswer``; ``KillQuery`` → ``KillAnswer``.
"""

from __future__ import annotations

from dataclasses import dataclass

from dunix.wire._codec import message


@message
@dataclass(frozen=True)
class RunRequest:
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    cwd: str
    umask: int
    groups: tuple[int, ...]  # trusted only from root; others get their configured groups
    mode: str  # placement: auto, local, remote
    nfds: int  # how many fds (0..nfds-1) the client passes after RunAccepted


@message
@dataclass(frozen=True)
class RunAccepted:
    job: str


@message
@dataclass(frozen=True)
class RunStarted:
    job: str
    gpid: int
    node: str


@message
@dataclass(frozen=True)
class RunSignal:
    signal: int


@message
@dataclass(frozen=True)
class RunStopped:
    """The job's first process stopped (Ctrl-Z in its terminal): the client stops too."""

    signal: int


@message
@dataclass(frozen=True)
class RunExited:
    status: int  # raw wait status of the job's first process


@message
@dataclass(frozen=True)
class ProcInfo:
    gpid: int
    job: str
    home: str
    node: str
    pid: int  # kernel pid on ``node``
    uid: int
    state: str  # running, deputy, remote, unmovable: reason
    cmd: str
    cpu: float  # seconds
    rss: int  # bytes
    moves: int = 0  # how often `dunix migrate` moved it


@message
@dataclass(frozen=True)
class PsRequest:
    pass


@message
@dataclass(frozen=True)
class PsReply:
    procs: tuple[ProcInfo, ...]
    missing: tuple[str, ...]  # nodes that did not answer in time


@message
@dataclass(frozen=True)
class KillRequest:
    gpid: int
    signal: int


@message
@dataclass(frozen=True)
class KillReply:
    pass


@message
@dataclass(frozen=True)
class RemoteFd:
    """One fd of a process that runs on a peer, and how to recreate it there."""

    fd: int
    kind: str  # pipe (relayed), file (reopened), null (reopened), tty (pty, relayed)
    stream: int  # relay stream id, 0 when not relayed
    readable: bool
    writable: bool
    path: str
    pos: int
    flags: int
    #: a tty: ``stream`` carries its output home, ``stream_in`` (0: it is not read) the keys;
    #: the guest's pty starts with these termios (kernel struct) and window size
    stream_in: int = 0
    termios: bytes = b""
    winsize: bytes = b""


@message
@dataclass(frozen=True)
class RemoteExec:
    job: str
    home: str
    home_pid: int
    gpid: int
    path: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    cwd: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    umask: int
    sigign: int
    sigblock: int
    rlimits: tuple[tuple[int, int, int], ...]
    fds: tuple[RemoteFd, ...]
    mode: str


@message
@dataclass(frozen=True)
class RemoteStarted:
    job: str
    home_pid: int
    pid: int  # kernel pid on the peer


@message
@dataclass(frozen=True)
class RemoteFailed:
    job: str
    home_pid: int
    reason: str


@message
@dataclass(frozen=True)
class RemoteSignal:
    job: str
    home_pid: int
    signal: int
    group: bool  # to every process of that guest's part of the job (a terminal's Ctrl-C)


@message
@dataclass(frozen=True)
class RemoteStopped:
    """The guest stopped (SIGSTOP, SIGTSTP ...): its deputy stops too, so the parent sees it."""

    job: str
    home_pid: int
    signal: int


@message
@dataclass(frozen=True)
class RemoteTtyMode:
    """The guest's pty for the home's terminal ``stream`` took these termios."""

    job: str
    home_pid: int
    stream: int
    termios: bytes


@message
@dataclass(frozen=True)
class RemoteWinsize:
    """The home's terminal ``stream`` has a new window size: the guest's pty follows."""

    job: str
    home_pid: int
    stream: int
    winsize: bytes


@message
@dataclass(frozen=True)
class RemoteExited:
    job: str
    home_pid: int
    status: int
    #: (fd, offset) of each reopened regular file whose offset the guest moved: the home
    #: sets its own open file description there before the deputy ends, so a parent that
    #: shares it (``{ a; remote-b; c; } > file``) writes on after b's bytes, not over them
    offsets: tuple[tuple[int, int], ...] = ()


@message
@dataclass(frozen=True)
class PsQuery:
    query: int


@message
@dataclass(frozen=True)
class PsAnswer:
    query: int
    procs: tuple[ProcInfo, ...]


@message
@dataclass(frozen=True)
class KillQuery:
    query: int
    gpid: int
    signal: int
    uid: int  # -1: an administrator asks


@message
@dataclass(frozen=True)
class KillAnswer:
    query: int
    error_kind: str  # "" when done
    error: str
