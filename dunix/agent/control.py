"""The control API an agent offers to clients (the CLI and ``dunix.client``).

Who asks decides what may be done. A local client on the control socket is the uid the
kernel reports through SO_PEERCRED; a remote client proved itself with a client
certificate of the cluster CA and counts as an administrator. Listing is open to
everyone; acting on a process (later: kill, migrate) needs root or the job's owner.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from dunix import __version__
from dunix.errors import AccessDenied, DunixError, PeerUnreachable, ProtocolError
from dunix.wire import Channel, ErrorReply
from dunix.wire.control import (
    AgentInfo,
    AgentInfoRequest,
    NodesReply,
    NodesRequest,
    WatchRequest,
)

if TYPE_CHECKING:
    from dunix.agent.daemon import Agent

log = logging.getLogger("dunix.agent.control")


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a uid for local callers, ``None`` for a certified admin."""

    uid: int | None
    description: str

    @property
    def is_admin(self) -> bool:
        return self.uid is None or self.uid == 0

    def require_owner(self, owner_uid: int) -> None:
        if not (self.is_admin or self.uid == owner_uid):
            raise AccessDenied(f"{self.description} may not act on a process of uid {owner_uid}")


def caller_of(channel: Channel) -> Caller:
    cred = channel.peer_cred
    if cred is not None:
        return Caller(cred.uid, f"uid {cred.uid} (pid {cred.pid})")
    return Caller(None, f"client {channel.peer_name}")


class ControlService:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    async def serve(self, channel: Channel) -> None:
        caller = caller_of(channel)
        async for request in channel:
            try:
                await self._dispatch(channel, caller, request)
            except DunixError as exc:
                log.info("request %s from %s failed: %s", type(request).__name__, caller, exc)
                await channel.send(ErrorReply.from_exc(exc))

    async def _dispatch(self, channel: Channel, caller: Caller, request: Any) -> None:
        agent = self.agent
        if isinstance(request, NodesRequest):
            await channel.send(NodesReply(tuple(agent.nodes())))
        elif isinstance(request, AgentInfoRequest):
            cfg = agent.config
            await channel.send(
                AgentInfo(cfg.name, agent.node_id, cfg.address, os.getpid(), __version__)
            )
        elif isinstance(request, WatchRequest):
            await self._watch(channel)
        else:
            raise ProtocolError(f"unexpected request {type(request).__name__}")

    async def _watch(self, channel: Channel) -> None:
        """Stream events until the client hangs up (noticed by reading, not by writing)."""
        send, receive = self.agent.subscribe()

        async def until_hangup(cancel: trio.CancelScope) -> None:
            with contextlib.suppress(DunixError):
                await channel.receive()  # a watcher sends nothing more; EOF ends the watch
            cancel.cancel()

        try:
            async with trio.open_nursery() as nursery, receive:
                nursery.start_soon(until_hangup, nursery.cancel_scope)
                try:
                    async for event in receive:
                        await channel.send(event)
                except PeerUnreachable:
                    nursery.cancel_scope.cancel()
        finally:
            self.agent.unsubscribe(send)
