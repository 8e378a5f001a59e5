"""The agent's storagefs service: this host's part of the one file tree at /dunix/fs.

It mounts :class:`~dunix.storagefs.fs.StorageFS` over the host's local disk folder (inside
the host's mount namespace, where the agent runs) and serves it on the agent's trio loop.
Peers are reached over ``JobLinks`` (the reliable per-peer channel): lookups
(:class:`~dunix.storagefs.resolver.PeerResolver`) and file operations
(:class:`~dunix.storagefs.peerfiles.PeerFiles` to owners, :class:`FileServer` for peers).
Membership says who is alive (``peers``) and who died (``peer_gone``).

The file system is served by its own trio loop in its own thread ("storagefs thread"), not
by the agent's loop: the agent's loop makes blocking system calls (a stat of a job's cwd,
an open of a guest's file by path, /proc/PID/fd stats) that may land on /dunix/fs, and a
FUSE request waiting for the very loop that is blocked in the system call would never be
answered. Local names are served entirely in the storagefs thread; only peer traffic (lookups,
owners' file operations) crosses into the agent's loop (``_Bridge``), bounded by
``storagefs_timeout``: a call the agent's loop cannot take in time gives EIO, not a hang.
The service itself uses the backing folder only, never the mount.

A host without FUSE (no /dev/fuse, a refused mount) gets a log line and no mount; the agent
keeps running. Cancelling the service (agent exit) unmounts.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import shutil
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import outcome
import trio

from dunix.agent.config import split_address
from dunix.errors import DunixError, PeerUnreachable
from dunix.storagefs import _syscalls, locks, passthrough
from dunix.storagefs.bulk import BulkClient, BulkServer, locator
from dunix.storagefs.lookup import Lookup, LookupConfig, LookupQuery, LookupReply, NameCreated
from dunix.storagefs.peerfiles import FileMessage, FileReply, FileRequest, FileServer, PeerFiles
from dunix.storagefs.replicas import OPS as REPLICA_OPS
from dunix.storagefs.replicas import Replicas
from dunix.storagefs.resolver import LookupMessage, PeerResolver
from dunix.storagefs.store import LocalStore

if TYPE_CHECKING:
    from dunix.agent.daemon import Agent

log = logging.getLogger("dunix.agent.storage")

STORAGE_MESSAGES = (LookupQuery, LookupReply, NameCreated, FileRequest, FileReply)
STOP_GRACE = 5.0  # seconds the storagefs thread gets to unmount when the agent stops


class _Bridge:
    """The storagefs thread's way into the agent's loop (RemoteResolver and OwnerFiles)."""

    def __init__(
        self, token: trio.lowlevel.TrioToken, resolver: PeerResolver, files: PeerFiles
    ) -> None:
        self._token = token
        self._resolver = resolver
        self._files = files
        self.timeout = files.timeout + 1.0
        #: contents of peers' files go over the bulk lane (storagefs/bulk.py) when it works
        self.bulk: BulkClient | None = None

    async def _in_agent(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        """``fn`` run as a task on the agent's loop, its outcome handed back here.

        No worker thread: two wakeups where ``to_thread`` + ``from_thread.run`` took four
        and a third thread (45 instead of 89 us of CPU per call, measured alone; every
        create's peer lookup crosses here). A task the agent's loop does not finish in
        time is left to finish there: the caller gets PeerUnreachable.
        """
        here = trio.lowlevel.current_trio_token()
        done = trio.Event()
        result: list[outcome.Outcome[Any]] = []

        async def run() -> None:
            try:
                result.append(outcome.Value(await fn()))
            except trio.Cancelled:  # the agent is stopping
                result.append(outcome.Error(PeerUnreachable("the agent's loop is stopping")))
                raise
            except BaseException as exc:  # handed to the caller
                result.append(outcome.Error(exc))
            finally:
                with contextlib.suppress(trio.RunFinishedError):
                    here.run_sync_soon(done.set)

        try:
            self._token.run_sync_soon(trio.lowlevel.spawn_system_task, run)
        except trio.RunFinishedError:
            raise PeerUnreachable("the agent's loop has ended") from None
        with trio.move_on_after(self.timeout):
            await done.wait()
            return result[0].unwrap()
        raise PeerUnreachable("the agent's loop did not take a storagefs call in time")

    async def lookup(self, path: str) -> LookupReply | None:
        found: LookupReply | None = await self._in_agent(
            functools.partial(self._resolver.lookup, path)
        )
        return found

    def created(self, path: str) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._resolver.created, path)

    async def call(self, peer: int, op: str, **fields: object) -> FileReply:
        if self.bulk is not None and op in ("read", "write"):
            carried = await self.bulk.carry(peer, op, fields)
            if carried is not None:
                return carried
        return await self.by_message(peer, op, **fields)

    async def by_message(self, peer: int, op: str, **fields: object) -> FileReply:
        reply: FileReply = await self._in_agent(
            functools.partial(self._files.call, peer, op, **fields)
        )
        return reply


#: one /tmp for all of a job's processes on every host: the home agent makes a folder in
#: storagefs, puts its path in the job's environment under this name, and every tracer of
#: the job (home and guests: a remote exec ships the environment) starts in a mount
#: namespace of its own with that folder bound over /tmp; removed when the job ends. On by
#: default for a job whose cwd is in storagefs (`cc` runs cc1 and as, which share a file in
#: /tmp, as separate execs that may land on different hosts); ``0`` turns it off, any other
#: value turns it on for a job elsewhere.
JOB_TMP_ENV = "DUNIX_JOB_TMP"
PASSTHROUGH_ENV = "DUNIX_FUSE_PASSTHROUGH"
SWITCHED_OFF = ("0", "off", "no")  # what turns DUNIX_JOB_TMP or DUNIX_FUSE_PASSTHROUGH off
JOBS_FOLDER = ".dunix-jobs"


def job_tmp_wrapper(env: dict[str, str], argv: list[str]) -> list[str]:
    """The argv that starts ``argv`` (a tracer) with the job's /tmp bound, if it has one.

    unshare(1) gives it a private mount namespace (its own copy of /dunix/fs's mount: the
    same FUSE connection) and sh binds the folder; both exec, so the pid, session and fds
    the agent set up stay the tracer's. A checkpoint move dumps from inside that mount
    namespace and restores under this same wrapper (agent/migration.py
    ``restore_command``; CRIU from outside fails: "doesn't have a proper root mount").
    """
    folder = env.get(JOB_TMP_ENV, "")
    if not folder.startswith("/"):
        return argv
    bind = '/usr/bin/mount --bind -- "$0" /tmp && exec "$@"'
    return ["/usr/bin/unshare", "--mount", "--propagation", "private", "--",
            "/bin/sh", "-c", bind, folder, *argv]  # fmt: skip


def storagefs_cwd(cwd: str) -> str:
    """A process's cwd as a remote exec ships it (``readlink /proc/PID/cwd``).

    A storagefs folder's inode number changes on a host that gets its own part of it (a
    merged folder: a peer's folder first, then this host's once a file is created in it
    here); the kernel's next revalidation then unhashes the old dentry, and the cwd of a
    process still in it reads "PATH (deleted)" although PATH is there (seen in a parallel
    build: cc on a guest, cc1 sent on to a third host). The name is what the peer needs;
    a folder really gone fails its chdir there just the same. No stat here: this runs on
    the agent's loop, which must not wait for the mount.
    """
    return cwd.removesuffix(" (deleted)")


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
        self.replicas: Replicas | None = None
        self.serving = False
        self._nursery: trio.Nursery | None = None
        self.locks: locks.LockManager | None = None  # lives on the storagefs thread
        self._fs_token: trio.lowlevel.TrioToken | None = None
        self.bulk_server: BulkServer | None = None
        self._bulk_client: BulkClient | None = None  # lives on the storagefs thread

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
            if self.bulk_server is not None:
                self.bulk_server.close()
            if self.server is not None:
                self.server.close()
            if self.store is not None:
                self.store.close()
        if not started:
            task_status.started()

    async def _start(self, nursery: trio.Nursery, mountpoint: str) -> None:
        # first (it does not pull in libfuse3, libfuselocks does: symbols of libraries loaded
        # after libfuse3 cannot interpose), then locks, then pyfuse3
        # local files' reads and writes bypass Python (FUSE passthrough); ``0`` in
        # DUNIX_FUSE_PASSTHROUGH turns it off: without the library every open takes the
        # Python path. (It was opt-in for a while: a job's shared /tmp failed 2 of 5 runs;
        # the cause was peers asking a renamed or renumbered folder by its old name, see
        # StorageFS._seen_remote, not passthrough.)
        if os.environ.get(PASSTHROUGH_ENV, "1") not in SWITCHED_OFF:
            passthrough.preload()
        else:
            passthrough.turn_off(f"{PASSTHROUGH_ENV}={os.environ[PASSTHROUGH_ENV]}")
        library = locks.preload()  # before pyfuse3 loads: it adds the FUSE lock handlers
        from dunix.storagefs.fs import StorageFS  # loads pyfuse3

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
        bridge = _Bridge(trio.lowlevel.current_trio_token(), self.resolver, self.files)
        fs = StorageFS(
            store, bridge, files=bridge, peers=self.peers, list_deadline=cfg.storagefs_list_deadline
        )
        self.locks = manager = locks.LockManager(self.node_id)
        if library is not None:
            lock_call = fs.drains_writes(bridge.call)  # this host's writes, then the lock
            locks.FuseLocks(manager, fs, lock_call, lambda: fs.nursery).install(library)
        self.server = FileServer(
            store, created=self.resolver.created, changed=fs.notify_changed, locks=self._serve_lock
        )
        self._start_bulk(bridge, fs)
        # replicated files (dunix/storagefs/replicas.py): the same state for both threads
        self.replicas = Replicas(
            store, self.peers, self.files.call,
            created=self.resolver.created, changed=fs.notify_changed,
        )  # fmt: skip
        fs.replicas = self.replicas.with_call(bridge.call)
        self.server.extra_ops.update(dict.fromkeys(REPLICA_OPS, self.replicas.serve))
        self.server.after = self.replicas.server_hook(self.server)
        nursery.start_soon(self.replicas.run)
        await nursery.start(self.resolver.run)
        if mounted_at(mountpoint):
            # the mount of an agent that died without unmounting (ENOTCONN for everyone,
            # a mkdir of the mount point included): detach it first
            log.warning("storagefs: dropping a stale mount at %s", mountpoint)
            _syscalls.detach_mount(mountpoint)
        Path(mountpoint).mkdir(parents=True, exist_ok=True)
        await nursery.start(self._serve_in_thread, fs, mountpoint)
        self.serving = True
        log.info("storagefs: serving %s at %s (node %d)", store.tree, mountpoint, self.node_id)
        log.info("storagefs: %s", locks.describe(library))

    def _start_bulk(self, bridge: _Bridge, fs: Any) -> None:
        """The bulk lane (storagefs/bulk.py): its listener here, its client in ``bridge``."""
        assert self.server is not None
        cfg, token = self.agent.config, trio.lowlevel.current_trio_token()

        def node_of(name: str) -> int | None:  # from a lane thread: asks the agent's loop
            def find() -> int | None:
                for m in self.agent.membership.members():
                    if m.name == name and m.state in ("alive", "suspect"):
                        return int(m.node_id)
                return None

            try:
                found: int | None = trio.from_thread.run_sync(find, trio_token=token)
            except trio.RunFinishedError:
                return None
            return found

        def wrote(path: str) -> None:  # before the writer's answer, as by message
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(fs.notify_changed, path, True, trio_token=token)

        def plain_write(path: str) -> bool:  # a replicated file's writes go by message
            return self.replicas is None or not self.replicas.copies(path)

        try:
            self.bulk_server = BulkServer(
                self.agent.identity.server_context(), self.server.dup_handle, node_of,
                plain_write=plain_write, wrote=wrote,
            )  # fmt: skip
            host = split_address(cfg.listen)[0]
            port = self.bulk_server.start(host)
        except (DunixError, OSError) as exc:
            log.warning("storagefs: no bulk lane (peers' file contents go by message): %s", exc)
            return
        self.server.bulk_address = f"{cfg.name} {split_address(cfg.address)[0]} {port}"
        bridge.bulk = BulkClient(
            self.agent.identity.client_context(), locator(bridge.by_message),
            timeout=cfg.storagefs_timeout,
        )  # fmt: skip
        self._bulk_client = bridge.bulk
        log.info("storagefs: bulk lane for file contents on port %d", port)

    async def _serve_in_thread(
        self, fs: Any, mountpoint: str, *, task_status: trio.TaskStatus[None]
    ) -> None:
        """Run ``serve_fs`` in the storagefs thread until the agent stops or it ends.

        Started once mounted; a failed mount raises here (RuntimeError from pyfuse3).
        """
        from dunix.storagefs.fs import serve_fs

        agent_token = trio.lowlevel.current_trio_token()
        mounted, ended = trio.Event(), trio.Event()
        outcome: list[BaseException] = []
        stop: list[Callable[[], None]] = []

        def tell_agent(fn: Callable[[], None]) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                agent_token.run_sync_soon(fn)

        async def fuse_main() -> None:
            token = self._fs_token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as inner:
                stop.append(lambda: token.run_sync_soon(inner.cancel_scope.cancel))
                await inner.start(serve_fs, fs, mountpoint)
                tell_agent(mounted.set)

        def thread_main() -> None:
            try:
                trio.run(fuse_main)
            except BaseException as exc:  # reported to the agent's loop, not lost in a thread
                outcome.append(exc)
            finally:
                tell_agent(ended.set)

        threading.Thread(target=thread_main, name="storagefs", daemon=True).start()
        try:
            async with trio.open_nursery() as waiter:

                async def on_mount() -> None:
                    await mounted.wait()
                    task_status.started()

                waiter.start_soon(on_mount)
                await ended.wait()
                waiter.cancel_scope.cancel()
            if outcome:
                raise outcome[0]
            log.warning("storagefs: %s was unmounted from outside", mountpoint)
        finally:
            if not ended.is_set():
                for fn in stop:
                    with contextlib.suppress(trio.RunFinishedError):
                        fn()
                with trio.CancelScope(shield=True), trio.move_on_after(STOP_GRACE):
                    await ended.wait()

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

    async def _serve_lock(self, key: int, req: FileRequest) -> tuple[int, tuple[int, ...]]:
        """A peer's lock request, decided on the storagefs thread (where the table lives).

        No worker thread waits meanwhile: the call is started there as a task and its
        outcome handed back (a blocked lock waits up to ``locks.WAIT_SLICE`` there).
        """
        manager, fs_token = self.locks, self._fs_token
        if manager is None or fs_token is None:
            return errno.ENOLCK, ()
        agent_token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        result: list[outcome.Outcome[tuple[int, tuple[int, ...]]]] = []

        async def decide() -> None:
            try:
                result.append(await outcome.acapture(manager.serve_peer, key, req))
            finally:
                with contextlib.suppress(trio.RunFinishedError):
                    agent_token.run_sync_soon(done.set)

        def start() -> None:
            trio.lowlevel.spawn_system_task(decide)

        try:
            fs_token.run_sync_soon(start)
        except trio.RunFinishedError:
            return errno.ENOLCK, ()
        await done.wait()
        return result[0].unwrap() if result else (errno.EIO, ())

    async def job_tmp(self, job_id: str, env: dict[str, str], cwd: str) -> str | None:
        """The folder a job gets as /tmp on every host (see ``JOB_TMP_ENV``), or None.

        Made through the mount in a worker thread (never from the agent's loop: the mount
        may need that loop for the peers' part of a folder).
        """
        mount = str(self.agent.config.storagefs_mount)
        asked = env.get(JOB_TMP_ENV, "")
        if asked.startswith("/") or asked in SWITCHED_OFF:
            return None  # a job started from inside a job keeps that job's /tmp
        if not asked and not (self.serving and (cwd == mount or cwd.startswith(mount + "/"))):
            return None
        if not self.serving:
            raise DunixError(f"{JOB_TMP_ENV}: no storagefs on {self.agent.config.name}")
        folder = f"{mount}/{JOBS_FOLDER}/{job_id}/tmp"

        def make() -> None:
            os.makedirs(folder, mode=0o755)
            os.chmod(folder, 0o1777)

        await trio.to_thread.run_sync(make)
        return folder

    async def drop_job_tmp(self, folder: str | None) -> None:
        """Remove a job's /tmp folder (its job ended), whichever hosts hold its files."""
        if folder is None:
            return
        job_dir = os.path.dirname(folder)

        def drop() -> None:
            shutil.rmtree(job_dir, ignore_errors=True)

        with trio.CancelScope(shield=True), trio.move_on_after(30):
            await trio.to_thread.run_sync(drop, abandon_on_cancel=True)

    def peer_gone(self, node_id: int) -> None:
        """Membership declared a peer dead or gone."""
        if self.locks is not None and self._fs_token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self._fs_token.run_sync_soon(self.locks.release_node, node_id)
        if self.resolver is not None:
            self.resolver.peer_gone(node_id)
        if self.files is not None:
            self.files.peer_gone(node_id)
        if self._bulk_client is not None and self._fs_token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self._fs_token.run_sync_soon(self._bulk_client.forget, node_id)
        if self.server is not None:
            self.server.peer_gone(node_id)
        if self.replicas is not None:
            self.replicas.peer_gone(node_id)
