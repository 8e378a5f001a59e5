"""First contact without ``--join``: UDP multicast beacons on the local segment.

Each agent started with ``--discover`` announces ``(name, address, CA fingerprint)`` to a
multicast group every ``discover_interval`` seconds, and an agent that knows no other
member joins through the first beacon it hears (as gocircuit's ``-discover``). A beacon is
only a hint: the join itself runs over mutual TLS, so a forged beacon costs one refused
connection; the CA fingerprint keeps two clusters on one segment from trying each other.
"""

from __future__ import annotations

import hashlib
import logging
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from dunix.agent.config import split_address
from dunix.errors import ProtocolError
from dunix.wire import decode, encode, message

if TYPE_CHECKING:
    from dunix.agent.daemon import Agent

log = logging.getLogger("dunix.agent.discovery")


@message
@dataclass(frozen=True)
class Beacon:
    name: str
    address: str
    cluster: str  # sha256 of the cluster CA certificate, hex, first 16 bytes


def cluster_fingerprint(ca_pem: bytes) -> str:
    return hashlib.sha256(ca_pem).hexdigest()[:32]


class Discovery:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        cfg = agent.config
        self.group = cfg.discover_group
        self.port = cfg.discover_port
        self.interval = cfg.discover_interval
        self.cluster = cluster_fingerprint((cfg.tls_dir / "ca.pem").read_bytes())
        host, _ = split_address(cfg.address)
        self.iface_addr = host if host not in ("", "0.0.0.0") else "0.0.0.0"

    def _socket(self) -> trio.socket.SocketType:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        iface = socket.inet_aton(self.iface_addr)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, iface)
        mreq = socket.inet_aton(self.group) + iface
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        return sock

    def _alone(self) -> bool:
        me = self.agent.config.name
        return not any(
            m.name != me and m.state in ("alive", "suspect")
            for m in self.agent.membership.members()
        )

    async def run(self) -> None:
        try:
            sock = self._socket()
            await sock.bind(("", self.port))
        except OSError as exc:
            log.warning("multicast discovery is off: %s", exc)
            return
        with sock:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._announce, sock)
                await self._listen(sock)

    async def _announce(self, sock: trio.socket.SocketType) -> None:
        cfg = self.agent.config
        beacon = encode(Beacon(cfg.name, cfg.address, self.cluster))
        while True:
            try:
                await sock.sendto(beacon, (self.group, self.port))
            except OSError as exc:
                log.debug("beacon not sent: %s", exc)
            await trio.sleep(self.interval)

    async def _listen(self, sock: trio.socket.SocketType) -> None:
        while True:
            data, source = await sock.recvfrom(2048)
            try:
                beacon = decode(data)
            except ProtocolError:
                continue
            if not isinstance(beacon, Beacon) or beacon.cluster != self.cluster:
                continue
            if beacon.name != self.agent.config.name and self._alone():
                log.info("discovered %s at %s (from %s)", beacon.name, beacon.address, source)
                self.agent.join([beacon.address])
