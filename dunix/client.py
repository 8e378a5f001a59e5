"""The public client API: what the CLI, scripts and tests use to talk to an agent.

A client on a host talks to its agent over the local control socket (the kernel tells the
agent who it is). A client elsewhere connects by TCP with a client certificate of the
cluster CA (``dunix keygen --client NAME``).

    >>> async with await Client.connect() as client:
    ...     for node in await client.nodes():
    ...         print(node.name, node.state, node.load)
"""

from __future__ import annotations

import array
import contextlib
import os
import signal
import socket
import termios
import tty
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import trio

from dunix.agent.config import DEFAULT_CONTROL
from dunix.errors import PeerUnreachable, ProtocolError
from dunix.wire import Channel, ErrorReply, TLSIdentity, open_channel, open_unix_channel
from dunix.wire.control import (
    AgentInfo,
    AgentInfoRequest,
    NodeEvent,
    NodeInfo,
    NodesReply,
    NodesRequest,
    WatchRequest,
)
from dunix.wire.jobs import (
    KillReply,
    KillRequest,
    PsReply,
    PsRequest,
    RunAccepted,
    RunExited,
    RunRequest,
    RunSignal,
    RunStarted,
    RunStopped,
)
from dunix.wire.migrate import MigrateReply, MigrateRequest

CLUSTER_HOSTS = Path("/run/dunix/hosts")
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def exit_code(status: int) -> int:
    """A raw wait status as a shell reports it: the exit code, or 128 + the signal."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return 1


def control_sockets() -> list[Path]:
    """Candidate control sockets, best first: $DUNIX_CONTROL, this host's, the local cluster's."""
    env = os.environ.get("DUNIX_CONTROL")
    if env:
        return [Path(env)]
    found = [DEFAULT_CONTROL] if DEFAULT_CONTROL.exists() else []
    found += sorted(CLUSTER_HOSTS.glob("*/control.sock"))
    return found


class _TerminalMode:
    """The caller's terminal during a run: raw while the job has it, as it was otherwise."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.saved = termios.tcgetattr(fd)

    def raw(self) -> None:
        with contextlib.suppress(termios.error, OSError):
            tty.setraw(self.fd, termios.TCSADRAIN)

    def restore(self) -> None:
        with contextlib.suppress(termios.error, OSError):
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)


def _orphaned_group() -> bool:
    """Whether our process group is orphaned (no member's parent is in another group of
    our session): the kernel then drops SIGTSTP, SIGTTIN and SIGTTOU (signal(7))."""
    pgrp, sid = os.getpgrp(), os.getsid(0)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getpgid(int(entry)) != pgrp:
                continue
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if os.getpgid(ppid) != pgrp and os.getsid(ppid) == sid:
                return False
        except (OSError, ValueError, IndexError):
            continue
    return True


def _stop_self(signum: int) -> None:
    """Stop as the job did, so our shell sees a stopped job; SIGCONT continues us."""
    stops = (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)
    if signum not in stops or _orphaned_group():
        signum = signal.SIGSTOP
    os.kill(os.getpid(), signum)


class Client:
    """One connection to one agent. Requests are answered in order."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    @classmethod
    async def connect(
        cls,
        control: Path | None = None,
        *,
        address: str | None = None,
        tls_dir: Path | None = None,
        client_name: str = "admin",
        timeout: float = 5.0,
    ) -> Client:
        """Connect to ``address`` with a client certificate, or to a local control socket."""
        if address is not None:
            if tls_dir is None:
                raise PeerUnreachable("a TCP connection needs --tls-dir with a client certificate")
            identity = TLSIdentity.load(tls_dir, client_name, "client")
            return cls(await open_channel(address, identity, timeout=timeout))
        candidates = [control] if control is not None else control_sockets()
        if not candidates:
            raise PeerUnreachable(
                "no dunix agent here: no control socket (start one with `dunix agent` "
                "or `dunix cluster up`, or set DUNIX_CONTROL)"
            )
        last: Exception | None = None
        for path in candidates:
            try:
                return cls(await open_unix_channel(str(path), timeout=timeout))
            except PeerUnreachable as exc:
                last = exc
        raise PeerUnreachable(f"no agent answers on {', '.join(map(str, candidates))}: {last}")

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.channel.aclose()

    async def _request(self, request: Any, reply_type: type[Any]) -> Any:
        await self.channel.send(request)
        reply = await self.channel.receive()
        if isinstance(reply, ErrorReply):
            raise reply.to_exc()
        if not isinstance(reply, reply_type):
            raise ProtocolError(f"expected {reply_type.__name__}, got {type(reply).__name__}")
        return reply

    async def nodes(self) -> list[NodeInfo]:
        reply: NodesReply = await self._request(NodesRequest(), NodesReply)
        return list(reply.nodes)

    async def agent_info(self) -> AgentInfo:
        info: AgentInfo = await self._request(AgentInfoRequest(), AgentInfo)
        return info

    async def wait_alive(self, count: int, timeout: float, poll: float = 0.2) -> list[NodeInfo]:
        """Wait until this agent sees ``count`` members alive; PeerUnreachable on timeout."""
        nodes: list[NodeInfo] = []
        with trio.move_on_after(timeout):
            while True:
                nodes = await self.nodes()
                if sum(n.state == "alive" for n in nodes) >= count:
                    return nodes
                await trio.sleep(poll)
        alive = sorted(n.name for n in nodes if n.state == "alive")
        raise PeerUnreachable(
            f"only {len(alive)} of {count} members alive after {timeout:g} s: {', '.join(alive)}"
        )

    async def run(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        umask: int | None = None,
        mode: str = "",
        fds: Sequence[int] = (0, 1, 2),
        forward_signals: Sequence[int] = FORWARDED_SIGNALS,
        on_started: Callable[[RunStarted], None] | None = None,
    ) -> int:
        """Run ``argv`` as a job with this process's stdio; its raw wait status.

        The job runs as the caller (the agent reads the uid from the socket), in ``cwd``
        with ``env`` (default: this process's), and gets ``fds`` as its 0, 1, 2, ....
        Signals in ``forward_signals`` that this process receives go to the job.

        When ``fds[0]`` is a terminal, the job gets a pty of its own relayed to it
        (docs/run.md, "Terminal"): this terminal is raw while the job runs and restored
        after; when the job stops (Ctrl-Z) this process stops too, and SIGCONT continues
        both; window size changes follow.
        """
        if umask is None:
            umask = os.umask(0o022)
            os.umask(umask)
        request = RunRequest(
            argv=tuple(argv),
            env=tuple((env if env is not None else dict(os.environ)).items()),
            cwd=cwd or os.getcwd(),
            umask=umask,
            groups=tuple(os.getgroups()),
            mode=mode,
            nfds=len(fds),
        )
        await self._request(request, RunAccepted)
        stream = self.channel.stream
        if not isinstance(stream, trio.SocketStream):
            raise PeerUnreachable("`dunix run` needs a local agent (the control socket)")
        terminal = _TerminalMode(fds[0]) if fds and os.isatty(fds[0]) else None
        watched = tuple(forward_signals)
        if terminal is not None:
            watched += (signal.SIGWINCH, signal.SIGCONT)
        await stream.socket.sendmsg(
            [b"F"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        )
        try:
            with trio.open_signal_receiver(*watched) as signals:
                async with trio.open_nursery() as nursery:

                    async def forward() -> None:
                        async for signum in signals:
                            if signum == signal.SIGCONT and terminal is not None:
                                terminal.raw()  # our shell gave the terminal back
                            await self.channel.send(RunSignal(signum))

                    nursery.start_soon(forward)
                    while True:
                        reply = await self.channel.receive()
                        if isinstance(reply, ErrorReply):
                            raise reply.to_exc()
                        if isinstance(reply, RunStarted):
                            if terminal is not None:
                                terminal.raw()  # the agent has copied its settings
                            if on_started is not None:
                                on_started(reply)
                        elif isinstance(reply, RunStopped):
                            if terminal is not None:
                                terminal.restore()
                            _stop_self(reply.signal)
                        elif isinstance(reply, RunExited):
                            nursery.cancel_scope.cancel()
                            return reply.status
                        else:
                            raise ProtocolError(f"unexpected {type(reply).__name__} during a run")
        finally:
            if terminal is not None:
                terminal.restore()
        raise AssertionError("unreachable")

    async def ps(self) -> PsReply:
        reply: PsReply = await self._request(PsRequest(), PsReply)
        return reply

    async def kill(self, gpid: int, signum: int) -> None:
        await self._request(KillRequest(gpid, signum), KillReply)

    async def migrate(self, gpid: int, node: str) -> MigrateReply:
        """Move a running process to ``node`` (a name, or "home"); raises
        ``MigrationFailed`` with the reason when it stays where it was."""
        reply: MigrateReply = await self._request(MigrateRequest(gpid, node), MigrateReply)
        return reply

    async def watch(self) -> AsyncIterator[NodeEvent]:
        """Subscribe to membership events; iterate the result to receive them.

        The subscription exists once this returns, so nothing that happens after the
        ``await`` is missed: ``events = await client.watch()``, then ``async for``.
        """
        await self.channel.send(WatchRequest())
        return self._events()

    async def _events(self) -> AsyncIterator[NodeEvent]:
        while True:
            event = await self.channel.receive()
            if isinstance(event, ErrorReply):
                raise event.to_exc()
            if not isinstance(event, NodeEvent):
                raise ProtocolError(f"expected NodeEvent, got {type(event).__name__}")
            yield event


# --- storagefs ----------------------------------------------------------------------------


def storagefs_owner(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(owner node id, inode number) of a file under a storagefs mount; no agent is asked.

    The owner is in the inode number's high bits (dunix.pid.devino; FUSE cannot set st_dev
    per file). Node id 0 is the merged root, which every host has.
    """
    from dunix.errors import ConfigError
    from dunix.pid.devino import split_ino

    st = os.lstat(path)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    with open("/proc/self/mountinfo") as f:
        fstypes = {line.split()[2]: line.split(" - ")[1].split()[0] for line in f}
    if fstypes.get(dev) != "fuse.storagefs":
        raise ConfigError(f"{path} is not in storagefs (/dunix/fs)")
    if st.st_ino == 1:
        return 0, 1
    return split_ino(st.st_ino).node_id, st.st_ino


def storagefs_copies(path: str | os.PathLike[str]) -> tuple[int, ...]:
    """The replicas of a storagefs file (node ids; empty: none), as its owner knows them.

    Read from the mount (xattr ``user.dunix.where``, which the owner answers); no agent is
    asked. Raises OSError (EIO) when the owner cannot be reached.
    """
    import errno

    from dunix.storagefs.replicas import WHERE_XATTR, parse_where

    try:
        found = parse_where(os.getxattr(path, WHERE_XATTR, follow_symlinks=False))
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
            return ()
        raise
    return found[1:]


def storagefs_set_replicas(path: str | os.PathLike[str], factor: int) -> None:
    """``dunix fs replicas``: files below folder ``path`` get ``factor`` copies (new ones at
    once, the ones already there by a copy their owner makes soon after).

    Set through the mount (xattr ``user.dunix.replicas``); the host passes it to every peer.
    """
    from dunix.errors import ConfigError
    from dunix.storagefs.replicas import FACTOR_XATTR

    storagefs_owner(path)  # a ConfigError outside storagefs
    if factor < 1:
        raise ConfigError(f"replication factor {factor} is below 1")
    if not os.path.isdir(path):
        raise ConfigError(f"{path} is not a folder: a factor is set on a folder")
    os.setxattr(path, FACTOR_XATTR, str(factor).encode())
