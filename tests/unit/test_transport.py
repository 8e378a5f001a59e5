"""The handshake and the trio transport over real loopback TLS and a real unix socket.

Every refusal test checks two things: the server logged why (with the peer's address), and
it still serves a good client afterwards.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import stat
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from dunix.errors import (
    AccessDenied,
    AuthenticationFailed,
    ConfigError,
    FrameTooLarge,
    MigrationFailed,
    PeerUnreachable,
    ProtocolError,
    RemoteError,
    VersionMismatch,
)
from dunix.wire import (
    WIRE_VERSION,
    Channel,
    ErrorReply,
    FrameDecoder,
    Hello,
    TLSIdentity,
    Welcome,
    _transport,
    check_hello,
    check_welcome,
    frame,
    keygen,
    listener_addresses,
    message,
    open_channel,
    open_unix_channel,
    parse_address,
    serve_tls,
    serve_unix,
)
from dunix.wire._codec import HEADER


@message
@dataclass(frozen=True)
class TransportTestPing:
    n: int
    data: bytes


# -- sans-IO handshake ------------------------------------------------------------------


def test_check_hello_accepts_what_the_transport_proved() -> None:
    peer, welcome = check_hello(
        Hello(WIRE_VERSION, "node", "n2", "10.0.0.2:7000"),
        proven_role="node",
        proven_name="n2",
        local_name="n1",
    )
    assert (peer.name, peer.role, peer.address) == ("n2", "node", "10.0.0.2:7000")
    assert welcome == Welcome(WIRE_VERSION, "n1")
    peer, _ = check_hello(
        Hello(WIRE_VERSION, "client", "whatever", ""),
        proven_role="client",
        proven_name="admin",
        local_name="n1",
    )
    assert peer.name == "admin"  # the certificate's name, not the claim
    peer, _ = check_hello(
        Hello(WIRE_VERSION, "local", "cli", ""),
        proven_role="local",
        proven_name="",
        local_name="n1",
    )
    assert (peer.name, peer.role) == ("cli", "local")


@pytest.mark.parametrize(
    ("hello", "proven_role", "proven_name", "error"),
    [
        (Hello(WIRE_VERSION + 1, "node", "n2", ""), "node", "n2", VersionMismatch),
        (Hello(WIRE_VERSION, "node", "n3", ""), "node", "n2", AuthenticationFailed),
        (Hello(WIRE_VERSION, "node", "admin", ""), "client", "admin", AuthenticationFailed),
        (Hello(WIRE_VERSION, "client", "n2", ""), "node", "n2", AuthenticationFailed),
        (Hello(WIRE_VERSION, "node", "n1", ""), "local", "", AuthenticationFailed),
        (Hello(WIRE_VERSION, "local", "x", ""), "client", "admin", AuthenticationFailed),
        (Welcome(WIRE_VERSION, "n2"), "node", "n2", ProtocolError),
    ],
)
def test_check_hello_refuses(
    hello: object, proven_role: str, proven_name: str, error: type[Exception]
) -> None:
    with pytest.raises(error):
        check_hello(hello, proven_role=proven_role, proven_name=proven_name, local_name="n1")


def test_check_welcome() -> None:
    assert check_welcome(Welcome(WIRE_VERSION, "n1")).name == "n1"
    with pytest.raises(VersionMismatch):
        check_welcome(Welcome(WIRE_VERSION + 1, "n1"))
    with pytest.raises(AccessDenied, match="nope"):
        check_welcome(ErrorReply("AccessDenied", "nope"))
    with pytest.raises(ProtocolError):
        check_welcome(Hello(WIRE_VERSION, "node", "n1", ""))


def test_error_reply_keeps_the_error_type() -> None:
    class MyMigrationFailed(MigrationFailed):
        pass

    assert ErrorReply.from_exc(FrameTooLarge("big")) == ErrorReply("FrameTooLarge", "big")
    assert ErrorReply.from_exc(MyMigrationFailed("x")).kind == "MigrationFailed"
    assert ErrorReply.from_exc(KeyError("k")).kind == "RemoteError"
    back = ErrorReply("NoSuchKind", "m").to_exc()
    assert type(back) is RemoteError
    assert type(ErrorReply("AccessDenied", "no").to_exc()) is AccessDenied


def test_parse_address() -> None:
    assert parse_address("10.0.0.1:7000") == ("10.0.0.1", 7000)
    assert parse_address("[::1]:80") == ("::1", 80)
    assert parse_address(":7000") == ("", 7000)
    for bad in ("10.0.0.1", "host:x", "host:70000", ""):
        with pytest.raises(ConfigError):
            parse_address(bad)


# -- fixtures ---------------------------------------------------------------------------


@dataclass
class Pki:
    root: Path
    n1: TLSIdentity
    n2: TLSIdentity
    admin: TLSIdentity
    foreign_admin: TLSIdentity


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    keygen(root / "ours", ["n1", "n2", "n3"], ["admin"])
    keygen(root / "other", ["n1"], ["admin"])
    return Pki(
        root,
        TLSIdentity.load(root / "ours", "n1", "node"),
        TLSIdentity.load(root / "ours", "n2", "node"),
        TLSIdentity.load(root / "ours", "admin", "client"),
        TLSIdentity.load(root / "other", "admin", "client"),
    )


class LogWaiter(logging.Handler):
    """Wakes a waiting test task when ``dunix.wire`` logs: no sleeping until it happens."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._changed: trio.Event | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if self._changed is not None:
            self._changed.set()

    async def wait_for(self, text: str, level: int = logging.WARNING) -> logging.LogRecord:
        with trio.fail_after(10):
            while True:
                for record in self.records:
                    if record.levelno >= level and text in record.getMessage():
                        return record
                self._changed = trio.Event()
                await self._changed.wait()


@pytest.fixture
def wire_log(caplog: pytest.LogCaptureFixture) -> Iterator[LogWaiter]:
    caplog.set_level(logging.DEBUG, logger="dunix.wire")
    waiter = LogWaiter()
    logger = logging.getLogger("dunix.wire")
    logger.addHandler(waiter)
    yield waiter
    logger.removeHandler(waiter)


class Echo:
    """Server handler: echoes messages, remembers who it served and how it ended."""

    def __init__(self) -> None:
        self.peers: list[tuple[str, str, str]] = []
        self.channels: list[Channel] = []
        self.clean_ends = 0

    async def __call__(self, channel: Channel) -> None:
        self.peers.append((channel.peer_name, channel.peer_role, channel.peer_address))
        self.channels.append(channel)
        async for msg in channel:
            if isinstance(msg, TransportTestPing) and msg.n < 0:
                raise {
                    -1: AccessDenied("negative"),
                    -2: RuntimeError("handler bug"),
                    -3: ExceptionGroup("from a nursery", [AccessDenied("grouped")]),
                }[msg.n]
            await channel.send(msg)
        self.clean_ends += 1


def run_server(
    identity: TLSIdentity,
    handler: Callable[[Channel], Awaitable[None]],
    body: Callable[[str], Awaitable[None]],
    **kwargs: Any,
) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(serve_tls, "127.0.0.1:0", identity, handler, **kwargs)
            )
            await body(listener_addresses(listeners)[0])
            nursery.cancel_scope.cancel()

    trio.run(main)


async def ping(address: str, identity: TLSIdentity, n: int = 1) -> Channel:
    channel = await open_channel(address, identity, hello_address="127.0.0.1:1")
    await channel.send(TransportTestPing(n, b"x" * n))
    assert await channel.receive() == TransportTestPing(n, b"x" * n)
    return channel


def _context(pki: Pki, ca: str, cert: str | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(pki.root / ca / "ca.pem")
    if cert is not None:
        ctx.load_cert_chain(pki.root / f"{cert}.pem", pki.root / f"{cert}.key")
    return ctx


async def raw_tls(address: str, ctx: ssl.SSLContext) -> trio.SSLStream[trio.SocketStream]:
    host, port = parse_address(address)
    stream = trio.SSLStream(await trio.open_tcp_stream(host, port), ctx)
    await stream.do_handshake()
    return stream


async def read_reply(stream: trio.abc.Stream) -> Any:
    """The first message the server sends, or None if it just hangs up (or breaks)."""
    decoder = FrameDecoder()
    with trio.fail_after(10):
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return None
            if not data:
                return None
            msgs = decoder.feed(data)
            if msgs:
                return msgs[0]


# -- TLS round trips --------------------------------------------------------------------


def test_round_trip_node_and_client(pki: Pki, wire_log: LogWaiter) -> None:
    echo = Echo()

    async def body(address: str) -> None:
        channel = await ping(address, pki.n2, 3)
        assert (channel.peer_name, channel.peer_role) == ("n1", "node")
        big = TransportTestPing(1, os.urandom(3 * 1024 * 1024))  # many receive chunks
        await channel.send(big)
        assert await channel.receive() == big
        await channel.aclose()
        client = await ping(address, pki.admin)
        assert client.peer_name == "n1"
        await client.aclose()

    run_server(pki.n1, echo, body)
    assert echo.peers == [("n2", "node", "127.0.0.1:1"), ("admin", "client", "127.0.0.1:1")]
    assert not [r for r in wire_log.records if r.levelno >= logging.WARNING]


def test_iteration_ends_at_clean_close(pki: Pki) -> None:
    seen: list[Any] = []

    async def main() -> None:
        finished = trio.Event()

        async def collect(channel: Channel) -> None:
            async for msg in channel:
                seen.append(msg)
            finished.set()

        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(serve_tls, "127.0.0.1:0", pki.n1, collect)
            channel = await open_channel(listener_addresses(listeners)[0], pki.n2)
            for n in range(5):
                await channel.send(TransportTestPing(n, b""))
            await channel.aclose()
            await finished.wait()
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert seen == [TransportTestPing(n, b"") for n in range(5)]


def test_receive_after_peer_hangs_up_raises_peer_unreachable(pki: Pki) -> None:
    async def hang_up(channel: Channel) -> None:
        await channel.aclose()

    async def body(address: str) -> None:
        channel = await open_channel(address, pki.n2)
        with pytest.raises(PeerUnreachable):
            await channel.receive()

    run_server(pki.n1, hang_up, body)


def test_a_cancelled_send_leaves_the_channel_usable(pki: Pki) -> None:
    """A sender cancelled at any point sends its message whole or not at all: the sends
    after it still arrive (trio breaks an SSLStream whose send_all is cancelled midway)."""
    seen: list[int] = []

    async def main() -> None:
        async def collect(channel: Channel) -> None:
            async for msg in channel:
                seen.append(msg.n)

        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(serve_tls, "127.0.0.1:0", pki.n1, collect)
            channel = await open_channel(listener_addresses(listeners)[0], pki.n2)
            for n in range(0, 100, 2):
                with trio.CancelScope() as scope:

                    async def cancel_soon(scope: trio.CancelScope = scope) -> None:
                        await trio.lowlevel.checkpoint()  # the sender is inside send by now
                        scope.cancel()

                    nursery.start_soon(cancel_soon)
                    await channel.send(TransportTestPing(n, b"x"))
                await channel.send(TransportTestPing(n + 1, b""))  # raised before the fix
            await channel.aclose()
            with trio.fail_after(10):
                while len(seen) < 100 and (not seen or seen[-1] != 99):
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert [n for n in seen if n % 2] == list(range(1, 100, 2))
    assert seen == sorted(seen)


def test_expect_name_refuses_another_node(pki: Pki) -> None:
    async def body(address: str) -> None:
        with pytest.raises(AuthenticationFailed):
            await open_channel(address, pki.n2, expect_name="n3")
        await (await open_channel(address, pki.n2, expect_name="n1")).aclose()

    run_server(pki.n1, Echo(), body)


def test_unreachable_address_raises_peer_unreachable(pki: Pki) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def main() -> None:
        with pytest.raises(PeerUnreachable):
            await open_channel(f"127.0.0.1:{port}", pki.n2)

    trio.run(main)


# -- refusals: logged, closed, and the server goes on -----------------------------------


async def no_cert(pki: Pki, address: str) -> Any:
    stream = await raw_tls(address, _context(pki, "ours", None))
    await stream.send_all(frame(Hello(WIRE_VERSION, "client", "x", "")))
    return await read_reply(stream)


async def foreign_cert(pki: Pki, address: str) -> Any:
    stream = await raw_tls(address, _context(pki, "ours", "other/client-admin"))
    await stream.send_all(frame(Hello(WIRE_VERSION, "client", "admin", "")))
    return await read_reply(stream)


async def foreign_identity(pki: Pki, address: str) -> Any:
    with pytest.raises(AuthenticationFailed):
        await open_channel(address, pki.foreign_admin)


async def plaintext(pki: Pki, address: str) -> Any:
    host, port = parse_address(address)
    stream = await trio.open_tcp_stream(host, port)
    await stream.send_all(b"GET / HTTP/1.0\r\n\r\n")
    return await read_reply(stream)


async def tls_then(pki: Pki, address: str, data: bytes, cert: str = "ours/client-admin") -> Any:
    stream = await raw_tls(address, _context(pki, "ours", cert))
    await stream.send_all(data)
    return await read_reply(stream)


oversized = partial(tls_then, data=HEADER.pack(2**31))
malformed = partial(tls_then, data=HEADER.pack(3) + b"\xc1\xc1\xc1")
not_hello = partial(tls_then, data=frame(Welcome(WIRE_VERSION, "x")))
wrong_version = partial(tls_then, data=frame(Hello(WIRE_VERSION + 1, "client", "admin", "")))
client_as_node = partial(tls_then, data=frame(Hello(WIRE_VERSION, "node", "admin", "")))
node_as_other = partial(tls_then, data=frame(Hello(WIRE_VERSION, "node", "n3", "")), cert="ours/n2")

BadClient = Callable[[Pki, str], Awaitable[Any]]
REFUSALS: dict[str, tuple[BadClient, str, str | None]] = {
    # name: (bad client, reason in the server's log, ErrorReply kind it gets or None)
    "no certificate": (no_cert, "TLS refused", None),
    "certificate from another CA": (foreign_cert, "CERTIFICATE_VERIFY_FAILED", None),
    "identity from another cluster": (foreign_identity, "TLS refused", None),
    "plaintext garbage": (plaintext, "TLS refused", None),
    "oversized frame": (oversized, "exceeds", "FrameTooLarge"),
    "malformed frame": (malformed, "undecodable", "ProtocolError"),
    "first message not Hello": (not_hello, "expected Hello", "ProtocolError"),
    "wrong version": (wrong_version, "wire version", "VersionMismatch"),
    "client cert claiming node": (client_as_node, "may not act", "AuthenticationFailed"),
    "node cert claiming another name": (node_as_other, "Hello claims 'n3'", "AuthenticationFailed"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusal_is_logged_and_server_goes_on(pki: Pki, wire_log: LogWaiter, case: str) -> None:
    bad_client, reason, reply_kind = REFUSALS[case]
    echo = Echo()

    async def body(address: str) -> None:
        reply = await bad_client(pki, address)
        if reply_kind is not None:
            assert isinstance(reply, ErrorReply) and reply.kind == reply_kind, reply
        record = await wire_log.wait_for(reason)
        assert record.getMessage().startswith("refused connection from 127.0.0.1:")
        await (await ping(address, pki.n2)).aclose()

    run_server(pki.n1, echo, body)
    assert [p[:2] for p in echo.peers] == [("n2", "node")]


def test_silent_peer_times_out_with_a_reason(pki: Pki, wire_log: LogWaiter) -> None:
    async def body(address: str) -> None:
        stream = await raw_tls(address, _context(pki, "ours", "ours/client-admin"))
        await (await ping(address, pki.n2)).aclose()  # a silent peer blocks nobody else
        reply = await read_reply(stream)  # we say nothing; the server gives up on us
        assert isinstance(reply, ErrorReply) and reply.kind == "PeerUnreachable"
        await wire_log.wait_for("within")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(serve_tls, "127.0.0.1:0", pki.n1, Echo(), handshake_timeout=3)
            )
            await body(listener_addresses(listeners)[0])
            nursery.cancel_scope.cancel()

    # The clock jumps only when every task is blocked, so no test time is spent waiting.
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.1))


def test_open_channel_raises_the_servers_refusal(
    pki: Pki, monkeypatch: pytest.MonkeyPatch, wire_log: LogWaiter
) -> None:
    async def body(address: str) -> None:
        monkeypatch.setattr(_transport, "WIRE_VERSION", WIRE_VERSION + 1)
        with pytest.raises(VersionMismatch):
            await open_channel(address, pki.n2)
        monkeypatch.undo()
        await (await ping(address, pki.n2)).aclose()

    run_server(pki.n1, Echo(), body)


def test_handler_errors_are_logged_reported_and_contained(pki: Pki, wire_log: LogWaiter) -> None:
    async def body(address: str) -> None:
        channel = await open_channel(address, pki.admin)
        await channel.send(TransportTestPing(-1, b""))
        assert await channel.receive() == ErrorReply("AccessDenied", "negative")
        await wire_log.wait_for("negative")
        channel = await open_channel(address, pki.admin)
        await channel.send(TransportTestPing(-2, b""))
        reply = await channel.receive()
        assert isinstance(reply, ErrorReply) and reply.kind == "RemoteError"
        record = await wire_log.wait_for("failed", level=logging.ERROR)
        assert record.exc_info is not None
        channel = await open_channel(address, pki.admin)
        await channel.send(TransportTestPing(-3, b""))
        assert await channel.receive() == ErrorReply("AccessDenied", "grouped")
        await wire_log.wait_for("grouped")
        await (await ping(address, pki.n2)).aclose()

    run_server(pki.n1, Echo(), body)


def test_client_identity_cannot_serve(pki: Pki) -> None:
    async def main() -> None:
        with pytest.raises(ConfigError):
            await serve_tls("127.0.0.1:0", pki.admin, Echo())

    trio.run(main)


# -- the local unix socket --------------------------------------------------------------


def test_unix_round_trip_with_peer_cred(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    stale = socket.socket(socket.AF_UNIX)  # a socket file left by a dead agent
    stale.bind(str(path))
    stale.close()
    echo = Echo()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve_unix, path, echo, name="n1"))
            assert stat.S_IMODE(path.stat().st_mode) == 0o666
            channel = await open_unix_channel(path, name="cli")
            assert (channel.peer_name, channel.peer_role) == ("n1", "local")
            assert channel.peer_cred is not None and channel.peer_cred.uid == os.getuid()
            await channel.send(TransportTestPing(7, b"abc"))
            assert await channel.receive() == TransportTestPing(7, b"abc")
            server_side = echo.channels[0]
            assert (server_side.peer_name, server_side.peer_role) == ("cli", "local")
            assert server_side.peer_cred is not None
            assert server_side.peer_cred.uid == os.getuid()
            assert server_side.peer_cred.gid == os.getgid()
            assert server_side.peer_cred.pid == os.getpid()
            with pytest.raises(ConfigError):  # a live socket is never stolen
                await serve_unix(path, echo)
            await channel.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert not path.exists()  # removed when serving stopped


def test_unix_refuses_wrong_role_and_goes_on(tmp_path: Path, wire_log: LogWaiter) -> None:
    path = tmp_path / "ctl.sock"

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve_unix, path, Echo(), name="n1"))
            stream = await trio.open_unix_socket(str(path))
            await stream.send_all(frame(Hello(WIRE_VERSION, "node", "n2", "")))
            reply = await read_reply(stream)
            assert isinstance(reply, ErrorReply) and reply.kind == "AuthenticationFailed"
            await wire_log.wait_for("refused connection from")
            await (await open_unix_channel(path)).aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_unix_no_agent_raises_peer_unreachable(tmp_path: Path) -> None:
    async def main() -> None:
        with pytest.raises(PeerUnreachable):
            await open_unix_channel(tmp_path / "nobody.sock")

    trio.run(main)
