"""The trio driver of the peer lookup: a :class:`RemoteResolver` over any message transport.

:class:`PeerResolver` runs :class:`~dunix.storagefs.lookup.Lookup` (the sans-IO state
machine) for :class:`~dunix.storagefs.fs.StorageFS`, and answers the peers' queries from the
local store. It knows nothing about sockets: the agent gives it

- ``send(peer, message)``: an async function that delivers one lookup message to a peer over
  the agent's links (raising :class:`~dunix.errors.PeerUnreachable` or ``OSError`` when it
  cannot), and
- ``peers()``: the node ids of the peers currently alive (from membership),

and hands every lookup message that arrives to :meth:`PeerResolver.received`. Tests wire
several resolvers together with a fake network and trio's ``MockClock``.

Sends go out from tasks of :meth:`PeerResolver.run` (in parallel, one task per message), so
neither ``created`` (called on the FUSE request path) nor ``lookup`` waits for a slow peer
beyond the lookup deadline. The names this host creates go out together: the first one
queues a flush, and every name created before ``run`` takes it rides along in one
``NameCreated`` per peer (a burst of creates cost one TLS message per peer each: ~40 % of
the agent loop's busy time in a create benchmark).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field

import trio

from dunix.errors import DunixError, StoreError
from dunix.storagefs.lookup import (
    Action,
    Answer,
    Broadcast,
    Lookup,
    LookupQuery,
    LookupReply,
    NameCreated,
    SendQuery,
    missing_folder,
    reply_for,
)
from dunix.storagefs.store import LocalStore

log = logging.getLogger(__name__)

LookupMessage = LookupQuery | LookupReply | NameCreated
Send = Callable[[int, LookupMessage], Awaitable[None]]


@dataclass
class _Waiter:
    done: trio.Event = field(default_factory=trio.Event)
    found: LookupReply | None = None


class PeerResolver:
    """Finds names on the peers for StorageFS, and answers the peers' lookups."""

    def __init__(
        self,
        store: LocalStore,
        lookup: Lookup,
        send: Send,
        peers: Callable[[], Collection[int]],
    ) -> None:
        self.store = store
        self.lookup_state = lookup
        self._send = send
        self._peers = peers
        self._waiters: dict[int, _Waiter] = {}
        self._next_caller = 1
        self._outgoing_in, self._outgoing = trio.open_memory_channel[
            tuple[int, LookupMessage | None]  # None: send the names created so far
        ](math.inf)
        self._created: dict[int, list[str]] = {}  # peer -> names created here, not sent yet
        self._flush_queued = False
        self._kick = trio.Event()

    @property
    def node_id(self) -> int:
        return self.store.node_id

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send queued messages and fire deadlines; run it in the agent's nursery."""
        self.lookup_state.started(trio.current_time())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._deadlines)
            task_status.started()
            async for peer, message in self._outgoing:
                if message is not None:
                    nursery.start_soon(self._deliver, peer, message)
                    continue
                batches, self._created, self._flush_queued = self._created, {}, False
                for peer, paths in batches.items():
                    batch = NameCreated(self.node_id, paths[0], tuple(paths[1:]))
                    nursery.start_soon(self._deliver, peer, batch)

    # --- RemoteResolver -------------------------------------------------------------------

    async def lookup(self, path: str) -> LookupReply | None:
        caller = self._next_caller
        self._next_caller += 1
        waiter = self._waiters[caller] = _Waiter()
        try:
            self._apply(
                self.lookup_state.local_miss(caller, path, self._peers(), trio.current_time())
            )
            await waiter.done.wait()
        finally:
            self._waiters.pop(caller, None)
        return waiter.found

    def created(self, path: str) -> None:
        self._apply(self.lookup_state.created_here(path, trio.current_time()))

    # --- from the agent -------------------------------------------------------------------

    async def received(self, peer: int, message: LookupMessage) -> None:
        """A lookup message arrived from ``peer``."""
        now = trio.current_time()
        if isinstance(message, LookupQuery):
            # inline, as in fs.py: one lstat on the local disk is cheaper than a thread hop
            self._queue(message.origin, self._answer(message))
        elif isinstance(message, LookupReply):
            self._apply(self.lookup_state.peer_reply(message, now))
        elif isinstance(message, NameCreated):
            for path in (message.path, *message.more):
                self._apply(self.lookup_state.name_created(path, message.node))

    def peer_gone(self, peer: int) -> None:
        """Membership declared ``peer`` dead or gone: stop waiting for it."""
        self._apply(self.lookup_state.peer_gone(peer, trio.current_time()))

    # --- inside ---------------------------------------------------------------------------

    def _answer(self, query: LookupQuery) -> LookupReply:
        try:
            st = os.lstat(self.store.backing_path(query.path))
            return reply_for(query, self.node_id, st, self.store.inode_number(st))
        except FileNotFoundError:
            missing = missing_folder(query.path, self._is_folder)
            self.lookup_state.answered_missing(
                query.origin, query.path, missing, trio.current_time()
            )
            return reply_for(query, self.node_id, None, 0, missing)
        except (OSError, StoreError):
            return reply_for(query, self.node_id, None, 0)

    def _is_folder(self, path: str) -> bool:
        """Whether this host has a folder (or anything that is not a missing name) at
        ``path``: only a name that is really not there counts as lacking it."""
        try:
            os.lstat(self.store.backing_path(path))
        except FileNotFoundError:
            return False
        except (OSError, StoreError):
            return True
        return True

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendQuery):
                for peer in action.peers:
                    self._queue(peer, action.query)
            elif isinstance(action, Answer):
                for caller in action.callers:
                    waiter = self._waiters.get(caller)
                    if waiter is not None:
                        waiter.found = action.found
                        waiter.done.set()
            elif isinstance(action, Broadcast):
                peers = self._peers() if action.peers is None else action.peers
                for peer in peers:
                    if peer != self.node_id:
                        self._created.setdefault(peer, []).append(action.message.path)
                if self._created and not self._flush_queued:
                    self._flush_queued = True
                    self._outgoing_in.send_nowait((0, None))  # run() sends the batches
        self._kick.set()  # a new deadline may be earlier than the one being waited for

    def _queue(self, peer: int, message: LookupMessage | None) -> None:
        self._outgoing_in.send_nowait((peer, message))

    async def _deliver(self, peer: int, message: LookupMessage) -> None:
        try:
            await self._send(peer, message)
        except (DunixError, OSError) as exc:
            log.info("storagefs: lookup message to node %d lost: %s", peer, exc)
            if isinstance(message, LookupQuery):
                self.peer_gone(peer)

    async def _deadlines(self) -> None:
        while True:
            deadline = self.lookup_state.next_deadline()
            self._kick = trio.Event()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await self._kick.wait()
            self._apply_tick()

    def _apply_tick(self) -> None:
        actions = self.lookup_state.tick(trio.current_time())
        if actions:
            self._apply(actions)
