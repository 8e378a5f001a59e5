"""trio transport: framed message channels over mutual TLS and the local unix socket.

The thin IO layer around the sans-IO codec and handshake. A connection becomes a
:class:`Channel` only after the transport has proved who the peer is (TLS certificate, or
the kernel's ``SO_PEERCRED`` on the unix socket) and the Hello/Welcome exchange agreed.

Servers never die of one connection: every failure of one peer (bad or missing
certificate, plaintext garbage, a malformed or oversized frame, a wrong version, a
timeout, a crashing handler) is logged on ``dunix.wire`` with the peer's address and the
reason, that connection is closed, and the accept loop goes on.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import ssl
import stat
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import trio

from dunix.errors import (
    AccessDenied,
    AuthenticationFailed,
    ConfigError,
    DunixError,
    PeerUnreachable,
)
from dunix.wire._codec import DEFAULT_MAX_FRAME, FrameDecoder, frame
from dunix.wire._handshake import (
    WIRE_VERSION,
    ErrorReply,
    Hello,
    check_hello,
    check_welcome,
)
from dunix.wire._tls import TLSIdentity, describe, peer_identity, translate_error

log = logging.getLogger("dunix.wire")

RECEIVE_CHUNK = 64 * 1024
DRAIN_BYTES = 1024 * 1024
#: how long a goodbye (close_notify, a refusal) may take before the socket is just closed
CLOSE_TIMEOUT = 1.0
SEND_GRACE = 10.0  # how long a started frame may wait for the peer to read (Channel.send)
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid (see unix(7), SO_PEERCRED)
_EOF: Any = object()

Handler = Callable[["Channel"], Awaitable[object]]


@dataclass(frozen=True)
class PeerCred:
    """The local peer's credentials as the kernel saw them at connect time.

    ``pid`` is as seen from this process's PID namespace (0 if the peer is outside it).
    """

    pid: int
    uid: int
    gid: int


class Channel:
    """A connection carrying whole messages both ways.

    ``send`` may be called from several tasks (a lock keeps frames whole); ``receive`` and
    iteration belong to one task at a time. Failures of the peer raise ``PeerUnreachable``,
    bad data ``ProtocolError``; using a channel this side closed raises trio's
    ``ClosedResourceError`` (our fault, not the peer's).
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        peer_name: str = "",
        peer_role: str = "",
        peer_address: str = "",
        peer_cred: PeerCred | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> None:
        self.stream = stream
        self.peer_name = peer_name
        self.peer_role = peer_role  # "node", "client" or "local"
        self.peer_address = peer_address
        self.peer_cred = peer_cred
        self._decoder = FrameDecoder(max_frame)
        self._pending: collections.deque[Any] = collections.deque()
        self._send_lock = trio.Lock()
        self._eof = False

    def __repr__(self) -> str:
        return f"<Channel {self.peer_role} {self.peer_name!r} at {self.peer_address!r}>"

    async def send(self, msg: Any) -> None:
        """Send one registered message; an unregistered one is a ``TypeError`` (our bug).

        A message goes out whole or not at all, so cancelling a sender leaves the channel
        usable: trio marks an ``SSLStream`` broken when its ``send_all`` is cancelled after
        the first checkpoint (half a TLS record may be out), and the next send then failed
        with ``BrokenResourceError`` (a cancelled terminal watcher lost the ``RemoteExited``
        sent after it, and its deputy waited forever). Once the lock is ours, the write is
        shielded for at most ``SEND_GRACE`` seconds: a peer that reads nothing that long
        is unreachable.
        """
        await self._send_frames(frame(msg))

    async def send_many(self, msgs: Sequence[Any]) -> None:
        """Send several messages in order as one write (one TLS record when they fit):
        each write costs a syscall and a record, most of a small message's price (a
        remote exec's credits ride with its ``RemoteExec``). All go out, or none."""
        await self._send_frames(b"".join(frame(msg) for msg in msgs))

    async def _send_frames(self, data: bytes) -> None:
        who = self.peer_name or "peer"
        async with self._send_lock:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + SEND_GRACE):
                try:
                    await self.stream.send_all(data)
                    return
                except (trio.BrokenResourceError, OSError) as exc:
                    raise PeerUnreachable(f"sending to {who}: {describe(exc)}") from exc
            raise PeerUnreachable(f"sending to {who}: nothing read for {SEND_GRACE:g} s")

    async def receive(self) -> Any:
        """The next message; ``PeerUnreachable`` once the peer has hung up."""
        msg = await self._next()
        if msg is _EOF:
            raise PeerUnreachable(f"{self.peer_name or 'peer'} closed the connection")
        return msg

    def __aiter__(self) -> Channel:
        return self

    async def __anext__(self) -> Any:
        """Messages until the peer hangs up cleanly; a broken connection still raises."""
        msg = await self._next()
        if msg is _EOF:
            raise StopAsyncIteration
        return msg

    async def _next(self) -> Any:
        while not self._pending:
            if self._eof:
                return _EOF
            try:
                data = await self.stream.receive_some(RECEIVE_CHUNK)
            except (trio.BrokenResourceError, OSError) as exc:
                who = self.peer_name or "peer"
                raise PeerUnreachable(f"receiving from {who}: {describe(exc)}") from exc
            if not data:
                self._eof = True
                if self._decoder.buffered:
                    raise PeerUnreachable(f"{self.peer_name or 'peer'} hung up mid-frame")
                continue
            self._pending.extend(self._decoder.feed(_more_decrypted(self.stream, data)))
        return self._pending.popleft()

    async def aclose(self) -> None:
        """Close, saying goodbye (TLS close_notify) if that is quick; never raises."""
        with trio.move_on_after(CLOSE_TIMEOUT):
            with contextlib.suppress(trio.BrokenResourceError, OSError):
                await self.stream.aclose()
                return
        await trio.aclose_forcefully(self.stream)


def _more_decrypted(stream: trio.abc.Stream, data: bytes | bytearray) -> bytes | bytearray:
    """``data`` and whatever else TLS can decrypt without waiting.

    trio's ``SSLStream.receive_some`` returns one TLS record (16 KiB at most) per call and
    passes through the scheduler each time; a 256 KiB stream frame then took 16 trips, the
    biggest cost of a relayed pipe's receiving side (bench/relay_bench.py). The records
    already read, and those the socket holds already (read without waiting), are
    decrypted here in one go, up to ``DRAIN_BYTES``. A close_notify, a broken record, EOF
    or a socket error are left for the next ``receive_some`` to report.
    """
    tls = getattr(stream, "_ssl_object", None)  # trio.SSLStream's; no public way
    if not isinstance(tls, ssl.SSLObject):
        return data
    incoming = getattr(stream, "_incoming", None)
    transport = getattr(stream, "transport_stream", None)
    raw = transport.socket if isinstance(transport, trio.SocketStream) else None
    parts, size = [data], len(data)
    while size < DRAIN_BYTES:
        try:
            more = tls.read(DRAIN_BYTES)
        except ssl.SSLWantReadError:
            # what the socket holds already, as trio's next receive_some would read it
            if raw is None or not isinstance(incoming, ssl.MemoryBIO):
                break
            try:
                got = os.read(raw.fileno(), RECEIVE_CHUNK)  # trio's sockets never block
            except OSError:  # nothing there (EAGAIN), or broken: left for receive_some
                break
            if not got:
                break  # EOF: receive_some sees it next
            incoming.write(got)
            continue
        except ssl.SSLError:  # close_notify or a bad record: receive_some reports it
            break
        if not more:
            break
        parts.append(more)
        size += len(more)
    return data if len(parts) == 1 else b"".join(parts)


# -- addresses --------------------------------------------------------------------------


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6 host]:port`` to (host, port); an empty host means any."""
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{address!r} is not a host:port address")
    return host, int(port)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listener_addresses(listeners: Sequence[trio.abc.Listener[Any]]) -> list[str]:
    """Where listeners really listen (the port chosen for port 0; a unix socket's path)."""
    out = []
    for listener in listeners:
        if isinstance(listener, trio.SocketListener):
            name = listener.socket.getsockname()
            out.append(format_address(name[0], name[1]) if isinstance(name, tuple) else name)
    return out


def _remote(stream: trio.SocketStream) -> str:
    try:
        name = stream.socket.getpeername()
    except OSError:
        return "?"
    return format_address(name[0], name[1]) if isinstance(name, tuple) and name else "local"


def _peer_cred(sock: trio.socket.SocketType) -> PeerCred:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return PeerCred(*_UCRED.unpack(raw))


# -- connecting -------------------------------------------------------------------------


async def _finish_client(channel: Channel, hello: Hello) -> Channel:
    await channel.send(hello)
    welcome = check_welcome(await channel.receive())
    if channel.peer_role == "local":
        channel.peer_name = welcome.name
    elif welcome.name != channel.peer_name:
        raise AuthenticationFailed(
            f"certificate says {channel.peer_name!r}, Welcome says {welcome.name!r}"
        )
    return channel


def _connect_error(
    exc: BaseException, doing: str, timeout: float, *, tls_refusal: bool = True
) -> DunixError:
    """Why connecting failed. ``tls_refusal``: TLS errors may still be the peer's verdict
    on our certificate (a TLS 1.3 client learns it only at its first read); once this side
    has accepted the handshake, a TLS error is just a broken connection."""
    if isinstance(exc, trio.TooSlowError):
        return PeerUnreachable(f"{doing}: no answer within {timeout} s")
    if isinstance(exc, PermissionError):
        return AccessDenied(f"{doing}: {exc}")
    if isinstance(exc, DunixError) and not tls_refusal:
        return exc
    return translate_error(exc, doing)


_CONNECT_FAILURES = (OSError, trio.BrokenResourceError, trio.TooSlowError, DunixError)


def _raise_connect_error(exc: BaseException, doing: str, timeout: float) -> NoReturn:
    err = _connect_error(exc, doing, timeout)
    if err is exc:
        raise err
    raise err from exc


async def open_channel(
    address: str,
    identity: TLSIdentity,
    *,
    hello_address: str = "",
    expect_name: str | None = None,
    timeout: float = 5.0,
    max_frame: int = DEFAULT_MAX_FRAME,
) -> Channel:
    """Connect to a node agent over mutual TLS and shake hands.

    ``hello_address`` is this node's own listen address, for the peer to call back;
    ``expect_name`` refuses a server whose certificate names another node. A refusal by
    the server raises the error it sent (``ErrorReply``); TLS refusals raise
    ``AuthenticationFailed``; no answer within ``timeout`` raises ``PeerUnreachable``.
    """
    host, port = parse_address(address)
    doing = f"connecting to {address}"
    resource: trio.abc.AsyncResource | None = None
    try:
        with trio.fail_after(timeout):
            tcp = resource = await trio.open_tcp_stream(host, port)
            tls = resource = trio.SSLStream(tcp, identity.client_context())
            await tls.do_handshake()
            name, role = peer_identity(tls.getpeercert())
            if role != "node" or (expect_name is not None and name != expect_name):
                raise AuthenticationFailed(f"{address} is {role} {name!r}, not the node wanted")
            channel = Channel(
                tls, peer_name=name, peer_role=role, peer_address=address, max_frame=max_frame
            )
            hello = Hello(WIRE_VERSION, identity.role, identity.name, hello_address)
            result = await _finish_client(channel, hello)
            resource = None
            return result
    except _CONNECT_FAILURES as exc:
        _raise_connect_error(exc, doing, timeout)
    finally:
        if resource is not None:
            await trio.aclose_forcefully(resource)


async def open_unix_channel(
    path: str | os.PathLike[str],
    *,
    name: str = "",
    timeout: float = 5.0,
    max_frame: int = DEFAULT_MAX_FRAME,
) -> Channel:
    """Connect to the local agent's control socket; ``name`` is informational only.

    The returned channel's ``peer_cred`` is the agent process's (check its uid if it
    matters who answers); ``peer_name`` is the name the agent gave in its Welcome.
    """
    where = os.fspath(path)
    doing = f"connecting to {where}"
    resource: trio.abc.AsyncResource | None = None
    try:
        with trio.fail_after(timeout):
            stream = resource = await trio.open_unix_socket(where)
            channel = Channel(
                stream,
                peer_role="local",
                peer_address=where,
                peer_cred=_peer_cred(stream.socket),
                max_frame=max_frame,
            )
            result = await _finish_client(channel, Hello(WIRE_VERSION, "local", name, ""))
            resource = None
            return result
    except _CONNECT_FAILURES as exc:
        _raise_connect_error(exc, doing, timeout)
    finally:
        if resource is not None:
            await trio.aclose_forcefully(resource)


# -- serving ----------------------------------------------------------------------------

Prover = Callable[[], Awaitable[tuple[str, str, PeerCred | None]]]


async def _refuse(channel: Channel, exc: BaseException) -> None:
    """Tell the peer why, if it is still listening; best effort and bounded in time."""
    with trio.move_on_after(CLOSE_TIMEOUT):
        with contextlib.suppress(DunixError, trio.ClosedResourceError):
            await channel.send(ErrorReply.from_exc(exc))


async def _serve_connection(
    stream: trio.abc.Stream,
    remote: str,
    prove: Prover,
    *,
    local_name: str,
    handler: Handler,
    timeout: float,
    max_frame: int,
) -> None:
    """One connection from accept to close; raises nothing but cancellation."""
    deadline = trio.current_time() + timeout
    try:
        with trio.fail_at(deadline):
            proven_name, proven_role, cred = await prove()
    except Exception as exc:
        err = _connect_error(exc, "handshake", timeout)
        unexpected = not isinstance(exc, _CONNECT_FAILURES)
        log.warning("refused connection from %s: %s", remote, err, exc_info=unexpected)
        await trio.aclose_forcefully(stream)
        return
    channel = Channel(
        stream, peer_name=proven_name, peer_role=proven_role, peer_cred=cred, max_frame=max_frame
    )
    try:
        with trio.fail_at(deadline):
            hello = await channel.receive()
            peer, welcome = check_hello(
                hello, proven_role=proven_role, proven_name=proven_name, local_name=local_name
            )
            await channel.send(welcome)
    except Exception as exc:
        err = _connect_error(exc, "handshake", timeout, tls_refusal=False)
        who = f"pid {cred.pid} uid {cred.uid}" if cred else f"{proven_role} {proven_name!r}"
        unexpected = not isinstance(exc, _CONNECT_FAILURES)  # a bug here, not the peer's
        log.warning("refused connection from %s (%s): %s", remote, who, err, exc_info=unexpected)
        await _refuse(channel, err)
        await channel.aclose()
        return
    channel.peer_name, channel.peer_address = peer.name, peer.address
    await _run_handler(channel, handler, remote)


def _dunix_error(exc: BaseException) -> DunixError | None:
    """The dunix error a handler ended with, also when a nursery wrapped it in a group.

    A peer hanging up in the middle of a handler with several tasks is routine and must
    not be logged like a bug. Prefers a reason other than ``PeerUnreachable``.
    """
    if isinstance(exc, DunixError):
        return exc
    if not isinstance(exc, BaseExceptionGroup):
        return None
    found: list[DunixError] = []
    for inner in exc.exceptions:
        err = _dunix_error(inner)
        if err is None:
            return None
        found.append(err)
    return next((e for e in found if not isinstance(e, PeerUnreachable)), found[0])


async def _run_handler(channel: Channel, handler: Handler, remote: str) -> None:
    try:
        await handler(channel)
    except Exception as exc:
        err = _dunix_error(exc)
        if err is None:
            log.exception("handler for %r from %s failed", channel, remote)
            await _refuse(channel, exc)
        elif isinstance(err, PeerUnreachable):
            log.info("%r from %s went away: %s", channel, remote, err)
        else:
            log.warning("%r from %s: %s", channel, remote, err)
            await _refuse(channel, err)
    finally:
        await channel.aclose()


async def _tls_listeners(listen: str) -> list[trio.SocketListener]:
    host, port = parse_address(listen)
    try:
        return await trio.open_tcp_listeners(port, host=host or None)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {listen}: {exc}") from exc


async def serve_tls(
    listen: str | Sequence[trio.SocketListener],
    identity: TLSIdentity,
    handler: Handler,
    *,
    handshake_timeout: float = 5.0,
    max_frame: int = DEFAULT_MAX_FRAME,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept mutual-TLS connections forever, each shaken hands with and handed to ``handler``.

    ``listen`` is "host:port" (port 0 picks one) or ready listeners. Started with
    ``nursery.start``, it reports the listeners (see ``listener_addresses``). A client
    certificate may only say role "client", a node certificate only role "node" with its
    own name. ``handler(channel)`` owns the channel until it returns; it is closed after.
    """
    context = identity.server_context()
    listeners = await _tls_listeners(listen) if isinstance(listen, str) else list(listen)

    async def one(tcp: trio.SocketStream) -> None:
        tls = trio.SSLStream(tcp, context, server_side=True)

        async def prove() -> tuple[str, str, PeerCred | None]:
            await tls.do_handshake()
            name, role = peer_identity(tls.getpeercert())
            return name, role, None

        await _serve_connection(
            tls,
            _remote(tcp),
            prove,
            local_name=identity.name,
            handler=handler,
            timeout=handshake_timeout,
            max_frame=max_frame,
        )

    await trio.serve_listeners(one, listeners, task_status=task_status)


def _remove_stale_socket(path: str) -> None:
    """Unlink a socket file nobody listens on any more; refuse to steal a live one."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(CLOSE_TIMEOUT)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)
            return
        except OSError as exc:
            raise ConfigError(f"cannot tell whether {path} is in use: {exc}") from exc
    raise ConfigError(f"something already listens on {path}")


async def serve_unix(
    path: str | os.PathLike[str],
    handler: Handler,
    *,
    name: str | None = None,
    handshake_timeout: float = 5.0,
    max_frame: int = DEFAULT_MAX_FRAME,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the local control socket: no TLS, the kernel vouches for the peer.

    Anyone may connect (mode 0666); ``channel.peer_cred`` tells who, and authorisation by
    uid is the handler's job. ``name`` (default: the host name) goes in the Welcome. The
    socket file is removed again when serving stops.
    """
    where = os.fspath(path)
    local_name = socket.gethostname() if name is None else name
    _remove_stale_socket(where)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(where)
        os.chmod(where, 0o666)
        sock.listen(socket.SOMAXCONN)
        inode = os.stat(where).st_ino
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {where}: {exc}") from exc

    async def one(stream: trio.SocketStream) -> None:
        async def prove() -> tuple[str, str, PeerCred | None]:
            await trio.lowlevel.checkpoint()
            return "", "local", _peer_cred(stream.socket)

        await _serve_connection(
            stream,
            where,
            prove,
            local_name=local_name,
            handler=handler,
            timeout=handshake_timeout,
            max_frame=max_frame,
        )

    try:
        await trio.serve_listeners(one, [trio.SocketListener(sock)], task_status=task_status)
    finally:
        with contextlib.suppress(OSError):
            if os.stat(where).st_ino == inode:  # not replaced by a newer server
                os.unlink(where)
