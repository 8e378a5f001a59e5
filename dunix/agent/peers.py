"""Outbound links to peer agents: one mutually authenticated channel per peer address.

Gossip tolerates loss by design (SWIM re-probes, retransmits and suspects), so a send
never blocks the protocol loop: messages go into a small per-peer queue and are dropped
when the queue is full or the peer cannot be reached. Each peer's sender task connects
lazily, and after a failed connect waits (backoff from config) before it tries again, so
a dead peer costs one refused connect per backoff period, not one per message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from dunix.errors import DunixError
from dunix.wire import Channel, TLSIdentity, open_channel

log = logging.getLogger("dunix.agent.peers")


@dataclass
class _Link:
    send: trio.MemorySendChannel[Any]
    cancel: trio.CancelScope
    sent: int = 0
    dropped: int = 0


class PeerLinks:
    """Fire-and-forget delivery of messages to peers by address."""

    def __init__(
        self,
        nursery: trio.Nursery,
        identity: TLSIdentity,
        my_address: str,
        *,
        queue_size: int = 256,
        connect_timeout: float = 1.0,
        retry_after: float = 0.5,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        self._nursery = nursery
        self._identity = identity
        self._my_address = my_address
        self._queue_size = queue_size
        self._connect_timeout = connect_timeout
        self._retry_after = retry_after
        self._links: dict[str, _Link] = {}
        self._on_bytes = on_bytes

    def send(self, address: str, msg: Any) -> None:
        link = self._links.get(address)
        if link is None:
            link = self._start(address)
        try:
            link.send.send_nowait(msg)
        except trio.WouldBlock:
            link.dropped += 1

    def forget(self, address: str) -> None:
        """Close the link to a peer that left or died (a rejoin opens a new one)."""
        link = self._links.pop(address, None)
        if link is not None:
            link.cancel.cancel()

    def close(self) -> None:
        for address in list(self._links):
            self.forget(address)

    def _start(self, address: str) -> _Link:
        send, receive = trio.open_memory_channel[Any](self._queue_size)
        link = _Link(send, trio.CancelScope())
        self._links[address] = link
        self._nursery.start_soon(self._run, address, link, receive)
        return link

    async def _run(self, address: str, link: _Link, queue: trio.MemoryReceiveChannel[Any]) -> None:
        with link.cancel:
            channel: Channel | None = None
            try:
                async for msg in queue:
                    if channel is None:
                        channel = await self._connect(address)
                        if channel is None:
                            link.dropped += 1
                            self._drain(queue, link)
                            continue
                    try:
                        await channel.send(msg)
                        link.sent += 1
                    except DunixError as exc:
                        log.info("link to %s broke: %s", address, exc)
                        link.dropped += 1
                        await channel.aclose()
                        channel = None
            finally:
                if channel is not None:
                    with trio.CancelScope(shield=True):
                        await channel.aclose()

    async def _connect(self, address: str) -> Channel | None:
        try:
            return await open_channel(
                address,
                self._identity,
                hello_address=self._my_address,
                timeout=self._connect_timeout,
            )
        except DunixError as exc:
            log.debug("cannot reach %s: %s", address, exc)
            await trio.sleep(self._retry_after)
            return None

    @staticmethod
    def _drain(queue: trio.MemoryReceiveChannel[Any], link: _Link) -> None:
        """Drop what piled up while connecting failed: it is stale protocol traffic."""
        while True:
            try:
                queue.receive_nowait()
            except trio.WouldBlock:
                return
            link.dropped += 1
