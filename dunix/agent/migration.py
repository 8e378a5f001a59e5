"""`dunix migrate`: moving a running guest between nodes while its home sees nothing.

Three agents take part (see ``dunix/wire/migrate.py`` for the messages):

* the **home** (where the deputy is) takes the request, keeps a spare duplicate of every
  fd its deputy relays (so no relay closing on the way can make a reader see EOF), orders
  the move from the node that runs the process, and afterwards re-points its relays from
  the old node to the new one: an output stream is re-opened on the new link only after
  the old one has ended (the source's copy is dead and its pipe drained), so every byte
  arrives once and in order; the target holds the rest in its pipe meanwhile;
* the **source** checks the process may move (before freezing: CPU features, the
  target's answer), has its tracer let go (CRIU must be the only tracer), dumps it with
  ``dunix.migrate.driver.move`` into a tmpfs folder, streams the images to the target and
  lets CRIU kill its copy only once the target runs it (any failure: CRIU thaws it and the
  tracer takes it back); what the source does with its copy after the restore is the
  ``after_restore`` of :func:`move_process` (kill it for a guest; a process at home will
  become a deputy in place);
* the **target** restores it in the job's context with ``inherit_fd``: one new pipe per
  relayed pipe, whose other end it relays to the home's same streams; its tracer takes
  the process over, and its exit status reaches the home's deputy as ``RemoteExited``.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import fcntl
import functools
import itertools
import logging
import os
import secrets
import shutil
import signal
import socket
import stat
import tempfile
import termios
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from dunix.agent import lazymove
from dunix.agent.drain import flush
from dunix.agent.jobs import Job, Proc
from dunix.agent.remote import Deputy, Guest
from dunix.agent.storage import JOB_TMP_ENV, JOBS_FOLDER, job_tmp_wrapper
from dunix.agent.tracer import JobContext, Tracer
from dunix.errors import (
    AccessDenied,
    DunixError,
    MigrationFailed,
    NoSuchNode,
    NoSuchProcess,
    PeerUnreachable,
    error_from_wire,
)
from dunix.fdmove import Outcome, StreamEndpoint, StreamHub
from dunix.fdmove.inventory import inventory
from dunix.fdmove.pidfd import pidfd_getfd
from dunix.loadbalance import MemberState
from dunix.migrate import driver, relayed_files, sockets, swrk
from dunix.migrate.cpufeatures import CpuFeatures
from dunix.migrate.eligibility import cpu_reason, require_movable
from dunix.pid import split_gpid
from dunix.wire.jobs import RemoteExited
from dunix.wire.migrate import (
    MigrateAbort,
    MigrateAnswer,
    MigrateDone,
    MigrateImage,
    MigrateLost,
    MigrateOrder,
    MigratePhase,
    MigratePipe,
    MigratePrepare,
    MigrateQuery,
    MigrateReply,
    MigrateRestore,
    MigrateSocket,
    MigrateStatus,
    MigrateTail,
)

if TYPE_CHECKING:
    from dunix.agent.daemon import Agent

log = logging.getLogger("dunix.agent.migration")

#: where images are written and received: tmpfs, never a disk
IMAGES_ROOT = Path("/run/dunix/migrate")
#: the whole move, as the home waits for it
MOVE_TIMEOUT = 60.0
#: one step between source and target (prepare, restore)
STEP_TIMEOUT = 30.0
IMAGE_CHUNK = 1024 * 1024
#: while waiting for a peer's answer, how often to look whether it is still there
LIVENESS_PERIOD = 0.25
#: test knob: while this file exists in the agent's runtime folder, its restores are
#: answered with failure at ``post-restore`` (CRIU then kills what it restored)
FAIL_RESTORE_KNOB = "migrate-fail-restore"
#: test knob: while this file exists there, post-copy restores are refused as if this
#: host had no userfaultfd (the source then moves the process with a plain dump)
FAIL_LAZY_KNOB = "migrate-fail-lazy"

AfterRestore = Callable[[int], Awaitable[None]]

#: criu leads a new session, which a shell-job restore gives the restored process: the
#: agent's own session leader is outside this host's PID namespace, and CRIU refuses to
#: dump a process whose session leader it cannot see (cr-dump.c), so a second move would fail
RESTORE_COMMAND = swrk.CriuCommand(preexec_fn=os.setsid)


@dataclass
class _Outgoing:
    """The source's view of one move: answers from the target arrive here."""

    move: str
    target: str
    answers: trio.MemorySendChannel[MigrateStatus]
    inbox: trio.MemoryReceiveChannel[MigrateStatus]
    ready: bool = False
    streams: tuple[tuple[int, int], ...] = ()
    nbytes: int = 0
    started: float = 0.0  # time.monotonic() when the dump was asked for
    sent: float = 0.0  # seconds from then until every image was on the link


@dataclass
class _Incoming:
    """The target's view of one move."""

    move: str
    source: str
    prepare: MigratePrepare
    folder: Path
    dir_fd: int
    restored_pid: int = 0
    aborted: bool = False
    files: dict[str, int] = field(default_factory=dict)


@dataclass
class _Tail:
    """Target: a relayed socket's or pipe's input, held until the source sent the bytes
    the process had not read."""

    hub: StreamHub
    stream: int  # on the link with the home
    fd: int  # our socketpair end, or the write end of the process's new pipe
    guest: Guest
    data: bytearray = field(default_factory=bytearray)
    complete: trio.Event = field(default_factory=trio.Event)
    aborted: bool = False  # the move failed: the process runs on at the source


def _relayed_sockets(
    guest: Guest, fds: list[Any], home: str, target: str
) -> list[tuple[MigrateSocket, int]]:
    """The sockets of a guest that is to move, each with its fd: only the ones relayed
    through its home (a socketpair end here), and not back home; else why not."""
    held = [f for f in fds if f.kind == "socket"]
    relayed = {inode: (out, into) for inode, out, into, _ in guest.sockets}
    alone = [f for f in held if f.inode not in relayed]
    if alone:  # it connected here: only a process at home has its connections relayed
        what = ", ".join(f"fd {f.fd}" for f in alone)
        raise MigrationFailed(f"cannot move: holds a socket away from home ({what})")
    if held and target == home:
        raise MigrationFailed(
            "cannot move home: it holds a connection relayed through its home, and the "
            "bytes relayed to it that it has not read cannot be put back into that "
            "connection's queue there"
        )
    out = []
    for f in held:
        o, i = relayed[f.inode]
        out.append((MigrateSocket(f.inode, False, bool(f.flags & os.O_NONBLOCK), o, i), f.fd))
    return out


def _input_pipes(guest: Guest, fds: list[Any]) -> list[tuple[int, int, StreamEndpoint | None]]:
    """The relayed pipes a guest reads: (stream, the process's fd or -1, our relay into
    it or None), for what it had not read to follow it (``sockets.send_pipe_tail``)."""
    by_inode = {f.inode: f.fd for f in fds if f.kind == "pipe" and f.readable}
    relays = {e.stream: e for e in guest.receivers}
    return [
        (stream, by_inode.get(inode, -1), relays.get(stream))
        for stream, inode, writable in guest.pipes
        if not writable
    ]


def job_tmp_of(pid: int) -> str:
    """The job's shared /tmp of ``pid`` as a path under the storagefs mount
    ("/.dunix-jobs/JOB/tmp"), read from what is mounted on /tmp in its mount namespace;
    "" without one (agent/storage.py ``job_tmp_wrapper``)."""
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    found = ""
    for line in lines:  # mount id, parent, dev, root, mount point, ...: the last wins
        fields = line.split()
        if len(fields) > 4 and fields[4] == "/tmp":
            found = fields[3] if fields[3].startswith(f"/{JOBS_FOLDER}/") else ""
    return found


def restore_command(agent: Agent, tmp: str) -> swrk.CriuCommand:
    """criu for a restore here: with the job's /tmp bound, as its tracers start (a
    mount namespace of its own, which the restored tree keeps), when it has one."""
    if not tmp:
        return RESTORE_COMMAND
    if ".." in tmp.split("/") or not tmp.startswith(f"/{JOBS_FOLDER}/"):
        raise MigrationFailed(f"not a job's /tmp: {tmp!r}")
    # no stat of it here: the agent's loop serves that mount (mount(8) fails if missing)
    folder = f"{agent.config.storagefs_mount}{tmp}"
    prefix = job_tmp_wrapper({JOB_TMP_ENV: folder}, [])
    return dataclasses.replace(RESTORE_COMMAND, prefix=tuple(prefix))


class RemoteTarget:
    """``driver.Target`` over the job links: the target is another agent."""

    def __init__(self, service: MigrationService, out: _Outgoing, prepare: MigratePrepare):
        self.service = service
        self.out = out
        self.prepare_msg = prepare

    async def _ask(self, msg: Any, step: str) -> MigrateStatus:
        target = self.out.target
        await self.service.links.send(target, msg)
        deadline = trio.current_time() + STEP_TIMEOUT
        while trio.current_time() < deadline:
            with trio.move_on_after(LIVENESS_PERIOD):
                status = await self.out.inbox.receive()
                if status.error_kind:
                    raise MigrationFailed(f"{target}: {status.error}")
                if status.step != step:
                    raise MigrationFailed(f"{target} answered {status.step}, not {step}")
                return status
            gone = await self.service.peer_gone(target)
            if gone:  # a dead target costs a probe, not the step timeout
                raise MigrationFailed(f"{target} is gone ({gone}) while asked to {step}")
        raise MigrationFailed(f"{target} did not answer ({step}) in {STEP_TIMEOUT} s")

    async def prepare(self, pid: int) -> None:
        if self.out.ready:
            return  # asked before freezing already (CPU, pid, space)
        if not self.prepare_msg.tmp:
            tmp = job_tmp_of(pid)
            if tmp:
                self.prepare_msg = dataclasses.replace(self.prepare_msg, tmp=tmp)
        try:
            await self._ask(self.prepare_msg, "ready")
        except PeerUnreachable as exc:
            raise MigrationFailed(f"{self.out.target} unreachable: {exc}") from None
        self.out.ready = True

    async def send(self, images_dir_fd: int) -> None:
        move, target = self.out.move, self.out.target
        try:
            for name in sorted(os.listdir(f"/proc/self/fd/{images_dir_fd}")):
                if name.endswith(".log"):
                    continue
                fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=images_dir_fd)
                try:
                    offset = 0
                    while True:
                        data = os.pread(fd, IMAGE_CHUNK, offset)
                        image = MigrateImage(move, name, offset, data)
                        await self.service.links.send(target, image)
                        offset += len(data)
                        self.out.nbytes += len(data)
                        self.out.sent = time.monotonic() - self.out.started
                        if len(data) < IMAGE_CHUNK:
                            break
                finally:
                    os.close(fd)
        except PeerUnreachable as exc:
            raise MigrationFailed(f"{target} unreachable while sending images: {exc}") from None

    async def restore(self, images_dir_fd: int) -> int:
        try:
            status = await self._ask(MigrateRestore(self.out.move, 0, self.out.nbytes), "restored")
        except PeerUnreachable as exc:
            raise MigrationFailed(f"{self.out.target} unreachable: {exc}") from None
        self.out.streams = status.streams
        return status.pid

    async def abort(self, pid: int) -> None:
        with contextlib.suppress(DunixError):
            await self.service.links.send(self.out.target, MigrateAbort(self.out.move, "aborted"))


def _guest_pipes(guest: Guest) -> tuple[MigratePipe, ...]:
    return tuple(MigratePipe(inode, writable, stream) for stream, inode, writable in guest.pipes)


def _phases(report: driver.MoveReport, sent: float) -> tuple[MigratePhase, ...]:
    ms = 1000.0
    # post-copy: the source serves pages until the target has them all, then dies
    last = "source killed" if report.transfer is None else "post-copy: pages follow"
    return (
        MigratePhase("frozen", round(report.freeze_seconds * ms, 1)),
        MigratePhase("dumped", round(report.dump_seconds * ms, 1)),
        MigratePhase("sent", round(sent * ms, 1)),
        MigratePhase("restored", round((report.freeze_seconds + report.downtime_seconds) * ms, 1)),
        MigratePhase(last, round(report.total_seconds * ms, 1)),
    )


class MigrationService:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._ids = itertools.count(1)
        self._outgoing: dict[str, _Outgoing] = {}
        self._incoming: dict[str, _Incoming] = {}
        self._done: dict[str, trio.MemorySendChannel[MigrateDone]] = {}
        #: move id → {stream on the old link: (duplicate of the deputy's fd, it writes)}
        self._spares: dict[str, dict[int, tuple[int, bool]]] = {}
        #: (job, home pid) of a process moved back home → its deputy's fds, as above
        self._home_fds: dict[tuple[str, int], dict[int, tuple[int, bool]]] = {}
        #: target: (move, in stream) of a relayed socket whose unread bytes the source
        #: still sends (``MigrateTail``) before the home's stream may be written into it
        self._tails: dict[tuple[str, int], _Tail] = {}
        #: pid → the post-copy transfer of its copy here (gone from it once the copy is)
        self.serving: dict[int, trio.Event] = {}

    @property
    def links(self) -> Any:
        return self.agent.job_links

    async def peer_gone(self, peer: str) -> str:
        """Why ``peer`` cannot answer any more, or "" while it may: membership says it
        is dead or left, or it is suspect and its agent's port refuses a connection (an
        agent that died on a live host; a slow one is only suspect, and still listens)."""
        if peer == self.name:
            return ""
        try:
            member = self.agent.membership.member(peer)
        except NoSuchNode:
            return "not a member"
        if member.state in (MemberState.DEAD, MemberState.LEFT):
            return f"membership: {member.state.value}"
        if member.state is not MemberState.SUSPECT:
            return ""
        host, _, port = member.address.rpartition(":")
        with trio.move_on_after(1.0):
            try:
                stream = await trio.open_tcp_stream(host.strip("[]"), int(port))
            except OSError as exc:
                return f"suspect, and its agent refused a connection: {exc}"
            await stream.aclose()
        return ""

    @property
    def remote(self) -> Any:
        return self.agent.remote

    @property
    def name(self) -> str:
        return self.agent.config.name

    # -- entry: any agent ---------------------------------------------------------------

    async def request(self, gpid: int, node: str, uid: int | None) -> MigrateReply:
        """Move ``gpid`` to ``node`` for ``uid`` (None: an administrator)."""
        agent = self.agent
        node_id, _ = split_gpid(gpid)
        if node_id == agent.node_id:
            return await self.migrate_from_home(gpid, node, uid)
        peer = agent.peer_by_node_id(node_id)
        if peer is None:
            raise NoSuchProcess(f"gpid {gpid}: its home node (id {node_id}) is not alive")

        def query(q: int) -> MigrateQuery:
            return MigrateQuery(q, gpid, node, -1 if uid is None else uid)

        answers, _ = await agent.queries.ask([peer], query, MOVE_TIMEOUT)
        answer = answers.get(peer[0])
        if answer is None:
            raise PeerUnreachable(f"{peer[0]} (the home of gpid {gpid}) did not answer")
        if answer.error_kind:
            raise error_from_wire(answer.error_kind, answer.error)
        assert answer.reply is not None
        return answer.reply  # type: ignore[no-any-return]

    def on_query(self, sender_address: str, q: MigrateQuery) -> None:
        async def answer() -> None:
            try:
                reply = await self.migrate_from_home(q.gpid, q.node, None if q.uid < 0 else q.uid)
            except DunixError as exc:
                msg = MigrateAnswer(q.query, None, type(exc).__name__, str(exc))
            else:
                msg = MigrateAnswer(q.query, reply, "", "")
            self.agent.send_peer(sender_address, msg)

        self.agent.nursery.start_soon(answer)

    # -- home side ----------------------------------------------------------------------

    async def migrate_from_home(self, gpid: int, node: str, uid: int | None) -> MigrateReply:
        proc = self.agent.jobs.find_home_pid(gpid)
        if uid is not None and uid != 0 and uid != proc.uid:
            raise AccessDenied(f"uid {uid} may not move gpid {gpid} (owned by {proc.uid})")
        target = self.name if node in ("home", self.name) else node
        if proc.state != "deputy":  # it runs here: it leaves a deputy (agent/homemove.py)
            from dunix.agent.homemove import home_moves

            if target == self.name:
                raise MigrationFailed(f"gpid {gpid} already runs on {target}")
            return await home_moves(self).migrate(proc, target)
        deputy: Deputy | None = self.remote.deputies.get((proc.job, proc.pid))
        if deputy is None or deputy.conn is None:
            raise MigrationFailed(f"gpid {gpid} is still starting on {proc.node}")
        source = deputy.peer
        if target == source:
            raise MigrationFailed(f"gpid {gpid} already runs on {target}")
        if target != self.name and target not in {n for n, _ in self.agent.alive_peers()}:
            raise NoSuchNode(f"{target} is not an alive node")
        if deputy.moving:
            raise MigrationFailed(f"gpid {gpid} is moving already")
        deputy.moving = True
        # writes: the process writes it (a receiver here)
        spares = {
            e.stream: (e.duplicate(), not e.sending)
            for e in deputy.senders + deputy.receivers
            if e.running
        }
        spares.update(self._home_fds.pop((proc.job, proc.pid), {}))  # it runs here now
        move = f"{self.name}-{next(self._ids)}-{secrets.token_hex(3)}"
        send, receive = trio.open_memory_channel[MigrateDone](1)
        self._done[move] = send
        self._spares[move] = spares  # a move home restores onto these directly
        started = time.monotonic()
        try:
            features = self.agent.features
            order = MigrateOrder(move, proc.job, proc.pid, target, features.flags, features.level)
            await self.links.send(source, order)
            done: MigrateDone | None = None
            deadline = trio.current_time() + MOVE_TIMEOUT
            while done is None and trio.current_time() < deadline:
                with trio.move_on_after(LIVENESS_PERIOD):
                    done = await receive.receive()
                gone = "" if done is not None else await self.peer_gone(source)
                if gone:  # the process was lost with it, or runs on the target unknown
                    raise MigrationFailed(f"{source} (moving gpid {gpid}) is gone ({gone})")
            if done is None:
                raise MigrationFailed(f"{source} did not finish the move in {MOVE_TIMEOUT} s")
            if done.error_kind:
                raise error_from_wire(done.error_kind, done.error)
            assert done.reply is not None
            if target == self.name:
                await self._came_home(deputy, done.reply.pid, spares)
            else:
                await self._repoint(deputy, source, target, done.streams, spares)
        except BaseException:
            if source == self.name:  # it still runs here on them
                self._home_fds[(proc.job, proc.pid)] = dict(spares)
            else:
                for fd, _ in spares.values():
                    os.close(fd)
            self._release_exit(deputy)
            raise
        finally:
            self._done.pop(move, None)
            self._spares.pop(move, None)
        proc.moves += 1
        proc.node = target
        log.info("gpid %d moved %s → %s (%d moves)", gpid, source, target, proc.moves)
        total = (time.monotonic() - started) * 1000.0
        reply = done.reply
        phases = (*reply.phases, MigratePhase("repointed", round(total, 1)))
        return MigrateReply(
            gpid, source, target, reply.pid, phases, reply.freeze_ms, reply.downtime_ms,
            round(total, 1), reply.image_bytes, proc.moves,
        )  # fmt: skip

    async def _repoint(
        self,
        deputy: Deputy,
        source: str,
        target: str,
        streams: tuple[tuple[int, int], ...],
        spares: dict[int, tuple[int, bool]],
    ) -> None:
        """Point the deputy's relays at ``target``: an output once its old stream ended
        (or at once when the process wrote straight into the deputy's pipe at home)."""
        hub: StreamHub = await self.links.hub(target)
        old_ends = {e.stream: e for e in deputy.receivers + deputy.senders}
        receivers: list[StreamEndpoint] = []
        senders: list[StreamEndpoint] = []
        for stream, new in streams:
            old = old_ends.pop(stream, None)
            entry = spares.pop(stream, None)
            if entry is None:
                if old is not None:
                    old.stop()
                continue
            spare, writes = entry
            if old is not None and writes:
                with trio.move_on_after(MOVE_TIMEOUT) as waited:
                    await old.wait()  # the source's copy is dead: its pipe drains, then EOF
                if waited.cancelled_caught:
                    log.warning("stream %d from %s did not end in %s s: cut", stream, source,
                                MOVE_TIMEOUT)  # fmt: skip
            if old is not None and not writes:
                # an input: all it read reaches the source, which sends on what the
                # process had not read (MigrateTail) before the target relays the new one
                old.end()
            elif old is not None:
                old.stop()
            if writes:
                # (a shared pipe is reopened, its fd closed; a socket keeps it until we yield)
                is_socket = stat.S_ISSOCK(os.fstat(spare).st_mode)
                receivers.append(hub.open_receiver(new, spare, shared=True))
                if is_socket:
                    half_close(self.agent, deputy, receivers[-1], spare)
            else:
                senders.append(hub.open_sender(new, spare, shared=True))
        for old in old_ends.values():
            old.stop()
        for fd, _ in spares.values():
            os.close(fd)
        spares.clear()
        deputy.receivers, deputy.senders = receivers, senders
        deputy.peer = target
        deputy.proc.node = target
        self._release_exit(deputy)

    async def _came_home(
        self, deputy: Deputy, pid: int, spares: dict[int, tuple[int, bool]]
    ) -> None:
        """The process was restored here (stopped, as CRIU dumped it) on the deputy's own
        pipes: let it run once what the old node's relays still carried is written."""
        for old in deputy.receivers:
            with trio.move_on_after(MOVE_TIMEOUT):
                await old.wait()
        for old in deputy.senders:
            old.stop()  # bytes it had sent to the source and the process had not read are lost
        # kept while it runs here: a move away relays them again (closed when it ends)
        self._home_fds[(deputy.proc.job, deputy.proc.pid)] = dict(spares)
        spares.clear()
        deputy.receivers, deputy.senders = [], []
        deputy.peer = self.name
        deputy.proc.node = self.name
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        self._release_exit(deputy)

    def _release_exit(self, deputy: Deputy) -> None:
        deputy.moving = False
        if deputy.held_exit is not None:
            deputy.status, deputy.held_exit = deputy.held_exit, None
            deputy.exited.set()

    # -- source side --------------------------------------------------------------------

    def _on_order(self, home: str, order: MigrateOrder) -> None:
        async def run() -> None:
            try:
                reply, streams = await self._move_guest(home, order)
            except DunixError as exc:
                log.warning("move %s of %s/%d failed: %s", order.move, order.job,
                            order.home_pid, exc)  # fmt: skip
                done = MigrateDone(order.move, None, (), type(exc).__name__, str(exc))
            else:
                done = MigrateDone(order.move, reply, streams, "", "")
            with contextlib.suppress(DunixError):
                await self.links.send(home, done)

        self.agent.nursery.start_soon(run)

    async def _move_guest(
        self, home: str, order: MigrateOrder
    ) -> tuple[MigrateReply, tuple[tuple[int, int], ...]]:
        guest: Guest | None = self.remote.guests.get((order.job, order.home_pid))
        job = self.agent.jobs.jobs.get(f"{order.job}/{order.home_pid}")
        if guest is None or job is None or not guest.pid or guest.tracer is None:
            raise NoSuchProcess(f"{order.job}/{order.home_pid} does not run on {self.name}")
        pid, tracer = guest.pid, guest.tracer
        if len(self.agent.jobs.of(job)) > 1:
            raise MigrationFailed("it has child processes here; moving a tree is not wired yet")
        origin = CpuFeatures(order.origin_level, order.origin_flags)
        member = self.agent.membership.member(order.target)
        seen = CpuFeatures(member.load.cpu_level, member.load.cpu_flags)
        reason = cpu_reason(origin, seen, order.target)
        if reason is not None:
            raise MigrationFailed(f"cannot move: {reason}")
        require_movable(pid, allowed_tracers={tracer.pid})
        fds = inventory(pid)
        relayed = _relayed_sockets(guest, fds, home, order.target)
        from dunix.agent.homemove import _foreign_nulls  # homemove imports this module

        # in a job's own mount namespace (its /tmp) the /dev/null the agent gave it lies
        # on a mount that namespace does not show: an external, as for a home move
        nulls: tuple[str, ...] = ()
        if swrk.CriuCommand.dumping(pid).prefix:  # only then: a plain guest as before
            try:
                nulls = _foreign_nulls(pid, fds)
            except OSError as exc:  # an fd gone meanwhile: the next try sees it settled
                raise MigrationFailed(f"cannot move: its fds changed ({exc})") from exc
        proc = self.agent.jobs.procs.get(pid)
        prepare = MigratePrepare(
            move=order.move, job=order.job, home=home, home_pid=order.home_pid,
            gpid=proc.gpid if proc else 0, pid=pid, uid=job.uid, gid=job.gid,
            groups=job.groups, mode=job.mode, cmd=proc.cmd if proc else "",
            origin_flags=order.origin_flags, origin_level=order.origin_level,
            pipes=_guest_pipes(guest), moves=(proc.moves if proc else 0) + 1, nulls=nulls,
            sockets=tuple(m for m, _ in relayed),
        )  # fmt: skip

        async def kill_source(pid: int) -> None:
            # CRIU kills the frozen copy once post-dump is answered: its death here is not
            # the process's exit, so this guest ends without a word to the home
            guest.moved = True

        # the unread bytes of each relayed socket are read here after the move (CRIU does
        # not restore a queue into an inherited socket): a duplicate of the process's end
        tails: list[tuple[int, int]] = []
        # likewise what its input pipes hold here, and what their relays still carry:
        # the pipe CRIU restores on the target is a new one, empty (at home it read the
        # deputy's own pipe, whose content the home's new relay takes on)
        away = order.target != home and home != self.name
        inputs = _input_pipes(guest, fds) if away else []
        try:
            if relayed or inputs:
                pidfd = os.pidfd_open(pid)
                try:
                    for m, fd in relayed:
                        tails.append((m.in_stream, pidfd_getfd(pidfd, fd)))
                    inputs = [
                        (stream, pidfd_getfd(pidfd, fd) if fd >= 0 else -1, receiver)
                        for stream, fd, receiver in inputs
                    ]
                finally:
                    os.close(pidfd)
            for _, _, receiver in inputs:  # the guest's end here must not stop them
                if receiver is not None:
                    guest.receivers.remove(receiver)
            report, out = await move_process(
                self, pid, order.target, prepare, tracer, kill_source, lazy_ok=True
            )
        except BaseException:
            for _, dup in tails:
                os.close(dup)
            for _, dup, receiver in inputs:
                if dup >= 0:
                    os.close(dup)
                if receiver is not None:
                    guest.receivers.append(receiver)
            raise
        if tails:
            self.agent.nursery.start_soon(self._send_tails, order.target, order.move, tails)
        for stream, dup, receiver in inputs:
            self.agent.nursery.start_soon(
                self._send_pipe_tail, order.target, order.move, stream, dup, receiver
            )
        self.agent.nursery.start_soon(_end_senders, guest.senders)
        if proc is not None:
            self.agent.jobs.procs.pop(pid, None)
        job.status = 0
        job.finished.set()
        sent = out.sent or report.dump_seconds
        reply = MigrateReply(
            gpid=prepare.gpid, source=self.name, target=order.target, pid=report.restored_pid,
            phases=_phases(report, sent), freeze_ms=round(report.freeze_seconds * 1000, 1),
            downtime_ms=round(report.downtime_seconds * 1000, 1),
            total_ms=round(report.total_seconds * 1000, 1), image_bytes=out.nbytes,
            moves=prepare.moves,
        )  # fmt: skip
        return reply, out.streams

    # -- target side --------------------------------------------------------------------

    def _on_prepare(self, source: str, prep: MigratePrepare) -> None:
        async def run() -> None:
            status = MigrateStatus(prep.move, "ready", 0, (), "", "")
            try:
                # coming back while its post-copy pages still leave from here: its frozen
                # copy holds the pid until the last page was served
                await lazymove.wait_served(self.serving, prep.pid, STEP_TIMEOUT)
                self._check_prepare(prep)
                IMAGES_ROOT.mkdir(parents=True, exist_ok=True)
                folder = Path(tempfile.mkdtemp(prefix=f"in-{prep.move}-", dir=IMAGES_ROOT))
                dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                self._incoming[prep.move] = _Incoming(prep.move, source, prep, folder, dir_fd)
            except (DunixError, OSError) as exc:
                kind = type(exc).__name__ if isinstance(exc, DunixError) else "MigrationFailed"
                status = MigrateStatus(prep.move, "ready", 0, (), kind, str(exc))
            with contextlib.suppress(DunixError):
                await self.links.send(source, status)

        self.agent.nursery.start_soon(run)

    def _check_prepare(self, prep: MigratePrepare) -> None:
        origin = CpuFeatures(prep.origin_level, prep.origin_flags)
        reason = cpu_reason(origin, self.agent.features, self.name)
        if reason is not None:
            raise MigrationFailed(f"cannot move: {reason}")
        if Path(f"/proc/{prep.pid}").exists():
            raise MigrationFailed(f"pid {prep.pid} is in use on {self.name}")
        if prep.move in self._incoming:
            raise MigrationFailed(f"move {prep.move} is known already")

    def _on_image(self, msg: MigrateImage) -> None:
        inc = self._incoming.get(msg.move)
        if inc is None or inc.aborted:
            return
        fd = inc.files.get(msg.name)
        if fd is None:
            if "/" in msg.name or msg.name.startswith("."):
                inc.aborted = True
                return
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            fd = inc.files[msg.name] = os.open(msg.name, flags, 0o600, dir_fd=inc.dir_fd)
        os.pwrite(fd, msg.data, msg.offset)

    def _on_restore(self, source: str, msg: MigrateRestore) -> None:
        inc = self._incoming.get(msg.move)

        async def run() -> None:
            if inc is None or inc.aborted:
                why = f"{self.name} has no images for move {msg.move}"
                status = MigrateStatus(msg.move, "restored", 0, (), "MigrationFailed", why)
            else:
                status = await self._restore(inc)
            with contextlib.suppress(DunixError):
                await self.links.send(source, status)

        self.agent.nursery.start_soon(run)

    async def _restore(self, inc: _Incoming) -> MigrateStatus:
        prep = inc.prepare
        for fd in inc.files.values():
            os.close(fd)
        inc.files.clear()
        ours: list[tuple[MigratePipe, int]] = []  # (pipe, the end this agent relays)
        theirs: list[tuple[str, int]] = []  # inherit_fd: (pipe:[INODE], the process's end)
        # back home: straight onto the deputy's own fds (CRIU reopens them with the
        # process's flags), stopped until the old relays have delivered what they hold
        home = self._spares.get(inc.move) if prep.home == self.name else None
        back_home: list[tuple[int, int, bool]] = []  # its pipes, when restored at home
        daemon: lazymove.TargetDaemon | None = None  # post-copy: its pages' fetcher
        relayed: list[tuple[MigrateSocket, int, int]] = []  # (socket, our end, its inode)
        try:
            for sk in prep.sockets:  # the connection stays at home: a socketpair here
                mine, its = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                its.setblocking(not sk.nonblock)
                relayed.append((sk, mine.detach(), os.fstat(its.fileno()).st_ino))
                theirs.append((f"socket:[{sk.inode}]", its.detach()))
            tcp = {sk.inode for sk in prep.sockets if sk.tcp}
            if tcp:  # dumped with tcp_close: its image entry becomes a unix socket's
                sockets.rewrite_images(inc.dir_fd, tcp)
            # a file it only writes comes as a pipe: CRIU must not seek it nor check it
            relayed_files.rewrite_images(inc.dir_fd, [p.key for p in prep.pipes if p.key])
            for pipe in prep.pipes:
                key = pipe.key or f"pipe:[{pipe.inode}]"
                if home is not None:
                    entry = home.get(pipe.stream)
                    if entry is not None:
                        theirs.append((key, os.dup(entry[0])))
                        back_home.append((pipe.stream, os.fstat(entry[0]).st_ino, pipe.writable))
                    continue
                r, w = os.pipe2(os.O_CLOEXEC)
                ours.append((pipe, r if pipe.writable else w))
                theirs.append((key, w if pipe.writable else r))
            for key in prep.nulls:  # a home process's external /dev/null (homemove.py)
                theirs.append((key, os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)))
            fail = (self.agent.config.control.parent / FAIL_RESTORE_KNOB).exists()

            async def notify(note: swrk.Notification) -> bool:
                return not (fail and note.script == "post-restore")

            knob = self.agent.config.control.parent / FAIL_LAZY_KNOB
            if prep.lazy is not None and knob.exists():
                raise MigrationFailed(f"lazy pages refused ({FAIL_LAZY_KNOB} is set)")

            async def start_daemon() -> None:  # while the restore's criu starts up
                nonlocal daemon
                daemon = await lazymove.start_daemon(
                    prep, self._host_of(inc.source), inc.dir_fd, IMAGES_ROOT
                )

            result = await swrk.restore(
                inc.dir_fd, inherit_fd=theirs, rst_sibling=True, shell_job=True, notify=notify,
                lazy_pages=prep.lazy is not None,
                ready=start_daemon if prep.lazy is not None else None,
                command=restore_command(self.agent, prep.tmp), tcp_close=bool(tcp),
            )  # fmt: skip
        except (DunixError, OSError) as exc:
            if daemon is not None:
                await daemon.daemon.kill()
                daemon.close()
            for _, fd in ours:
                os.close(fd)
            for _, fd, _ in relayed:
                os.close(fd)
            self._forget_incoming(inc)
            # rst_sibling: a tree CRIU restored and then killed (post-restore refused) is
            # our child; unreaped, it would keep the pid busy for the next try
            self.agent.nursery.start_soon(_reap, prep.pid)
            return MigrateStatus(inc.move, "restored", 0, (), "MigrationFailed", str(exc))
        finally:
            for _, fd in theirs:
                os.close(fd)
        inc.restored_pid = result.pid
        if daemon is not None:
            lost = functools.partial(self._lost, prep)
            self.agent.nursery.start_soon(lazymove.watch, daemon, result.pid, lost)
        guest = Guest(prep.job, prep.home, prep.home_pid, pid=result.pid)
        # CRIU restores the stop the source's release made (the task state is in the
        # images): the tracer reports it when it seizes; that stop is not the job's
        guest.stopped_by_home = True
        guest.pipes += back_home
        streams = []
        hub = await self.links.hub(prep.home) if ours or relayed else None
        for pipe, fd in ours:
            assert hub is not None
            new = hub.allocate()
            inode = os.fstat(fd).st_ino
            if pipe.writable:
                guest.senders.append(hub.open_sender(new, fd))
            elif inc.source == prep.home:
                guest.receivers.append(hub.open_receiver(new, fd))
            else:  # from a peer: what it had not read comes first (MigrateTail)
                self._tails[(inc.move, pipe.stream)] = _Tail(hub, new, fd, guest)
                self.agent.nursery.start_soon(self._relay_after_tail, (inc.move, pipe.stream))
            guest.pipes.append((new, inode, pipe.writable))
            streams.append((pipe.stream, new))
        for sk, fd, its_inode in relayed:
            assert hub is not None
            out, into = hub.allocate(), hub.allocate()
            guest.senders.append(hub.open_sender(out, fd))
            if inc.source == prep.home:  # from home: the connection's queue is there
                guest.receivers.append(hub.open_receiver(into, os.dup(fd)))
            else:  # from a peer: what it had not read comes first (MigrateTail)
                tail = _Tail(hub, into, os.dup(fd), guest)
                self._tails[(inc.move, sk.in_stream)] = tail
                self.agent.nursery.start_soon(self._relay_after_tail, (inc.move, sk.in_stream))
            guest.sockets.append((its_inode, out, into, sk.nonblock))
            streams += [(sk.out_stream, out), (sk.in_stream, into)]
        self._forget_incoming(inc, keep=True)
        self.agent.nursery.start_soon(self._host_guest, guest, prep)
        return MigrateStatus(inc.move, "restored", result.pid, tuple(streams), "", "")

    def _host_of(self, node: str) -> str:
        """``node``'s host address, as membership knows it (no port)."""
        host, _, _ = self.agent.membership.member(node).address.rpartition(":")
        return host.strip("[]")

    async def _lost(self, prep: MigratePrepare, reason: str) -> None:
        """A post-copy move lost the process (lazymove.watch): its home says so in ps."""
        proc = self.agent.jobs.procs.get(prep.pid)
        if proc is not None:
            proc.state = f"lost: {reason}"
        msg = MigrateLost(prep.job, prep.home_pid, reason)
        if prep.home == self.name:  # moved back home: the deputy is here
            self._on_lost(msg)
        else:
            await self.links.send(prep.home, msg)

    def _on_lost(self, msg: MigrateLost) -> None:
        """Home: the process was lost in a post-copy move; its SIGKILL exit follows."""
        deputy: Deputy | None = self.remote.deputies.get((msg.job, msg.home_pid))
        if deputy is not None:
            deputy.proc.state = f"lost: {msg.reason}"
        log.warning("%s/%d lost: %s", msg.job, msg.home_pid, msg.reason)

    def _on_abort(self, msg: MigrateAbort) -> None:
        for key, tail in list(self._tails.items()):
            if key[0] == msg.move:
                tail.aborted = True
                tail.complete.set()
        inc = self._incoming.get(msg.move)
        if inc is None:
            return
        inc.aborted = True
        if inc.restored_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(inc.restored_pid, signal.SIGKILL)
            self.agent.nursery.start_soon(_reap, inc.restored_pid)
        self._forget_incoming(inc)

    def _forget_incoming(self, inc: _Incoming, *, keep: bool = False) -> None:
        for fd in inc.files.values():
            os.close(fd)
        inc.files.clear()
        if not keep:
            self._incoming.pop(inc.move, None)
        with contextlib.suppress(OSError):
            os.close(inc.dir_fd)
        shutil.rmtree(inc.folder, ignore_errors=True)

    async def _host_guest(self, guest: Guest, prep: MigratePrepare) -> None:
        """Run a restored guest here as if it had been started here: signals from its
        home reach it, its tracer follows it, its exit goes home after its output."""
        pid = guest.pid
        key = (prep.job, prep.home_pid)
        job = Job(f"{prep.job}/{prep.home_pid}", prep.uid, prep.gid, prep.groups, prep.mode,
                  first_pid=pid, guest=(prep.home, prep.job, prep.gpid))  # fmt: skip
        proc = Proc(pid, prep.job, prep.uid, prep.home, prep.gpid, "guest", cmd=prep.cmd,
                    key=job.id, moves=prep.moves)  # fmt: skip
        self.agent.jobs.jobs[job.id] = job
        self.agent.jobs.procs[pid] = proc
        self.remote.guests[key] = guest
        self._incoming.pop(prep.move, None)
        status = 0x7F00 | signal.SIGKILL
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            pidfd = -1
        try:
            async with trio.open_nursery() as nursery:
                tracer = await self._trace(guest, job, prep, nursery)
                guest.tracer = tracer
                if pidfd >= 0:
                    await trio.lowlevel.wait_readable(pidfd)
                    _, status = os.waitpid(pid, 0)  # rst_sibling: the restored root is ours
                if not guest.moved and not guest.orphaned:
                    await flush(guest.senders)
                nursery.cancel_scope.cancel()
        finally:
            if pidfd >= 0:
                os.close(pidfd)
            if not guest.moved:  # ended here at home: the deputy's duplicates go now
                for fd, _ in self._home_fds.pop(key, {}).values():
                    os.close(fd)
            self.agent.jobs.forget(job)
            if self.remote.guests.get(key) is guest:
                self.remote.guests.pop(key, None)
            # moved: a socket's input relay ends when the home ends its stream, after it
            # wrote what was on the way (the source reads it back as the socket's tail)
            into = {i for _, _, i, _ in guest.sockets} if guest.moved else set()
            for endpoint in guest.receivers:
                if endpoint.stream not in into:
                    endpoint.stop()
        if guest.moved or guest.orphaned:
            return
        with contextlib.suppress(DunixError):
            await self.links.send(prep.home, RemoteExited(prep.job, prep.home_pid, status))

    async def _trace(
        self, guest: Guest, job: Job, prep: MigratePrepare, nursery: trio.Nursery
    ) -> Tracer | None:
        """A tracer for this job here that seizes the restored process (its execs are
        then placed as before; without a tracer its seccomp filter fails them)."""
        seize = getattr(Tracer, "seize", None)
        if seize is None:
            log.warning("pid %d of job %s runs untraced on %s: the tracer has no seize yet",
                        guest.pid, prep.job, self.name)  # fmt: skip
            if prep.home != self.name:
                os.kill(guest.pid, signal.SIGCONT)
            return None
        try:
            cwd = os.readlink(f"/proc/{guest.pid}/cwd")
        except OSError:
            cwd = "/"
        ctx = JobContext(prep.uid, prep.gid, prep.groups, 0o022, cwd, {}, mode=prep.mode,
                         extra=("--first-local", "--keep-pgrp"))  # fmt: skip
        tracer = Tracer.spawn(ctx, ["/bin/sleep", "infinity"], {})  # a placeholder first
        job.tracers.append(tracer)
        first = trio.Event()
        holder: list[int] = []

        def on_started(event: Any) -> None:
            holder.append(event.pid)
            first.set()

        self.agent.jobs.on_started[job.id] = on_started
        nursery.start_soon(self.agent.jobs.follow, job, tracer, prep.cmd)
        try:
            with trio.move_on_after(STEP_TIMEOUT):
                await first.wait()
            await seize(tracer, guest.pid)
        except (DunixError, OSError) as exc:
            log.warning("the tracer on %s could not take pid %d: %s", self.name, guest.pid, exc)
        finally:
            if prep.home != self.name:  # at home it goes on once the old relays drained
                with contextlib.suppress(ProcessLookupError):
                    os.kill(guest.pid, signal.SIGCONT)
            self.agent.jobs.on_started.pop(job.id, None)
            for placeholder in holder:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(placeholder, signal.SIGKILL)
        return tracer

    # -- a relayed socket's unread bytes ---------------------------------------------------

    async def _send_tails(self, target: str, move: str, tails: list[tuple[int, int]]) -> None:
        """Source, after a move: send what each relayed socket's end held for the dead copy
        here (until EOF, which comes once the home ended its old stream and our relay wrote
        all it carried), then ``last``."""
        for stream, fd in tails:
            sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
            try:
                with trio.move_on_after(MOVE_TIMEOUT):
                    while data := await sock.recv(IMAGE_CHUNK):
                        await self.links.send(target, MigrateTail(move, stream, data, False))
            except (OSError, DunixError) as exc:
                log.warning("move %s: the unread bytes of stream %d: %s", move, stream, exc)
            finally:
                sock.close()
            with contextlib.suppress(DunixError):
                await self.links.send(target, MigrateTail(move, stream, b"", True))

    async def _send_pipe_tail(
        self, target: str, move: str, stream: int, fd: int, relay: StreamEndpoint | None
    ) -> None:
        """Source, after a move: send what the process's input pipe here holds and what
        our relay into it still writes (the home ends the old stream once it re-pointed
        it; ``StreamEndpoint.end``), read from a duplicate of the process's read end,
        then ``last``. The relay may wait on a full pipe: read while it runs."""
        sent = 0
        try:
            if fd >= 0:
                os.set_blocking(fd, False)  # the copy it shares the description with is dead
                with trio.move_on_after(MOVE_TIMEOUT) as waited:
                    while True:
                        done = relay is None or relay.finished.is_set()
                        try:
                            data = os.read(fd, IMAGE_CHUNK)
                        except BlockingIOError:
                            data = None
                        if data:
                            await self.links.send(target, MigrateTail(move, stream, data, False))
                            sent += len(data)
                            continue
                        if data == b"" or done:
                            break
                        with trio.move_on_after(0.05):
                            await trio.lowlevel.wait_readable(fd)
                if waited.cancelled_caught:
                    log.warning("move %s: stream %d did not end in %s s: its rest is cut",
                                move, stream, MOVE_TIMEOUT)  # fmt: skip
        except (OSError, DunixError) as exc:
            log.warning("move %s: the unread bytes of pipe stream %d: %s", move, stream, exc)
        finally:
            if fd >= 0:
                os.close(fd)
            if relay is not None:
                relay.stop()
        if sent:
            log.info("move %s: %d bytes the process had not read follow it (stream %d)",
                     move, sent, stream)  # fmt: skip
        with contextlib.suppress(DunixError):
            await self.links.send(target, MigrateTail(move, stream, b"", True))

    def _on_tail(self, msg: MigrateTail) -> None:
        tail = self._tails.get((msg.move, msg.stream))
        if tail is None:
            return
        tail.data += msg.data
        if msg.last:
            tail.complete.set()

    async def _relay_after_tail(self, key: tuple[str, int]) -> None:
        """Target: write a relayed socket's tail into our end, then relay the home's new
        stream into it (the home's sender waits for the receiver's opening credit)."""
        tail = self._tails[key]
        try:
            with trio.move_on_after(MOVE_TIMEOUT) as waited:
                await tail.complete.wait()
            if waited.cancelled_caught:
                log.warning("move %s: no end of the unread bytes of stream %d", *key)
            if tail.data and not tail.aborted:
                log.info("move %s: %d bytes it had not read go first (stream %d)", key[0],
                         len(tail.data), key[1])  # fmt: skip
                stream: trio.abc.SendStream
                if stat.S_ISSOCK(os.fstat(tail.fd).st_mode):
                    sock = socket.socket(fileno=os.dup(tail.fd))
                    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
                else:  # a pipe's write end (FdStream makes the description non-blocking)
                    stream = trio.lowlevel.FdStream(os.dup(tail.fd))
                try:
                    await stream.send_all(bytes(tail.data))
                except trio.BrokenResourceError as exc:
                    log.warning("move %s: writing the unread bytes: %s", key[0], exc)
                finally:
                    await stream.aclose()
        finally:
            self._tails.pop(key, None)
            if tail.aborted:
                os.close(tail.fd)
            else:
                tail.guest.receivers.append(tail.hub.open_receiver(tail.stream, tail.fd))

    # -- dispatch -----------------------------------------------------------------------

    def on_peer_message(self, sender: str, msg: Any) -> None:
        """Migration messages from peer ``sender`` on the job links, in link order."""
        if isinstance(msg, MigrateImage):
            self._on_image(msg)
        elif isinstance(msg, MigrateStatus):
            out = self._outgoing.get(msg.move)
            if out is not None:
                with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
                    out.answers.send_nowait(msg)
        elif isinstance(msg, MigratePrepare):
            self._on_prepare(sender, msg)
        elif isinstance(msg, MigrateRestore):
            self._on_restore(sender, msg)
        elif isinstance(msg, MigrateAbort):
            self._on_abort(msg)
        elif isinstance(msg, MigrateLost):
            self._on_lost(msg)
        elif isinstance(msg, MigrateTail):
            self._on_tail(msg)
        elif isinstance(msg, MigrateOrder):
            self._on_order(sender, msg)
        elif isinstance(msg, MigrateDone):
            done = self._done.get(msg.move)
            if done is not None:
                with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
                    done.send_nowait(msg)


async def _end_senders(senders: list[StreamEndpoint]) -> None:
    """End the relays of a moved process's output here once its pipes are empty.

    Its copy here is dead, but another holder of a pipe's write end (the tracer keeps
    the job's fds until the first process runs) would hold the EOF back, and the home
    re-points an output only after the old stream ended."""

    async def end(sender: StreamEndpoint) -> None:
        if not sender.running:
            return
        fd = sender.duplicate()
        try:
            with trio.move_on_after(MOVE_TIMEOUT):
                while sender.running and _unread(fd):
                    await trio.sleep(0.01)
        finally:
            os.close(fd)
        sender.stop()

    async with trio.open_nursery() as nursery:
        for sender in list(senders):
            nursery.start_soon(end, sender)


def half_close(agent: Agent, deputy: Deputy, receiver: StreamEndpoint, fd: int) -> None:
    """The home's relay of a moved process's output into its connection (socket ``fd``)
    is opened shared, so that its stream's end does not shut the connection down when a
    move ends the old stream. The process's own shutdown(SHUT_WR) or exit (an end while
    no move is under way) is passed on here: the peer sees EOF. An end that comes during
    a move waits for it: the move's own end is the old stream's, whose receiver the move
    then replaced (``_repoint``; this task may run before or after that)."""
    sock = socket.socket(fileno=fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0))

    async def watch() -> None:
        try:
            outcome = await receiver.wait()
            while deputy.moving:
                await trio.sleep(LIVENESS_PERIOD)
            if outcome is Outcome.EOF and receiver in deputy.receivers:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
        finally:
            sock.close()

    agent.nursery.start_soon(watch)


def _unread(fd: int) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return buf[0]


async def _reap(pid: int, timeout: float = 5.0) -> None:
    """Collect ``pid`` if it is (or becomes, within ``timeout``) a dead child of ours."""
    with trio.move_on_after(timeout):
        while True:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return
            if done:
                return
            await trio.sleep(0.05)


async def move_process(
    service: MigrationService,
    pid: int,
    target_node: str,
    prepare: MigratePrepare,
    tracer: Tracer,
    after_restore: AfterRestore,
    *,
    lazy_ok: bool = False,
) -> tuple[driver.MoveReport, _Outgoing]:
    """Move ``pid`` (traced by ``tracer`` here) to ``target_node``.

    Asks the target first (before freezing), has the tracer let go, dumps with the swrk
    driver into tmpfs and streams the images; ``after_restore(pid)`` runs once the
    target confirmed the restore, before CRIU's post-dump answer (a guest: nothing, CRIU
    kills the copy; a process at home: turn it into a deputy). On failure the process
    runs here again, traced as before, and ``MigrationFailed`` says why.

    ``lazy_ok``: post-copy when ``lazymove.wanted`` (large enough, lazy pages work
    here); the report then comes at the restore, while the pages still travel, and a
    post-copy failure before the commit is tried once more with a plain dump.
    """
    lazy_plan = None
    if lazy_ok and lazymove.wanted(pid):
        lazy_plan = lazymove.source_plan(IMAGES_ROOT, prepare.move)
    if lazy_plan is not None:
        prepare = dataclasses.replace(prepare, lazy=lazy_plan.wire)
    send, receive = trio.open_memory_channel[MigrateStatus](4)
    out = _Outgoing(prepare.move, target_node, send, receive)
    service._outgoing[out.move] = out
    target = RemoteTarget(service, out, prepare)
    folder: Path | None = None
    deferred = False  # post-copy: the source's criu still serves from the folder
    try:
        await target.prepare(pid)  # refused before freezing: CPU, busy pid, no space
        IMAGES_ROOT.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f"out-{out.move}-", dir=IMAGES_ROOT))
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            release = getattr(tracer, "release", None)
            if release is None:
                raise MigrationFailed("the tracer cannot release a process yet (no `release`)")
            await release(pid)
            try:
                out.started = time.monotonic()
                report = await _move_with_hook(
                    pid, dir_fd, target, after_restore, lazy_plan, service.agent.nursery
                )
                if lazy_plan is not None:
                    assert report.transfer is not None
                    service.serving[pid] = report.transfer.done
                    done = functools.partial(shutil.rmtree, folder, ignore_errors=True)
                    service.agent.nursery.start_soon(
                        lazymove.after_transfer, report, lazy_plan, done, service.serving
                    )
                    deferred = True
            except MigrationFailed:
                with contextlib.suppress(DunixError, OSError):
                    await tracer.seize(pid)  # type: ignore[attr-defined]
                raise
        finally:
            os.close(dir_fd)
    except MigrationFailed as exc:
        with contextlib.suppress(DunixError):
            await service.links.send(target_node, MigrateAbort(out.move, "failed"))
        if lazy_plan is None or not lazymove.is_lazy_failure(exc):
            raise
        log.warning("post-copy move %s failed, trying a plain dump: %s", out.move, exc)
        retry = dataclasses.replace(prepare, lazy=None)
        service._outgoing.pop(out.move, None)
        return await move_process(service, pid, target_node, retry, tracer, after_restore)
    finally:
        service._outgoing.pop(out.move, None)
        if lazy_plan is not None and not deferred:
            lazy_plan.close()
        if folder is not None and not deferred:
            shutil.rmtree(folder, ignore_errors=True)
    return report, out


async def _move_with_hook(
    pid: int,
    dir_fd: int,
    target: RemoteTarget,
    after_restore: AfterRestore,
    lazy_plan: lazymove.SourcePlan | None = None,
    background: driver.Spawner | None = None,
) -> driver.MoveReport:
    class Hooked:
        async def prepare(self, pid: int) -> None:
            await target.prepare(pid)

        async def send(self, images_dir_fd: int) -> None:
            await target.send(images_dir_fd)

        async def restore(self, images_dir_fd: int) -> int:
            restored = await target.restore(images_dir_fd)
            await after_restore(pid)
            return restored

        async def abort(self, pid: int) -> None:
            await target.abort(pid)

    # external /dev/null (homemove._foreign_nulls) and relayed sockets' ends (sockets.py)
    nulls = target.prepare_msg.nulls + sockets.dump_externals(target.prepare_msg.sockets)
    if lazy_plan is not None and background is not None:
        return await driver.move_lazy(pid, dir_fd, Hooked(), lazy_plan.plan, background,
                                      shell_job=True, external=nulls,
                                      phase_timeout=STEP_TIMEOUT)  # fmt: skip
    return await driver.move(pid, dir_fd, Hooked(), shell_job=True, external=nulls,
                             phase_timeout=STEP_TIMEOUT)  # fmt: skip
