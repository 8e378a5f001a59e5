"""The agent's end of the deputy protocol (docs/run.md, "Deputy").

A deputy (native/dunix-deputy.c) connects to a SOCK_SEQPACKET unix socket; one packet is
one message, its fields separated by ``\\0``:

========================  =========================================================
deputy -> agent           ``hello`` SOCKFD (the fd number of its socket, to leave out
                          of the inventory), ``signal`` SIG (a signal it caught)
agent -> deputy           ``ready`` (fds and signal state taken), ``exit`` CODE,
                          ``killed`` SIG, ``stop`` SIG (stops by SIG when it is
                          SIGTSTP/SIGTTIN/SIGTTOU and the kernel does not drop it,
                          else by SIGSTOP); before ``ready`` only:
                          ``local`` PATH (the remote start failed: exec PATH here with
                          the deputy's argv, env and fds; ENOEXEC runs it with /bin/sh)
========================  =========================================================

The agent knows which process a connection belongs to by SO_PEERCRED, which the kernel
fills in at connect(2) time (unix(7)); the pid is the one in the agent's PID namespace.
"""

from __future__ import annotations

import logging
import os
import socket as stdsocket
import stat
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from dunix.errors import ConfigError, PeerUnreachable, ProtocolError

log = logging.getLogger("dunix.fdmove.deputy")

#: largest message either side sends; the deputy reads into 4 KiB
MAX_MESSAGE = 4096
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def encode_deputy_msg(*fields: str | int) -> bytes:
    """One packet: ``fields`` joined by ``\\0`` (no trailing ``\\0``)."""
    parts = [str(f).encode() for f in fields]
    if not parts or any(b"\0" in p for p in parts):
        raise ValueError(f"not a deputy message: {fields!r}")
    data = b"\0".join(parts)
    if len(data) >= MAX_MESSAGE:
        raise ValueError(f"deputy message of {len(data)} bytes is too long")
    return data


def decode_deputy_msg(data: bytes) -> list[str]:
    """The fields of one packet."""
    if not data:
        raise ProtocolError("empty deputy message")
    try:
        return data.decode().split("\0")
    except UnicodeDecodeError as err:
        raise ProtocolError(f"deputy message is not UTF-8: {data[:64]!r}") from err


@dataclass(frozen=True)
class DeputyHello:
    sockfd: int


@dataclass(frozen=True)
class DeputySignal:
    sig: int


DeputyEvent = DeputyHello | DeputySignal


def parse_deputy_event(fields: list[str]) -> DeputyEvent:
    """A deputy -> agent message as a typed event; ProtocolError for anything else."""
    match fields:
        case ["hello", fd] if fd.isdigit():
            return DeputyHello(int(fd))
        case ["signal", sig] if sig.isdigit() and 0 < int(sig) < 65:
            return DeputySignal(int(sig))
    raise ProtocolError(f"unknown deputy message {fields!r}")


class DeputyConnection:
    """One deputy's connection; ``pid``, ``uid`` and ``gid`` are its SO_PEERCRED."""

    def __init__(self, sock: trio.socket.SocketType, pid: int, uid: int, gid: int) -> None:
        self._sock = sock
        self.pid = pid
        self.uid = uid
        self.gid = gid

    async def recv(self) -> list[str] | None:
        """The next message, or None once the deputy is gone (EOF or reset)."""
        try:
            data = await self._sock.recv(MAX_MESSAGE)
        except (ConnectionResetError, BrokenPipeError):
            return None
        if not data:
            return None
        return decode_deputy_msg(data)

    async def send(self, *fields: str | int) -> None:
        """Send one message; PeerUnreachable if the deputy is gone."""
        data = encode_deputy_msg(*fields)
        try:
            await self._sock.send(data)
        except OSError as err:
            raise PeerUnreachable(f"deputy {self.pid}: {err.strerror}") from err

    async def aclose(self) -> None:
        """Hang up: a deputy that has not been told how to end dies by SIGKILL."""
        self._sock.close()
        await trio.lowlevel.checkpoint()


DeputyHandler = Callable[[int, DeputyConnection], Awaitable[None]]


class DeputyListener:
    """Accepts deputies at ``path`` and runs ``handler(pid, conn)`` for each one.

    The handler owns the connection for as long as it runs; the listener closes it when
    the handler returns. A handler that fails is logged and does not stop the listener.
    """

    def __init__(self, path: str | os.PathLike[str], handler: DeputyHandler) -> None:
        self.path = Path(path)
        self._handler = handler

    async def _bind(self) -> trio.socket.SocketType:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise ConfigError(f"{self.path} exists and is not a socket")
            os.unlink(self.path)  # stale, from an agent that died
        self.path.parent.mkdir(parents=True, exist_ok=True)
        sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_SEQPACKET)
        try:
            await sock.bind(str(self.path))
            # deputies run as the job's user
            os.chmod(self.path, 0o666)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        return sock

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; ``task_status.started()`` once deputies can connect."""
        listener = await self._bind()
        with listener:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    sock, _ = await listener.accept()
                    nursery.start_soon(self._run, sock)

    async def _run(self, sock: trio.socket.SocketType) -> None:
        with sock:
            try:
                pid, uid, gid = _UCRED.unpack(
                    sock.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_PEERCRED, _UCRED.size)
                )
            except OSError as err:
                log.warning("deputy connection without credentials: %s", err)
                return
            conn = DeputyConnection(sock, pid, uid, gid)
            try:
                await self._handler(pid, conn)
            except Exception:
                log.exception("deputy %d: handler failed", pid)
