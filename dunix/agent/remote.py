"""Processes that run away from home: the deputy side and the guest side of a remote exec.

Home (this node created the process): the tracer redirected an exec to the deputy and
said so (``WentRemote``, at the exec event, before the deputy runs); while the deputy
connects, the agent duplicates its fds (pidfd_getfd), reads what exec keeps (ids, umask,
signal masks, limits, cwd, environment) from /proc, sends ``RemoteExec`` to the peer and
relays the fds as streams. Only when the peer says the
program runs does the deputy get ``ready`` (and close its fds); if the peer cannot start it,
the deputy is told to end with status 127 and says why on its stderr... never silently.

Guest (a peer sent ``RemoteExec``): recreate each fd (pipes relayed to the home, files
reopened by path and offset, null devices reopened), start the program under a tracer in
the job's context, answer ``RemoteStarted``, and after it ends send ``RemoteExited`` once
its output streams are drained, so the home's deputy ends only after the data.

Job traffic rides on ``JobLinks``: one reliable, ordered channel per peer (gossip, which
tolerates loss, keeps its own links).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import stat
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from dunix.agent.drain import flush
from dunix.agent.jobs import Job, Proc
from dunix.agent.storage import storagefs_cwd
from dunix.agent.tracer import JobContext, Started, Stopped, Tracer, WarmTracer, WentRemote
from dunix.errors import DunixError, PeerUnreachable
from dunix.fdmove import BulkRelay, StreamEndpoint, StreamHub, odd_side
from dunix.fdmove.deputy import DeputyConnection
from dunix.fdmove.inventory import (
    FdInfo,
    SignalState,
    blocked_readers,
    inventory,
    movable,
    proc_status,
    read_proc_bytes,
    rlimits,
)
from dunix.fdmove.openas import open_as
from dunix.fdmove.pidfd import pidfd_getfd, pidfd_open
from dunix.fdmove.streams import StreamEnd, StreamGone
from dunix.fdmove.ttyrelay import GuestTerminal, HomeTerminal
from dunix.wire import Channel, open_channel
from dunix.wire.jobs import (
    RemoteExec,
    RemoteExited,
    RemoteFailed,
    RemoteFd,
    RemoteSignal,
    RemoteStarted,
    RemoteStopped,
    RemoteTtyMode,
    RemoteWinsize,
)

if TYPE_CHECKING:
    from dunix.agent.daemon import Agent

log = logging.getLogger("dunix.agent.remote")

JOB_MESSAGES = (
    RemoteExec, RemoteStarted, RemoteFailed, RemoteSignal, RemoteStopped, RemoteExited,
    RemoteTtyMode, RemoteWinsize,
)  # fmt: skip
HELLO_TIMEOUT = 10.0
START_TIMEOUT = 15.0
#: the longest a closed stream's final StreamGone waits for another write to its peer
DEFER_MAX = 0.5
#: how long a guest's start waits to be told home with its end (a remote /bin/true runs
#: ~1-1.5 ms under its tracer on a 0.5-CPU host); the home's deputy gets `ready` then
START_LINGER = 0.003
#: the longest a StreamEnd waits for another write (a guest's RemoteExited comes ~0.3 ms
#: after its program's streams end): how much later a reader may see an EOF
DEFER_END = 0.002
WARM_TRACER_ENV = "DUNIX_WARM_TRACER"
#: null-like devices a guest's fd is reopened on without the user's rights (0666 everywhere;
#: a thread per open_as cost a remote /bin/true 0.6 ms of its 8)
NULL_DEVICES = frozenset({"/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"})


@dataclass
class _Batch:
    """Messages for one peer that go out in one write (``JobLinks.send_many``)."""

    msgs: list[Any]
    done: trio.Event = field(default_factory=trio.Event)
    error: DunixError | None = None


class JobLinks:
    """One reliable channel per peer for job traffic, and the stream hub riding on it."""

    def __init__(self, agent: Agent, nursery: trio.Nursery) -> None:
        self.agent = agent
        self.nursery = nursery
        self._channels: dict[str, Channel] = {}
        self._locks: dict[str, trio.Lock] = {}
        self._batches: dict[str, _Batch] = {}  # per peer: the batch waiting to be written
        #: per peer: messages that go with the next write (``_defer``), with their hub
        self._deferred: dict[str, list[tuple[StreamHub, Any]]] = {}
        self._timers: dict[str, trio.CancelScope] = {}  # per peer: when the deferred go
        self.hubs: dict[str, StreamHub] = {}
        self._hub_locks: dict[str, trio.Lock] = {}

    def address_of(self, peer: str) -> str:
        return str(self.agent.membership.member(peer).address)

    async def send(self, peer: str, msg: Any) -> None:
        if peer == self.agent.config.name:  # a guest moved back home: its deputy is here
            if isinstance(msg, JOB_MESSAGES):
                self.agent.remote.on_peer_message(peer, msg)
            else:
                self.agent.migration.on_peer_message(peer, msg)
            return
        await self.send_many(peer, (msg,))

    async def send_many(self, peer: str, msgs: Sequence[Any]) -> None:
        """Send ``msgs`` to ``peer`` in order, in one write with whatever else is sent to
        it meanwhile. The first sender of a batch writes it once it holds the link's lock;
        messages sent until then join it (the tasks of the same turn of trio's loop, or
        all that came while the previous write went out): a remote exec's home otherwise
        made five writes (five syscalls and TLS records), its guest four. One batch is
        open at a time and they are written in the order they opened, so the link keeps
        the order of the calls. A failed write fails every message of its batch; a
        message whose sender is cancelled once it is in a batch still goes out."""
        batch = self._batches.get(peer)
        if batch is not None:  # joins the batch whose writer waits for the lock
            batch.msgs.extend(msgs)
            await batch.done.wait()
        else:
            batch = self._batches[peer] = _Batch(list(msgs))
            lock = self._locks.setdefault(peer, trio.Lock())
            try:
                await lock.acquire()
            except BaseException:  # cancelled while waiting: what joined goes out anyway
                self.nursery.start_soon(self._write_later, peer, batch)
                raise
            try:
                await self._write(peer, batch)
            finally:
                lock.release()
                batch.done.set()
        if batch.error is not None:
            raise batch.error

    async def _write_later(self, peer: str, batch: _Batch) -> None:
        try:
            async with self._locks.setdefault(peer, trio.Lock()):
                await self._write(peer, batch)
        finally:
            batch.done.set()

    async def _write(self, peer: str, batch: _Batch) -> None:
        """Write ``batch`` (the caller holds the peer's lock); what is sent meanwhile
        gathers in the next batch. Shielded: other tasks' messages are in it; the connect
        has its timeout and the write Channel's ``SEND_GRACE``."""
        if self._batches.get(peer) is batch:
            del self._batches[peer]  # closed: later messages make the next batch
        msgs = [*self._take_deferred(peer), *batch.msgs]
        if not msgs:
            return
        with trio.CancelScope(shield=True):
            try:
                channel = self._channels.get(peer)
                if channel is None:
                    channel = await open_channel(
                        self.address_of(peer),
                        self.agent.identity,
                        hello_address=self.agent.config.address,
                        expect_name=peer,
                        timeout=self.agent.config.connect_timeout * 5,
                    )
                    self._channels[peer] = channel
            except DunixError as exc:
                batch.error = exc
                return
            try:
                if len(msgs) == 1:
                    await channel.send(msgs[0])
                else:
                    await channel.send_many(msgs)
            except DunixError as exc:
                batch.error = exc
                if self._channels.get(peer) is channel:
                    self._channels.pop(peer, None)
                hub = self.hubs.pop(peer, None)
                if hub is not None:
                    hub.link_lost()

    def _defer(self, peer: str, hub: StreamHub, msg: Any, within: float) -> None:
        """Send ``msg`` with the next write to ``peer``, at the latest ``within`` seconds
        from now, keeping its place: before anything sent after it.

        For a stream's final words, which cost a write of their own when sent at once
        (a syscall, a TLS record and a wake-up of the peer, per remote exec): a
        receiver's ``StreamGone`` once its stream is closed here (nobody acts on it:
        the sender has said its last word and only forgets the stream), and a sender's
        ``StreamEnd``, which a guest's ``RemoteExited`` follows at once."""
        batch = self._batches.get(peer)
        if batch is not None:  # what waits to be written was sent before it
            batch.msgs.append(msg)
            return
        self._deferred.setdefault(peer, []).append((hub, msg))
        due = trio.current_time() + within
        timer = self._timers.get(peer)
        if timer is None:
            timer = self._timers[peer] = trio.CancelScope(deadline=due)
            self.nursery.start_soon(self._send_deferred, peer, timer)
        elif due < timer.deadline:
            timer.deadline = due

    async def _send_deferred(self, peer: str, timer: trio.CancelScope) -> None:
        with timer:
            await trio.sleep_forever()
        if self._timers.get(peer) is timer:
            del self._timers[peer]
        if self._deferred.get(peer):
            with contextlib.suppress(DunixError):
                await self.send_many(peer, ())

    def _take_deferred(self, peer: str) -> list[Any]:
        """The deferred messages for ``peer``'s current hub (a replaced hub's streams are
        gone with its link)."""
        hub = self.hubs.get(peer)
        return [msg for owner, msg in self._deferred.pop(peer, ()) if owner is hub]

    def forget(self, peer: str) -> None:
        """``peer``'s host is gone: close its channel, and its relays end as lost."""
        channel = self._channels.pop(peer, None)
        if channel is not None:
            self.nursery.start_soon(channel.aclose)
        hub = self.hubs.pop(peer, None)
        if hub is not None:
            hub.link_lost()

    def _bulk(self, peer: str) -> BulkRelay | None:
        """The native relay for this link's big streams (dunix/fdmove/bulk.py)."""
        with contextlib.suppress(DunixError):
            return BulkRelay.for_link(self.agent.config.address, self.address_of(peer))
        return None

    async def hub(self, peer: str) -> StreamHub:
        # one at a time per peer: two tasks (a guest starting, a stream message arriving)
        # would each make a hub across the await, and streams opened on the one replaced
        # would be unknown to the one that gets the peer's messages
        async with self._hub_locks.setdefault(peer, trio.Lock()):
            hub = self.hubs.get(peer)
            if hub is None:

                async def send(msg: Any) -> None:
                    if isinstance(msg, StreamGone) and msg.stream not in new.mux:
                        self._defer(peer, new, msg, DEFER_MAX)  # nobody acts on it
                    elif isinstance(msg, StreamEnd):
                        self._defer(peer, new, msg, DEFER_END)
                    else:
                        await self.send(peer, msg)

                odd = odd_side(self.agent.config.name, peer)
                hub = new = StreamHub(send, odd=odd, bulk=self._bulk(peer))
                await self.nursery.start(hub.run)
                self.hubs[peer] = hub
        return hub


@dataclass
class Deputy:
    job: Job
    proc: Proc
    peer: str
    path: str
    started: trio.Event = field(default_factory=trio.Event)
    failed: str = ""
    exited: trio.Event = field(default_factory=trio.Event)
    status: int = 0
    receivers: list[StreamEndpoint] = field(default_factory=list)
    senders: list[StreamEndpoint] = field(default_factory=list)
    conn: DeputyConnection | None = None
    mirrored_stop: bool = False  # stopped because its guest stopped: do not echo it back
    #: the signal that stopped its guest before the deputy was ready (told to it then)
    guest_stop: int = 0
    moving: bool = False  # a `dunix migrate` is re-pointing it (agent/migration.py)
    held_exit: int | None = None  # an exit status that arrived while moving
    lost: str = ""  # why its guest is gone with its host (it ends as killed by SIGKILL)
    sent: trio.Event = field(default_factory=trio.Event)  # RemoteExec out (or failed)
    send_failed: str = ""  # why it was not sent: the deputy runs the program here
    attached: trio.Event = field(default_factory=trio.Event)  # its deputy said hello
    settled: trio.Event = field(default_factory=trio.Event)  # said hello, or ended first
    #: its regular files: fd -> a duplicate of the home's open file description, whose
    #: offset follows the guest's at its end (``RemoteExited.offsets``); closed with it
    files: dict[int, int] = field(default_factory=dict)
    offsets: tuple[tuple[int, int], ...] = ()
    #: what it writes, by pipe or open file: one stream each (see ``_describe``)
    outbound: dict[tuple[str, int, int, int], RemoteFd] = field(default_factory=dict)


@dataclass
class Guest:
    job: str
    home: str
    home_pid: int
    tracer: Tracer | None = None
    pid: int = 0
    senders: list[StreamEndpoint] = field(default_factory=list)
    receivers: list[StreamEndpoint] = field(default_factory=list)
    stopped_by_home: bool = False  # its deputy was stopped first: do not echo the stop
    #: relayed pipes: (stream, pipe inode, the program writes it): what a move re-creates
    pipes: list[tuple[int, int, bool]] = field(default_factory=list)
    moved: bool = False  # moved away: its end here is not its exit
    #: relayed sockets (migrate/sockets.py): (inode of the process's socketpair end, stream
    #: out, stream in, O_NONBLOCK): what a move dumps as external and re-creates
    sockets: list[tuple[int, int, int, bool]] = field(default_factory=list)
    orphaned: bool = False  # its home died: killed here, no exit status to send
    #: reopened regular files: (fd, a duplicate of the guest's description, start offset)
    files: list[tuple[int, int, int]] = field(default_factory=list)
    #: while it is being created: the write end made for each outbound stream, for a
    #: second fd of that stream (``2>&1``)
    writers: dict[int, int] = field(default_factory=dict)


STOP_SIGNALS = {signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU}


def _nul_list(raw: bytes) -> list[str]:
    return [p.decode("utf-8", "surrogateescape") for p in raw.split(b"\0")[:-1]]


class RemoteService:
    def __init__(self, agent: Agent, links: JobLinks) -> None:
        self.agent = agent
        self.links = links
        self.pending: dict[int, Deputy] = {}  # sent remote, its deputy not connected yet
        self._pending_events: dict[int, trio.Event] = {}
        self.deputies: dict[tuple[str, int], Deputy] = {}
        self.guests: dict[tuple[str, int], Guest] = {}
        #: terminals of remote processes (dunix.fdmove.ttyrelay), by (job, home pid), stream
        self.home_ttys: dict[tuple[str, int], dict[int, HomeTerminal]] = {}
        self.guest_ttys: dict[tuple[str, int], dict[int, GuestTerminal]] = {}
        #: serves a deputy the tracer's ``deputize`` made (agent/homemove.py)
        self.on_migrated: Callable[[int, DeputyConnection], Awaitable[None]] | None = None
        #: a guest's tracer, started before it is needed (one after the first remote exec)
        self.warm: WarmTracer | None = None
        #: per node declared dead or gone: (job, home pid) of the guests lost with it, which
        #: are killed there if it comes back (a host that was only cut off still runs them)
        self.lost_guests: dict[str, set[tuple[str, int]]] = {}

    # -- home side ----------------------------------------------------------------------

    def went_remote(self, job: Job, event: WentRemote) -> None:
        """The tracer redirected ``event.pid``'s exec to the deputy, which is about to run
        (the tracer says so at the exec event). What the program needs is taken and sent
        to the peer now, while the deputy starts and connects: it changes nothing before
        ``ready``, and waiting for its ``hello`` first cost every remote exec that time."""
        pid = event.pid
        proc = self.agent.jobs.procs.get(pid)
        if proc is None:
            proc = Proc(
                pid, job.id, job.uid, self.agent.config.name, self.agent.jobs.gpid(pid), key=job.id
            )
            self.agent.jobs.procs[pid] = proc
        deputy = Deputy(job, proc, event.node, event.path)
        self.deputies[(proc.job, pid)] = deputy  # before RemoteStarted can come
        self.pending[pid] = deputy
        self._pending_events.setdefault(pid, trio.Event()).set()
        self.agent.nursery.start_soon(self._send_exec, deputy)

    async def _send_exec(self, deputy: Deputy) -> None:
        """``RemoteExec`` to the peer, then the home's receivers; a failure is kept for the
        deputy's ``hello`` (it is then told to run the program here). A deputy that never
        connects (it died first) takes its guest with it."""
        pid, peer = deputy.proc.pid, deputy.peer
        sent = False
        try:
            request = await self._prepare(deputy)
            # the receivers' opening credits go in the same write as RemoteExec (the
            # guest keeps credit for a stream it has not opened yet): one TLS record
            hub = await self.links.hub(peer)
            opening: list[Any] = []
            fds = self._receiver_fds.get(pid, [])
            while fds:
                stream, fd = fds.pop(0)
                endpoint = hub.open_receiver(stream, fd, shared=True)
                deputy.receivers.append(endpoint)
                opening += endpoint.take_opening()
            try:
                await self.links.send_many(peer, [request, *opening])
            except DunixError as exc:
                deputy.send_failed = f"{peer} unreachable: {exc}"
                return
            sent = True
        except (DunixError, OSError, RuntimeError) as exc:  # the process is gone, a lost link
            if sent:  # it may run there: never a second run here
                deputy.lost = f"its output could not be relayed: {exc}"
                kill = RemoteSignal(deputy.proc.job, pid, signal.SIGKILL, True)
                await self._send_quietly(peer, kill)
            else:
                deputy.send_failed = f"cannot move: {exc}"
            return
        finally:
            for _, fd in self._receiver_fds.pop(pid, []):  # not handed to a relay
                os.close(fd)
            deputy.sent.set()
        with trio.move_on_after(HELLO_TIMEOUT):
            await deputy.settled.wait()
        if deputy.attached.is_set():
            return
        why = "ended before it connected" if deputy.settled.is_set() else "never connected"
        log.warning("pid %d: its deputy %s; its guest on %s is killed", pid, why, peer)
        key = (deputy.proc.job, pid)
        if self.pending.get(pid) is deputy:
            self.pending.pop(pid, None)
            self._pending_events.pop(pid, None)
        if self.deputies.get(key) is deputy:
            self.deputies.pop(key, None)
        self._end_home_ttys(key)
        for endpoint in deputy.senders + deputy.receivers:
            endpoint.stop()
        await self._send_quietly(peer, RemoteSignal(deputy.proc.job, pid, signal.SIGKILL, True))

    def exited(self, pid: int) -> None:
        """A traced process here ended. One whose deputy had not connected yet (a Ctrl-C
        or a kill in the moment after its exec) takes its guest with it now, not after
        ``HELLO_TIMEOUT``: its parent has its status already, and the guest's output kept
        the job's relays (and the job's end) waiting that long."""
        deputy = self.pending.get(pid)
        if deputy is not None and not deputy.attached.is_set():
            deputy.settled.set()

    async def serve_deputy(self, pid: int, conn: DeputyConnection) -> None:
        hello = await conn.recv()
        if hello is None or hello[:1] != ["hello"]:
            return
        if "migrated" in hello[2:] and self.on_migrated is not None:
            await self.on_migrated(pid, conn)  # its process was moved: no remote exec
            return
        waiting = self._pending_events.setdefault(pid, trio.Event())
        with trio.move_on_after(HELLO_TIMEOUT):
            await waiting.wait()
        self._pending_events.pop(pid, None)
        deputy = self.pending.pop(pid, None)
        if deputy is None:
            log.warning("deputy %d connected, but no job sent it remote", pid)
            await conn.send("exit", 127)
            return
        deputy.attached.set()
        deputy.settled.set()
        key = (deputy.proc.job, pid)
        try:
            await self._run_deputy(deputy, conn)
        finally:
            self.deputies.pop(key, None)
            self._end_home_ttys(key)
            for endpoint in deputy.senders + deputy.receivers:
                endpoint.stop()
            for dup in deputy.files.values():
                os.close(dup)
            deputy.files.clear()

    async def _run_deputy(self, deputy: Deputy, conn: DeputyConnection) -> None:
        pid, peer = deputy.proc.pid, deputy.peer
        await deputy.sent.wait()  # went_remote started it at the deputy's exec event
        if deputy.lost:
            await self._tell_deputy(conn, "killed", signal.SIGKILL)
            return
        if deputy.send_failed:
            await self._fail_home(deputy, conn, deputy.send_failed)
            return
        with trio.move_on_after(START_TIMEOUT):
            await deputy.started.wait()
        if deputy.lost:  # it may have started there: never a second run here
            await self._tell_deputy(conn, "killed", signal.SIGKILL)
            return
        if not deputy.started.is_set() or deputy.failed:
            await self._fail_home(deputy, conn, deputy.failed or f"{peer} did not start it")
            return
        deputy.proc.state, deputy.proc.node = "deputy", peer
        deputy.conn = conn
        key = (deputy.proc.job, pid)
        if deputy.exited.is_set() and not deputy.guest_stop and not self.home_ttys.get(key):
            # its guest ended before it was told to be ready (a short program's start
            # comes with its exit, START_LINGER): no `ready`, which had it close its fds
            # and set a handler per signal for nothing; it obeys `exit` before `ready`
            log.info("pid %d of job %s runs on %s as pid %d (ended)", pid, deputy.proc.job,
                     peer, deputy.proc.remote_pid)  # fmt: skip
            await self._end_deputy(deputy, conn)
            return
        for stream, term in self.home_ttys.get(key, {}).items():
            self.agent.nursery.start_soon(term.watch_size, self._winsize_sender(deputy, stream))
            if term.reads:
                self.agent.nursery.start_soon(term.pump_keys)
        await conn.send("ready")
        if deputy.guest_stop:
            # a program that stops itself at once (`kill -STOP $$`) did so before `ready`:
            # dropped, its parent's waitpid(WUNTRACED) waited for good (test_run's stops)
            deputy.mirrored_stop = True
            await self._tell_deputy(conn, "stop", deputy.guest_stop)
            deputy.guest_stop = 0
        log.info("pid %d of job %s runs on %s as pid %d", pid, deputy.proc.job, peer,
                 deputy.proc.remote_pid)  # fmt: skip
        await self.attend(deputy, conn)

    async def attend(self, deputy: Deputy, conn: DeputyConnection) -> None:
        """A running deputy's life: signals forwarded to its guest until the guest ended,
        its output drained, then the deputy told to end with the guest's exact status."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._forward_signals, deputy, conn, nursery.cancel_scope)
            await deputy.exited.wait()
            await self._end_deputy(deputy, conn)
            nursery.cancel_scope.cancel()

    async def _end_deputy(self, deputy: Deputy, conn: DeputyConnection) -> None:
        """Its guest has ended: its output drained, the deputy told to end with the
        guest's exact status."""
        if deputy.lost:  # nothing more comes from a dead host
            for endpoint in deputy.receivers:
                endpoint.stop()
        elif not await flush(deputy.receivers):
            log.info("pid %d: its output stopped moving; it ends without the rest",
                     deputy.proc.pid)  # fmt: skip
        self._end_home_ttys((deputy.proc.job, deputy.proc.pid))  # before its parent goes on
        follow_offsets(deputy.files, deputy.offsets)  # before its parent goes on, too
        status = deputy.status
        if os.WIFSIGNALED(status):
            await conn.send("killed", os.WTERMSIG(status))
        else:
            await conn.send("exit", os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)

    async def _forward_signals(
        self, deputy: Deputy, conn: DeputyConnection, cancel: trio.CancelScope
    ) -> None:
        while True:
            msg = await conn.recv()
            sig: int
            if msg is None:
                # the deputy died here (SIGKILL): the program dies there too
                sig = signal.SIGKILL
            elif msg[:1] == ["signal"] and len(msg) > 1:
                sig = int(msg[1])
            else:
                continue
            if deputy.exited.is_set():
                # its guest has ended: nobody there to signal (a deputy that ends at the
                # `exit` it was told hangs up here, which made a SIGKILL for nothing)
                if msg is None:
                    cancel.cancel()
                    return
                continue
            with contextlib.suppress(DunixError):
                await self.links.send(
                    deputy.peer, RemoteSignal(deputy.proc.job, deputy.proc.pid, sig, False)
                )
            if msg is None:
                cancel.cancel()
                return

    async def _fail_home(self, deputy: Deputy, conn: DeputyConnection, reason: str) -> None:
        log.warning("pid %d (%s) could not run on %s: %s", deputy.proc.pid, deputy.path,
                    deputy.peer, reason)  # fmt: skip
        for endpoint in deputy.senders + deputy.receivers:
            endpoint.stop()
        deputy.proc.state, deputy.proc.node = f"unmovable: {reason}", ""
        await conn.send("local", deputy.path)

    _receiver_fds: dict[int, list[tuple[int, int]]] = {}

    async def _prepare(self, deputy: Deputy) -> RemoteExec:
        pid, peer = deputy.proc.pid, deputy.peer
        # in a thread if its fds may be files on /dunix/fs, which this agent serves
        # (storagefs); else inline (a thread hand-off costs ~0.2 ms of a remote exec)
        if _fds_under(pid, str(self.agent.config.storagefs_mount)):
            held = await trio.to_thread.run_sync(inventory, pid)
        else:
            held = inventory(pid)
        fds = [f for f in held if f.kind != "socket"]  # its socket is the agent's
        reason = movable(fds)
        if reason:
            raise DunixError(reason)
        status = proc_status(pid)
        uid = int(status["Uid"].split()[0])
        gid = int(status["Gid"].split()[0])
        groups = tuple(int(g) for g in status.get("Groups", "").split())
        umask = int(status.get("Umask", "0022"), 8)
        signals = SignalState.from_status(status, pid)  # signal_state would read it again
        limits = tuple((r.resource, r.soft, r.hard) for r in rlimits(pid))
        argv = _nul_list(read_proc_bytes(f"/proc/{pid}/cmdline"))
        environ = _nul_list(read_proc_bytes(f"/proc/{pid}/environ"))
        env = tuple(tuple(e.split("=", 1)) for e in environ if "=" in e)
        cwd = storagefs_cwd(os.readlink(f"/proc/{pid}/cwd"))
        hub = await self.links.hub(peer)
        pidfd = pidfd_open(pid)
        remote_fds: list[RemoteFd] = []
        receivers: list[tuple[int, int]] = []
        try:
            for f in fds:
                remote_fds.append(self._describe(f, pidfd, hub, deputy, receivers))
        finally:
            os.close(pidfd)
        self._receiver_fds[pid] = receivers
        return RemoteExec(
            job=deputy.proc.job,
            home=self.agent.config.name,
            home_pid=pid,
            gpid=deputy.proc.gpid,
            path=deputy.path,
            argv=tuple(argv),
            env=env,  # type: ignore[arg-type]
            cwd=cwd,
            uid=uid,
            gid=gid,
            groups=groups,
            umask=umask,
            sigign=signals.ignored,
            sigblock=signals.blocked,
            rlimits=limits,
            fds=tuple(remote_fds),
            mode=deputy.job.mode,
        )

    def _describe(
        self,
        f: FdInfo,
        pidfd: int,
        hub: StreamHub,
        deputy: Deputy,
        receivers: list[tuple[int, int]],
    ) -> RemoteFd:
        path = f.path or ""
        if f.kind == "tty":
            return self._describe_tty(f, pidfd, hub, deputy, receivers)
        # a file it only writes (`> out`) shares one offset with the home's other writers
        # (the script, a parallel child elsewhere): its bytes come home as a pipe's do, so
        # they land at that offset; a copy reopened there would write over theirs
        written_here = f.written_only
        if f.kind in ("pipe", "fifo", "tty") or written_here:
            # a tty or read-write pipe end is relayed one way: in for fd 0, out otherwise
            inbound = f.readable and (not f.writable or f.fd == 0)
            # fds it writes into one pipe, or one file's description (`2>&1`), share a
            # stream and a pipe there: two streams would reorder what it wrote to each
            key = (f.kind, f.inode, f.pos, f.flags) if written_here else (f.kind, f.inode, 0, 0)
            same = None if inbound else deputy.outbound.get(key)
            if same is not None:
                return dataclasses.replace(same, fd=f.fd)
            stream = hub.allocate()
            dup = pidfd_getfd(pidfd, f.fd)
            if inbound:
                deputy.senders.append(hub.open_sender(stream, dup, shared=True))
            else:
                receivers.append((stream, dup))
            described = RemoteFd(f.fd, "pipe", stream, inbound, not inbound, path, 0, f.flags)
            if not inbound:
                deputy.outbound[key] = described
            return described
        if f.kind == "null":
            return RemoteFd(f.fd, "null", 0, f.readable, f.writable, path, 0, f.flags)
        if f.kind in ("file", "dir"):
            if f.kind == "file":
                deputy.files[f.fd] = pidfd_getfd(pidfd, f.fd)
            return RemoteFd(f.fd, "file", 0, f.readable, f.writable, path, f.pos, f.flags)
        raise DunixError(f"fd {f.fd} ({f.target}) cannot be recreated elsewhere")

    def _describe_tty(
        self,
        f: FdInfo,
        pidfd: int,
        hub: StreamHub,
        deputy: Deputy,
        receivers: list[tuple[int, int]],
    ) -> RemoteFd:
        """A terminal fd: one pty on the guest per terminal, its output one stream home
        and, when the program reads it (fd 0), the keys one stream there."""
        terms = self.home_ttys.setdefault((deputy.proc.job, deputy.proc.pid), {})
        path = f.path or ""
        for stream, term in terms.items():
            if term.path == path:
                return RemoteFd(f.fd, "tty", stream, f.readable, f.writable, path, 0, f.flags,
                                term.stream_in, term.modes, term.winsize)  # fmt: skip
        stream = hub.allocate()
        term = HomeTerminal(pidfd_getfd(pidfd, f.fd), reads=f.fd == 0, pid=deputy.proc.pid)
        term.path = path
        terms[stream] = term
        receivers.append((stream, pidfd_getfd(pidfd, f.fd)))
        if term.reads:
            term.stream_in = hub.allocate()
            deputy.senders.append(hub.open_sender(term.stream_in, term.keys_fd()))
        return RemoteFd(f.fd, "tty", stream, f.readable, f.writable, path, 0, f.flags,
                        term.stream_in, term.modes, term.winsize)  # fmt: skip

    def _winsize_sender(self, deputy: Deputy, stream: int) -> Callable[[bytes], Awaitable[None]]:
        async def send(winsize: bytes) -> None:
            msg = RemoteWinsize(deputy.proc.job, deputy.proc.pid, stream, winsize)
            await self._send_quietly(deputy.peer, msg)

        return send

    def _end_home_ttys(self, key: tuple[str, int]) -> None:
        for term in self.home_ttys.pop(key, {}).values():
            term.end()

    def on_peer_message(self, sender: str, msg: Any) -> None:
        """Job messages from peer ``sender`` (its node name), in link order."""
        if isinstance(msg, RemoteTtyMode):
            home_term = self.home_ttys.get((msg.job, msg.home_pid), {}).get(msg.stream)
            if home_term is not None:
                home_term.mirror(msg.termios)
            return
        if isinstance(msg, RemoteWinsize):
            guest_term = self.guest_ttys.get((msg.job, msg.home_pid), {}).get(msg.stream)
            if guest_term is not None:
                guest_term.resize(msg.winsize)
            return
        if isinstance(msg, RemoteExec):
            self._guest_exec(sender, msg)
        elif isinstance(msg, RemoteStopped):
            deputy = self.deputies.get((msg.job, msg.home_pid))
            if deputy is not None and deputy.conn is not None:
                deputy.mirrored_stop = True
                self.agent.nursery.start_soon(self._tell_deputy, deputy.conn, "stop", msg.signal)
            elif deputy is not None:  # it stopped before its deputy was ready: after `ready`
                deputy.guest_stop = msg.signal
        elif isinstance(msg, RemoteStarted | RemoteFailed | RemoteExited):
            deputy = self.deputies.get((msg.job, msg.home_pid))
            if deputy is None:
                return
            if isinstance(msg, RemoteStarted):
                deputy.proc.remote_pid = msg.pid
                deputy.started.set()
            elif isinstance(msg, RemoteFailed):
                deputy.failed = msg.reason
                deputy.started.set()
            elif deputy.moving:  # from the new node before the relays were re-pointed
                deputy.held_exit = msg.status
            else:
                deputy.status, deputy.offsets = msg.status, msg.offsets
                deputy.exited.set()
        elif isinstance(msg, RemoteSignal):
            guest = self.guests.get((msg.job, msg.home_pid))
            if guest is None or not guest.pid:
                return
            if msg.group:
                job = self.agent.jobs.jobs.get(f"{msg.job}/{msg.home_pid}")
                if job is not None:
                    self.signal_group(job, msg.signal)
                return
            # only a SIGSTOP comes from a deputy that stopped; a SIGTSTP/TTIN/TTOU it
            # caught and forwarded (Ctrl-Z) left it running: the guest's stop must stop it
            if msg.signal == signal.SIGSTOP:
                guest.stopped_by_home = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(guest.pid, msg.signal)

    async def _tell_deputy(self, conn: DeputyConnection, *fields: str | int) -> None:
        with contextlib.suppress(DunixError):
            await conn.send(*fields)

    def stopped(self, job: Job, event: Stopped) -> None:
        """A traced process stopped: mirror it across the home/guest pair it is part of."""
        if job.guest is not None:
            home, job_id, _ = job.guest
            if event.pid == job.first_pid:  # the guest itself: its deputy stops too
                home_pid = int(job.id.rsplit("/", 1)[1])
                guest = self.guests.get((job_id, home_pid))
                if guest is not None and guest.stopped_by_home:
                    guest.stopped_by_home = False
                    return
                msg = RemoteStopped(job_id, home_pid, event.signal)
                self.agent.nursery.start_soon(self._send_quietly, home, msg)
            return
        proc = self.agent.jobs.procs.get(event.pid)
        if proc is None or proc.state != "deputy":
            return
        deputy = self.deputies.get((proc.job, proc.pid))
        if deputy is None:
            return
        if deputy.mirrored_stop:
            deputy.mirrored_stop = False
            return
        # someone here stopped the deputy (kill -STOP $pid): the program stops there too
        stop = RemoteSignal(proc.job, proc.pid, signal.SIGSTOP, False)
        self.agent.nursery.start_soon(self._send_quietly, deputy.peer, stop)

    def signal_group(self, job: Job, sig: int) -> None:
        """Signal every process of ``job`` on this node once, and its guests elsewhere.

        A deputy is not signalled itself (it would forward the signal one process wide);
        its guest's whole part of the job is, through ``RemoteSignal(group=True)``.
        """
        for proc in self.agent.jobs.of(job):
            if proc.state == "deputy" and proc.node:
                msg = RemoteSignal(proc.job, proc.pid, sig, True)
                self.agent.nursery.start_soon(self._send_quietly, proc.node, msg)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)

    async def _send_quietly(self, peer: str, msg: Any) -> None:
        with contextlib.suppress(DunixError):
            await self.links.send(peer, msg)

    # -- a peer's host dies ---------------------------------------------------------------

    def member_changed(self, kind: str, node: str) -> None:
        """Membership news of ``node`` (daemon ``_publish``). Dead or left: the guests of
        this node's deputies died with it (each deputy ends as killed by SIGKILL, as the
        design's failure rule says) and the guests here whose home it was have no parent
        any more (killed). Alive again: the guests lost with it may still run there (it
        was cut off, not down): they are killed there."""
        if node == self.agent.config.name:
            return
        if kind in ("dead", "left"):
            reason = f"host {node} {'died' if kind == 'dead' else 'left'}"
            self.links.forget(node)
            for deputy in list(self.deputies.values()):
                if deputy.peer == node:
                    self.lose(deputy, reason)
            for key, guest in list(self.guests.items()):
                if guest.home == node:
                    self.orphan(key, guest, reason)
        elif kind == "alive":
            for job, home_pid in sorted(self.lost_guests.pop(node, set())):
                kill = RemoteSignal(job, home_pid, signal.SIGKILL, True)
                self.agent.nursery.start_soon(self._send_quietly, node, kill)

    def lose(self, deputy: Deputy, reason: str) -> None:
        """``deputy``'s guest is gone with its host: the deputy ends as killed by SIGKILL
        (its parent's wait() sees it), ps says why until it is reaped, its relays close."""
        if deputy.lost:
            return
        log.warning("pid %d of job %s is lost: %s", deputy.proc.pid, deputy.proc.job, reason)
        deputy.lost = reason
        deputy.proc.state = f"lost: {reason}"
        self.lost_guests.setdefault(deputy.peer, set()).add((deputy.proc.job, deputy.proc.pid))
        for endpoint in deputy.senders + deputy.receivers:
            endpoint.stop()
        self._end_home_ttys((deputy.proc.job, deputy.proc.pid))
        killed = signal.SIGKILL  # the raw wait status of a death by SIGKILL
        if not deputy.started.is_set():
            deputy.started.set()
        elif deputy.moving:  # the move fails on the source's death, then this applies
            deputy.held_exit = killed
        else:
            deputy.status = killed
            deputy.exited.set()

    def orphan(self, key: tuple[str, int], guest: Guest, reason: str) -> None:
        """A guest here whose home is gone: its parent and its deputy went with it, so it
        is killed with its part of the job here, and nothing is sent home."""
        log.warning("guest %s/%d is killed: its home is gone (%s)", key[0], key[1], reason)
        guest.orphaned = True
        job = self.agent.jobs.jobs.get(f"{key[0]}/{key[1]}")
        if job is not None:  # its tracer reports the deaths, then the job ends as usual
            self.agent.jobs.kill_job(job)
        if guest.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(guest.pid, signal.SIGKILL)
        for endpoint in guest.senders + guest.receivers:
            endpoint.stop()

    # -- guest side ---------------------------------------------------------------------

    def _guest_exec(self, home: str, req: RemoteExec) -> None:
        self.agent.nursery.start_soon(self._run_guest, home, req)

    async def _run_guest(self, home: str, req: RemoteExec) -> None:
        guest = Guest(req.job, home, req.home_pid)
        key = (req.job, req.home_pid)
        self.guests[key] = guest
        child_fds: dict[int, int] = {}
        try:
            # a job whose cwd is outside storagefs runs here only if this host sees it too
            # (a shared folder); else the home runs it and says why (RemoteFailed)
            if not await self._is_dir(req.cwd):
                raise DunixError(f"its working directory {req.cwd} is not on "
                                 f"{self.agent.config.name}")  # fmt: skip
            hub = await self.links.hub(home)
            for rf in req.fds:
                if rf.kind in ("tty", "pipe") or _null_device(rf):
                    child_fds[rf.fd] = self._recreate(rf, hub, guest, req)
                else:  # opened by path, maybe on /dunix/fs, served by this agent: not inline
                    child_fds[rf.fd] = await trio.to_thread.run_sync(
                        self._recreate, rf, hub, guest, req
                    )
            ttys = sorted(rf.fd for rf in req.fds if rf.kind == "tty")
            ctx = JobContext(
                uid=req.uid, gid=req.gid, groups=req.groups, umask=req.umask, cwd=req.cwd,
                env=dict(req.env), sigign=req.sigign, sigblock=req.sigblock,
                rlimits=req.rlimits, mode=req.mode,
                extra=("--first-local",),  # it was placed here: no second hop for this exec
            )  # fmt: skip
            if ttys:  # its pty is its controlling terminal, as the home's is the job's
                ctx = dataclasses.replace(ctx, extra=(*ctx.extra, "--ctty", str(ttys[0])))
            warm = self.warm
            tracer = Tracer.spawn(ctx, list(req.argv), child_fds, warm=warm)
            if warm is not None and warm.used:
                self.warm = None
        except (DunixError, OSError) as exc:
            if isinstance(exc, OSError):
                reason = f"{exc.strerror}: {exc.filename}" if exc.filename else str(exc.strerror)
            else:
                reason = str(exc)
            for endpoint in guest.senders + guest.receivers:
                endpoint.stop()
            moved_offsets(guest.files)  # closes its duplicates: nothing ran
            self.guests.pop(key, None)
            for term in self.guest_ttys.pop(key, {}).values():
                term.close()
            with contextlib.suppress(DunixError):
                await self.links.send(home, RemoteFailed(req.job, req.home_pid, reason or "?"))
            return
        finally:
            for fd in child_fds.values():
                os.close(fd)
            guest.writers.clear()
        guest.tracer = tracer
        for stream, term in self.guest_ttys.get(key, {}).items():
            term.spawned()
            self.agent.nursery.start_soon(term.pump)
            self.agent.nursery.start_soon(term.watch_modes, self._modes_sender(home, req, stream))
        with contextlib.suppress(OSError):
            await tracer.push_slots(self.agent.slot_table(req.mode))
            if req.mode == "auto":
                await tracer.push_spill(*self.agent.spill_table())
        job = Job(
            f"{req.job}/{req.home_pid}", req.uid, req.gid, req.groups, req.mode,
            guest=(home, req.job, req.gpid),
        )  # fmt: skip
        job.tracers.append(tracer)
        self.agent.jobs.jobs[job.id] = job
        status = 0x7F00 | signal.SIGKILL
        started: RemoteStarted | None = None  # not told yet (START_LINGER)
        try:
            async with trio.open_nursery() as nursery:
                first = trio.Event()

                def on_started(event: Started) -> None:
                    guest.pid = event.pid
                    first.set()

                self.agent.jobs.on_started[job.id] = on_started
                nursery.start_soon(self.agent.jobs.follow, job, tracer, req.argv[0])
                await first.wait()
                started = RemoteStarted(req.job, req.home_pid, guest.pid)
                # a program that ends at once (most of a script's commands) has its start
                # told with its end, in the write of its RemoteExited: one wake-up of its
                # home's agent less; a longer one is told after START_LINGER
                with trio.move_on_after(START_LINGER):
                    await job.finished.wait()
                if not job.finished.is_set():
                    told, started = started, None
                    await self.links.send(home, told)
                await job.finished.wait()
                status = job.status if job.status is not None else status
                if not guest.orphaned:
                    await flush(guest.senders)
                nursery.cancel_scope.cancel()
        except PeerUnreachable:
            log.warning("home %s of job %s is gone: killing its guest", home, req.job)
        finally:
            if guest.moved and guest.pid:  # CRIU killed our copy; the pid is not ours now
                self.agent.jobs.procs.pop(guest.pid, None)
            self.agent.jobs.on_started.pop(job.id, None)
            self.agent.jobs.kill_job(job)
            self.agent.jobs.forget(job)
            self.guests.pop(key, None)
            for endpoint in guest.receivers:
                endpoint.stop()
        for stream, term in self.guest_ttys.pop(key, {}).items():
            await term.last_modes(self._modes_sender(home, req, stream))  # before the exit
            term.close()
        offsets = moved_offsets(guest.files)
        if guest.orphaned:
            return  # its exit status goes nowhere
        if guest.moved:  # its exit status will come from where it runs now
            if started is not None:
                await self._send_quietly(home, started)
            return
        # its deputy waits for this message: a link that broke under an earlier send (which
        # drops it) is opened anew, and a loss is logged, never silent
        exited = RemoteExited(req.job, req.home_pid, status, offsets)
        for attempt in (1, 2):
            try:
                await self.links.send_many(home, [exited] if started is None else [started, exited])
                break
            except DunixError as exc:
                log.warning("exit of %s/%d to %s, try %d: %s", req.job, req.home_pid, home,
                            attempt, exc)  # fmt: skip
        # the next guest's tracer: started now, it takes no CPU from this one's program
        # (a 0.5-CPU host) and is ready long before a sequential job's next remote exec
        self._warm_up()

    async def _is_dir(self, path: str) -> bool:
        """In a thread only on /dunix/fs (this agent serves it: a stat from its own loop
        would wait for itself); elsewhere inline, as a thread hand-off costs a remote exec
        ~0.2 ms."""
        mount = str(self.agent.config.storagefs_mount)
        if path == mount or path.startswith(mount + "/"):
            return await trio.to_thread.run_sync(os.path.isdir, path)
        return os.path.isdir(path)

    def _warm_up(self) -> None:
        """Have a tracer ready for the next guest (off the path of this one's start).
        ``DUNIX_WARM_TRACER=0`` in the agent's environment turns it off (to compare)."""
        if self.warm is None and os.environ.get(WARM_TRACER_ENV) != "0":
            try:
                self.warm = WarmTracer()
            except DunixError as exc:
                log.warning("no warm tracer: %s", exc)

    def close(self) -> None:
        if self.warm is not None:
            self.warm.close()
            self.warm = None

    def _modes_sender(
        self, home: str, req: RemoteExec, stream: int
    ) -> Callable[[bytes], Awaitable[None]]:
        async def send(modes: bytes) -> None:
            await self._send_quietly(home, RemoteTtyMode(req.job, req.home_pid, stream, modes))

        return send

    def _guest_tty(self, rf: RemoteFd, hub: StreamHub, guest: Guest) -> int:
        """The guest's fd for the home's terminal ``rf``: a pty slave, one pty per terminal."""
        terms = self.guest_ttys.setdefault((guest.job, guest.home_pid), {})
        term = terms.get(rf.stream)
        if term is None:
            term = GuestTerminal(rf.termios, rf.winsize)
            terms[rf.stream] = term
            guest.senders.append(hub.open_sender(rf.stream, term.output_fd()))
            if rf.stream_in:
                guest.receivers.append(hub.open_receiver(rf.stream_in, term.master_fd()))
        return term.slave_fd()

    def _blocked_readers(self, job_id: str) -> Callable[[tuple[int, int]], int]:
        """The guest job's readers blocked on a pipe: what its pull-mode relay may fetch
        from the home (a process that only inherited the read end must take nothing)."""

        def wanted(key: tuple[int, int]) -> int:
            job = self.agent.jobs.jobs.get(job_id)
            if job is None:
                return 0
            return blocked_readers((p.pid for p in self.agent.jobs.of(job)), key)

        return wanted

    def _recreate(self, rf: RemoteFd, hub: StreamHub, guest: Guest, req: RemoteExec) -> int:
        """This side's fd for the guest's fd ``rf.fd``; the caller closes it after spawn."""
        if rf.kind == "tty":
            return self._guest_tty(rf, hub, guest)
        if rf.kind == "pipe":
            if rf.writable and rf.stream in guest.writers:  # a second fd of one stream
                return os.dup(guest.writers[rf.stream])
            r, w = os.pipe2(os.O_CLOEXEC)
            guest.pipes.append((rf.stream, os.fstat(r).st_ino, rf.writable))
            if rf.writable:  # the program writes; we read and send home
                guest.senders.append(hub.open_sender(rf.stream, r))
                guest.writers[rf.stream] = w
                return w
            pull = self._blocked_readers(f"{req.job}/{req.home_pid}")
            guest.receivers.append(hub.open_receiver(rf.stream, w, pull=pull))
            return r
        flags = rf.flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOCTTY) | os.O_CLOEXEC
        if _null_device(rf):
            return os.open(rf.path or "/dev/null", flags)
        path = "/dev/null" if rf.kind == "null" and not rf.path else rf.path
        try:
            fd = open_as(req.uid, req.gid, req.groups, path, flags)  # the user's rights
        except FileNotFoundError:  # e.g. a file in the home's own /tmp: `ps` says so
            raise DunixError(f"fd {rf.fd}: {path} is not on {self.agent.config.name}") from None
        if rf.kind == "file" and rf.pos and not rf.flags & os.O_APPEND:
            os.lseek(fd, rf.pos, os.SEEK_SET)
        if rf.kind == "file" and stat.S_ISREG(os.fstat(fd).st_mode):
            guest.files.append((rf.fd, os.dup(fd), os.lseek(fd, 0, os.SEEK_CUR)))
        return fd


def _fds_under(pid: int, mount: str) -> bool:
    """Whether an fd of ``pid`` may name a file under ``mount`` (readlink only: a stat
    would ask the file system); True when that cannot be told."""
    fds = f"/proc/{pid}/fd"
    try:
        links = [os.readlink(f"{fds}/{n}") for n in os.listdir(fds)]
    except OSError:
        return True
    return any(link == mount or link.startswith(mount + "/") for link in links)


def moved_offsets(files: list[tuple[int, int, int]]) -> tuple[tuple[int, int], ...]:
    """A guest's end: (fd, offset) of each reopened regular file whose offset it moved,
    read from this agent's duplicates of its descriptions, which are closed here."""
    moved = []
    for fd, dup, start in files:
        with contextlib.suppress(OSError):
            pos = os.lseek(dup, 0, os.SEEK_CUR)
            if pos != start:
                moved.append((fd, pos))
        os.close(dup)
    files.clear()
    return tuple(moved)


def follow_offsets(files: dict[int, int], offsets: tuple[tuple[int, int], ...]) -> None:
    """The home's side: its descriptions (``files``, by fd) take the offsets the guest's
    copies ended at. A file at home and its reopened copy on the peer have two offsets,
    where a local child would have shared one: a parent writing on after the child would
    write over the child's bytes, and a second reader would read the first one's again."""
    for fd, pos in offsets:
        dup = files.get(fd)
        if dup is not None:
            with contextlib.suppress(OSError):
                os.lseek(dup, pos, os.SEEK_SET)


def _null_device(rf: RemoteFd) -> bool:
    return rf.kind == "null" and (not rf.path or rf.path in NULL_DEVICES)
