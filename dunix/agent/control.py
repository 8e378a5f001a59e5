"""The control API an agent offers to clients (the CLI and ``dunix.client``).

Who asks decides what may be done. A local client on the control socket is the uid the
kernel reports through SO_PEERCRED; a remote client proved itself with a client
certificate of the cluster CA and counts as an administrator. Listing is open to
everyone; acting on a process (later: kill, migrate) needs root or the job's owner.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from dunix import __version__
from dunix.agent.runner import serve_run
from dunix.errors import (
    AccessDenied,
    DunixError,
    NoSuchProcess,
    PeerUnreachable,
    ProtocolError,
    error_from_wire,
)
from dunix.pid import split_gpid
from dunix.wire import Channel, ErrorReply
from dunix.wire.control import (
    AgentInfo,
    AgentInfoRequest,
    NodesReply,
    NodesRequest,
    WatchRequest,
)
from dunix.wire.jobs import (
    KillQuery,
    KillReply,
    KillRequest,
    PsQuery,
    PsReply,
    PsRequest,
    RunRequest,
)
from dunix.wire.migrate import MigrateRequest

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
        elif isinstance(request, RunRequest):
            await serve_run(agent.jobs, channel, request)
        elif isinstance(request, PsRequest):
            await channel.send(await self._ps())
        elif isinstance(request, MigrateRequest):
            uid = None if caller.is_admin else caller.uid
            await channel.send(await agent.migration.request(request.gpid, request.node, uid))
        elif isinstance(request, KillRequest):
            await self._kill(caller, request)
            await channel.send(KillReply())
        else:
            raise ProtocolError(f"unexpected request {type(request).__name__}")

    async def _ps(self) -> PsReply:
        """Every managed process cluster-wide: ours, and what each alive peer reports."""
        agent = self.agent
        answers, silent = await agent.queries.ask(
            agent.alive_peers(), PsQuery, agent.config.query_timeout
        )
        procs = list(agent.jobs.ps())
        for answer in answers.values():
            procs += answer.procs
        procs.sort(key=lambda p: (p.gpid, p.node))
        return PsReply(tuple(procs), tuple(silent))

    async def _kill(self, caller: Caller, request: KillRequest) -> None:
        agent = self.agent
        node_id, _ = split_gpid(request.gpid)
        uid = None if caller.is_admin else caller.uid
        if node_id == agent.node_id:
            agent.jobs.kill(request.gpid, request.signal, uid)
            return
        peer = agent.peer_by_node_id(node_id)
        if peer is None:
            raise NoSuchProcess(f"gpid {request.gpid}: its home node (id {node_id}) is not alive")
        query = functools.partial(
            KillQuery, gpid=request.gpid, signal=request.signal, uid=-1 if uid is None else uid
        )
        answers, _ = await agent.queries.ask(
            [peer], lambda q: query(query=q), agent.config.query_timeout
        )
        answer = answers.get(peer[0])
        if answer is None:
            raise PeerUnreachable(f"{peer[0]} did not answer")
        if answer.error_kind:
            raise error_from_wire(answer.error_kind, answer.error)

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
