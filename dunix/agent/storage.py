"""The agent's storagefs service: this host's part of the one file tree at /dunix/fs.

It mounts :class:`~dunix.storagefs.fs.StorageFS` over the host's local disk folder (inside
the host's mount namespace, where the agent runs) and serves it on the agent's trio loop.
Peers are reached over ``JobLinks`` (the reliable per-peer channel): lookups
(:class:`~dunix.storagefs.resolver.PeerResolver`) and file operations
(:class:`~dunix.storagefs.peerfiles.PeerFiles` to owners, :class:`FileServer` for peers).
Membership says who is alive (``peers``) and who died (``peer_gone``).

The FUSE requests are answered by this very loop: nothing in the agent may touch the mount
point itself (a stat of /dunix/fs from the loop would wait for an answer only the loop can
give). The service uses the backing folder only.

A host without FUSE (no /dev/fuse, a refused mount) gets a log line and no mount; the agent
keeps running. Cancelling the service (agent exit) unmounts.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from dunix.errors import DunixError, PeerUnreachable
from dunix.storagefs import _syscalls
from dunix.storagefs.lookup import Lookup, LookupConfig, LookupQuery, LookupReply, NameCreated
from dunix.storagefs.peerfiles import FileMessage, FileReply, FileRequest, FileServer, PeerFiles
from dunix.storagefs.resolver import LookupMessage, PeerResolver
from dunix.storagefs.store import LocalStore

if TYPE_CHECKING:
    from dunix.agent.daemon import Agent

log = logging.getLogger("dunix.agent.storage")

STORAGE_MESSAGES = (LookupQuery, LookupReply, NameCreated, FileRequest, FileReply)


def mounted_at(path: str) -> bool:
    """Whether something is mounted on ``path`` in this mount namespace."""
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


class StorageService:
    """Mounts and serves /dunix/fs for one agent (see the module docstring)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.store: LocalStore | None = None
        self.resolver: PeerResolver | None = None
        self.files: PeerFiles | None = None
        self.server: FileServer | None = None
        self.serving = False
        self._nursery: trio.Nursery | None = None

    @property
    def node_id(self) -> int:
        return self.agent.node_id

    def peers(self) -> list[int]:
        me = self.agent.config.name
        members = self.agent.membership.members()
        return [m.node_id for m in members if m.state == "alive" and m.name != me]

    async def send(self, peer: int, msg: LookupMessage | FileMessage) -> None:
        found = self.agent.peer_by_node_id(peer)
        if found is None:
            raise PeerUnreachable(f"node {peer} is not a live member")
        await self.agent.job_links.send(found[0], msg)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; never fails the agent (a broken storagefs is logged)."""
        cfg = self.agent.config
        mountpoint = str(cfg.storagefs_mount)
        started = False
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    await self._start(nursery, mountpoint)
                except (DunixError, OSError, RuntimeError) as exc:
                    log.error("storagefs: no %s on this host: %s (the agent runs on)",
                              mountpoint, exc)  # fmt: skip
                    nursery.cancel_scope.cancel()
                task_status.started()
                started = True
        except Exception:
            log.exception("storagefs: stopped; the agent runs on without %s", mountpoint)
        finally:
            self.serving = False
            self._nursery = None
            if self.server is not None:
                self.server.close()
            if self.store is not None:
                self.store.close()
        if not started:
            task_status.started()

    async def _start(self, nursery: trio.Nursery, mountpoint: str) -> None:
        from dunix.storagefs.fs import StorageFS, serve_fs  # loads pyfuse3

        cfg = self.agent.config
        if not os.path.exists("/dev/fuse"):
            raise OSError("no /dev/fuse (FUSE missing in this kernel or container)")
        self.store = store = LocalStore(cfg.storagefs_store, self.node_id)
        lookup = Lookup(
            self.node_id,
            LookupConfig(deadline=cfg.storagefs_deadline, negative_ttl=cfg.storagefs_negative_ttl),
        )
        self.resolver = PeerResolver(store, lookup, self.send, self.peers)
        self.files = PeerFiles(self.node_id, self.send, timeout=cfg.storagefs_timeout)
        fs = StorageFS(store, self.resolver, files=self.files, peers=self.peers)
        self.server = FileServer(store, created=self.resolver.created, changed=fs.notify_changed)
        await nursery.start(self.resolver.run)
        if mounted_at(mountpoint):
            # the mount of an agent that died without unmounting (ENOTCONN for everyone,
            # a mkdir of the mount point included): detach it first
            log.warning("storagefs: dropping a stale mount at %s", mountpoint)
            _syscalls.detach_mount(mountpoint)
        Path(mountpoint).mkdir(parents=True, exist_ok=True)
        await nursery.start(serve_fs, fs, mountpoint)
        self.serving = True
        log.info("storagefs: serving %s at %s (node %d)", store.tree, mountpoint, self.node_id)

    # --- from the agent -------------------------------------------------------------------

    def on_peer_message(self, msg: LookupMessage | FileMessage) -> None:
        """A storagefs message from a peer; handled in a task (never blocks the link)."""
        if self._nursery is None or self.resolver is None:
            return  # not serving: peers asking get no answer and stop waiting for us
        self._nursery.start_soon(self._handle, msg)

    async def _handle(self, msg: LookupMessage | FileMessage) -> None:
        assert self.resolver is not None and self.files is not None and self.server is not None
        if isinstance(msg, FileReply):
            self.files.received(msg)
        elif isinstance(msg, FileRequest):
            reply = await self.server.handle(msg)
            with contextlib.suppress(DunixError, OSError):
                await self.send(msg.origin, reply)
        else:
            await self.resolver.received(msg.origin if isinstance(msg, LookupQuery) else
                                         msg.node, msg)  # fmt: skip

    def peer_gone(self, node_id: int) -> None:
        """Membership declared a peer dead or gone."""
        if self.resolver is not None:
            self.resolver.peer_gone(node_id)
        if self.files is not None:
            self.files.peer_gone(node_id)
        if self.server is not None:
            self.server.peer_gone(node_id)
