"""A big stream's bytes on a connection of its own, moved by the native relay.

The Python relay (``relay.py``) sends every byte as msgpack frames on the agents' shared
TLS channel, through trio's TLS loops: about 1.5 ms of CPU per MB on each side, which
held a cross-host pipe between 0.5-CPU hosts to a quarter of iperf3 (perf on the agents:
a fifth of it memmove, a quarter the Python interpreter, an eighth AES-GCM). Once a
pipe's stream has carried ``BulkRelay.after`` bytes its sender hands it to
``native/build/dunix-relay`` (read(pipe) -> SSL_write, SSL_read -> write(pipe)), about a
third of that CPU; small streams (most of them) never pay for the extra connection.

Security: the relays speak TLS 1.3 with an external pre-shared key (a fresh random 32
bytes per stream, ``TLS_AES_128_GCM_SHA256`` with ECDHE). The sender makes the key and
gives it to the peer in ``StreamBulk`` on the agents' mutual-TLS channel, so both relays
are known to be the two agents of this cluster; every byte is encrypted and
authenticated. The key reaches a relay on its stdin, never in argv (world-readable).
After the handshake the data leaves TLS's 16 KiB records for AES-128-GCM frames of up
to 1 MiB keyed from the session (the exporter, one key per direction): no copies through
OpenSSL's buffers, one socket write per pipe read (see the C file).

The hand-over (``StreamBulk`` in ``dunix.fdmove.streams``): the sender stops reading,
starts its relay on a fresh listening socket, and sends ``StreamBulk(address, key)`` after
its last ``StreamData``; the receiver writes out what it holds, then starts its relay,
which connects. Each side ends the stream as before (``StreamEnd``/``StreamGone``) when
its relay exits; the relays keep EOF and EPIPE as the Python relay does (see the C
file's comment).

``DUNIX_BULK_RELAY=0`` in the agent's environment keeps every stream in Python (the
benchmark's "before"), and any other number is the hand-over size in bytes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

import trio

from dunix.wire import format_address, parse_address

log = logging.getLogger("dunix.fdmove")

RELAY = Path(__file__).resolve().parents[2] / "native" / "build" / "dunix-relay"
#: bytes a stream carries on the shared channel before it gets a connection of its own:
#: a relay costs a process and a handshake (~2 ms), so short streams stay
BULK_AFTER = 8 * 1024 * 1024
ENV = "DUNIX_BULK_RELAY"
KEY_BYTES = 32

#: dunix-relay's exit statuses (native/dunix-relay.c)
DONE, FAILED, USAGE, PEER_GONE, BROKEN = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class BulkRelay:
    """How this agent hands a stream over: where its relays listen, and which program.

    ``host``: the address this agent's relays listen on and give the peer; empty (an
    agent listening on every address) means the peer's own idea of our address,
    ``peer_host``.
    """

    host: str
    peer_host: str = ""
    program: Path = RELAY
    after: int = BULK_AFTER

    @classmethod
    def for_link(cls, my_address: str, peer_address: str) -> BulkRelay | None:
        """The hand-over for one peer link, None when off or the relay is not built."""
        setting = os.environ.get(ENV, "")
        after = int(setting) if setting.isdigit() else BULK_AFTER
        if setting == "0" or not os.access(RELAY, os.X_OK):
            return None
        host = parse_address(my_address)[0]
        if host in ("", "0.0.0.0", "::"):
            host = ""
        return cls(host, parse_address(peer_address)[0], after=after)

    async def start_sender(self, stream: int, fd: int) -> tuple[trio.Process, str, bytes]:
        """Start the relay that reads ``fd`` and sends it once the peer has connected;
        returns it, the address to give the peer and the key."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as listener:
            listener.bind((self.host, 0))
            listener.listen(4)
            port = listener.getsockname()[1]
            key = secrets.token_bytes(KEY_BYTES)
            argv = ["send", "--fd", str(fd), "--listen", str(listener.fileno())]
            proc = await self._spawn(argv, stream, key, (fd, listener.fileno()))
        return proc, format_address(self.host, port) if self.host else f":{port}", key

    async def start_receiver(self, stream: int, fd: int, address: str, key: bytes) -> trio.Process:
        """Start the relay that connects to the sender's ``address`` and writes into ``fd``."""
        host, port = parse_address(address)
        where = format_address(host or self.peer_host, port)
        return await self._spawn(["recv", "--fd", str(fd), "--connect", where], stream, key, (fd,))

    async def _spawn(
        self, argv: list[str], stream: int, key: bytes, fds: tuple[int, ...]
    ) -> trio.Process:
        r, w = os.pipe()
        try:
            os.write(w, key.hex().encode())  # 64 bytes: a pipe holds them without a reader
            os.close(w)
            w = -1
            return await trio.lowlevel.open_process(
                [str(self.program), *argv, "--id", str(stream)], stdin=r, pass_fds=fds
            )
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)


async def stop(proc: trio.Process) -> int:
    """Kill a relay that is no longer wanted and reap it; its status."""
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    status = -1
    with trio.CancelScope(shield=True):
        status = await proc.wait()
    return status
