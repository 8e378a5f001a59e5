"""Moving a process that runs at home to a peer, leaving a deputy in its place.

``dunix migrate GPID NODE`` for a process of a ``dunix run`` job that still runs on the
node that created it (``agent/migration.py`` moves one that is away already). The home
is the source here:

1. the process must be movable (``require_movable``, no terminal fd, a socket only when
   it is a connected stream: ``dunix/migrate/sockets.py``), and the target is asked
   before anything freezes (``MigratePrepare``: CPU, its pid free);
2. the agent takes duplicates of its pipe and socket fds with pidfd_getfd (the home's
   relays will write and read them; a socket's connection stays open here), the tracer
   ``release``s it (left stopped, untraced), and CRIU dumps it with ``leave_running``: at
   home it stays stopped, since it will become the deputy in place (while CRIU holds
   it, during ``post-dump``, the tracer cannot touch it: EPERM);
3. inside ``post-dump`` the images go to the target, which restores it as a guest of the
   job (``inherit_fd``: a new pipe per pipe, relayed to the home) and has its tracer seize
   it; the home registers the ``Deputy`` before the target runs it, so a quick exit
   status is not lost;
4. after the dump call returned, the tracer ``deputize``s the stopped home copy: it execs
   ``dunix-deputy --migrated``, whose hello ``serve_migrated`` answers: from then on the
   deputy carries the guest's exit status, signals and stops as for a remote exec.

Post-copy (a process of ``lazy.LAZY_MIN_RSS`` or more, ``lazymove.wanted``): step 2's
dump leaves the pages out (``driver.move_lazy``, still ``leave_running``), the target
runs it after a freeze for the rest of its state, and the home's criu serves its pages
until the target's lazy-pages daemon has them all. Step 4 waits for that: CRIU stays the
home copy's ptracer until the last page was served (criu/cr-dump.c, cr_dump_finish runs
``cr_lazy_mem_dump`` before ``pstree_switch_state``), so the tracer could not inject the
exec earlier. (Earlier would not have spoilt the pages either, by reasoning, untested:
criu's page pipes hold them by reference (vmsplice), which the exec does not free; the
injection's writes go below the red zone, which the guest does not read.) Meanwhile the guest's
exit status waits in its ``Deputy``. A signal sent to the home pid meanwhile (up to
~1 s at 1 GiB; a plain dump has the same window while it dumps) reaches the home copy,
not the guest: one that ends it fails the deputize, so the copy there is killed and the
parent sees that signal (checked by hand with SIGTERM); a caught one is not handled yet
(not checked: its handler may run in the home copy). A failure before the commit is
tried again with a plain dump; a transfer that breaks off loses the process
(``_pages_served``: killed there, SIGKILL here). bench/home_move_bench.py compares both.

Any failure before the target confirmed: the tracer seizes the home copy again and it
runs on. Pipe contents: CRIU copies a pipe's buffered bytes with tee (criu/pipes.c) and
does not write them into an inherited pipe on restore, so bytes the process had written
stay in the home pipe for its reader, and bytes it had not read yet stay for the home
relay to send: nothing arrives twice.

Fork-time placement (``HomeMoves.forked``) uses the same move for a child held at its
fork stop by the tracer (``hold 1``): it has not run yet, so its image is its parent's
memory. It is opt-in per job (``DUNIX_FORK_PLACEMENT=remote|auto`` in the job's
environment); exec-time placement stays the default, because (bench/forkplace_bench.py)
a move at fork costs ~0.1 s of CRIU per child where a local fork costs ~0.5 ms, every
fork of a held job waits for the agent, and a shell's child has not yet made its
redirections: in ``cmd > file &`` the child opens ``file`` after the fork, so moved at
fork it would open it on the peer (a host's /tmp is its own; only shared paths and
/dunix/fs are the same file there), whereas exec-time placement ships the fd the shell
opened at home. A job of shell scripts keeps the default; a program that forks workers
without exec opts in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from dunix.agent import lazymove
from dunix.agent.jobs import Job, Proc, proc_cmd
from dunix.agent.migration import (
    IMAGES_ROOT,
    STEP_TIMEOUT,
    MigrationService,
    RemoteTarget,
    _Outgoing,
    half_close,
)
from dunix.agent.remote import Deputy
from dunix.agent.tracer import Exited, Forked, Tracer
from dunix.errors import DunixError, MigrationFailed, NoSuchNode
from dunix.fdmove.deputy import DeputyConnection
from dunix.fdmove.inventory import FdInfo, inventory
from dunix.fdmove.pidfd import pidfd_getfd, pidfd_open
from dunix.migrate import driver, sockets
from dunix.migrate.cpufeatures import CpuFeatures
from dunix.migrate.eligibility import cpu_reason, require_movable
from dunix.wire.jobs import RemoteSignal
from dunix.wire.migrate import (
    MigratePhase,
    MigratePipe,
    MigratePrepare,
    MigrateReply,
    MigrateSocket,
)

if TYPE_CHECKING:
    from dunix.agent.daemon import Agent

log = logging.getLogger("dunix.agent.homemove")

#: fds a process at home may hold when it moves: the rest is refused before freezing
_MOVABLE_KINDS = ("pipe", "file", "dir", "null", "socket")


@dataclass
class _HomePipe:
    """One pipe of the process (by inode), duplicated before the dump."""

    inode: int
    writes: bool  # the process writes it: the home relay receives and writes the copy
    dup: int
    key: str = ""  # CRIU's key for a written file relayed as a pipe (see written_files)


@dataclass
class HomeMoveReport:
    target: str
    pid: int
    freeze_ms: float
    dump_ms: float
    restored_ms: float
    deputized_ms: float
    image_bytes: int
    phases: tuple[MigratePhase, ...] = field(default=())
    #: post-copy: from the dump's start until the home's criu served the last page
    served_ms: float = 0.0


class HomeMoves:
    """The home's side of moves of its own running processes, and their deputies."""

    def __init__(self, service: MigrationService) -> None:
        self.service = service
        self.agent: Agent = service.agent
        #: pid → the deputy its migrated hello will attach to (registered before restore)
        self.expected: dict[int, Deputy] = {}
        self._turns: dict[str, int] = {}  # fork-time placement: the next slot, per job
        #: pids being moved away now (a post-copy move lasts until its last page)
        self.moving: set[int] = set()
        self.agent.remote.on_migrated = self.serve_migrated

    @property
    def name(self) -> str:
        return self.agent.config.name

    # -- the move -----------------------------------------------------------------------

    def tracer_of(self, proc: Proc) -> tuple[Job, Tracer]:
        job = self.agent.jobs.jobs.get(proc.key)
        if job is None or not job.tracers or job.guest is not None:
            raise MigrationFailed(f"pid {proc.pid} is not a traced process of a job here")
        return job, job.tracers[0]

    def check_target(self, target: str) -> None:
        if target == self.name:
            raise MigrationFailed(f"it runs on {target} already")
        if target not in {n for n, _ in self.agent.alive_peers()}:
            raise NoSuchNode(f"{target} is not an alive node")
        member = self.agent.membership.member(target)
        seen = CpuFeatures(member.load.cpu_level, member.load.cpu_flags)
        reason = cpu_reason(self.agent.features, seen, target)
        if reason is not None:
            raise MigrationFailed(f"cannot move: {reason}")

    async def migrate(self, proc: Proc, target: str) -> MigrateReply:
        """`dunix migrate` of a process running here: the reply the CLI prints."""
        if proc.state != "running":
            raise MigrationFailed(f"pid {proc.pid} cannot move from state {proc.state!r}")
        if proc.pid in self.moving:
            raise MigrationFailed(f"pid {proc.pid} is moving already")
        self.check_target(target)
        job, tracer = self.tracer_of(proc)
        started = time.monotonic()
        report = await self.move(proc, job, tracer, target, check=True)
        total = round((time.monotonic() - started) * 1000.0, 1)
        return MigrateReply(
            gpid=proc.gpid, source=self.name, target=target, pid=report.pid,
            phases=(*report.phases, MigratePhase("deputized", total)),
            freeze_ms=report.freeze_ms, downtime_ms=round(report.restored_ms - report.freeze_ms, 1),
            total_ms=total, image_bytes=report.image_bytes, moves=proc.moves,
        )  # fmt: skip

    async def move(
        self,
        proc: Proc,
        job: Job,
        tracer: Tracer,
        target: str,
        *,
        check: bool,
        parent: int = 0,
    ) -> HomeMoveReport:
        """Move ``proc`` (traced by ``tracer`` here) to ``target``; a deputy stays.

        ``check``: run the eligibility checks (a child held at its fork stop shares its
        parent's memory and fds, which were fine for its parent's placement: skipped)."""
        pid = proc.pid
        if check:
            await trio.to_thread.run_sync(
                lambda: require_movable(pid, allowed_tracers={tracer.pid})
            )
        if _children(pid):
            raise MigrationFailed(f"cannot move: pid {pid} has children (a tree moves whole)")
        fds = await trio.to_thread.run_sync(inventory, pid)
        bad = [f for f in fds if f.kind not in _MOVABLE_KINDS]
        if bad:
            what = ", ".join(f"fd {f.fd} ({f.kind} {f.target})" for f in bad)
            raise MigrationFailed(f"cannot move: holds {what}")
        written = await trio.to_thread.run_sync(written_files, pid, fds)
        nulls = await trio.to_thread.run_sync(
            _foreign_nulls, pid, [f for f in fds if f.fd not in written]
        )
        shared: set[int] = set()
        if parent:  # a child at its fork stop: the pipes it reads that its parent reads too
            with contextlib.suppress(DunixError, OSError):
                theirs = await trio.to_thread.run_sync(inventory, parent)
                shared = {f.inode for f in theirs if f.kind == "pipe" and f.readable}
        cmdline = proc_cmd(pid) or proc.cmd
        held = [f.inode for f in fds if f.kind == "socket"]
        shared_sockets = await trio.to_thread.run_sync(sockets.socket_holders, held, pid)
        socks = self._duplicate_sockets(pid, fds, shared_sockets)
        try:
            pipes = self._duplicate_pipes(pid, fds, shared, written)
        except BaseException:
            for _, dup in socks:
                os.close(dup)
            raise
        move = f"{self.name}-h{next(self.service._ids)}-{pid}"
        prepare = MigratePrepare(
            move=move, job=proc.job, home=self.name, home_pid=pid, gpid=proc.gpid, pid=pid,
            uid=job.uid, gid=job.gid, groups=job.groups, mode=job.mode, cmd=proc.cmd,
            origin_flags=self.agent.features.flags, origin_level=self.agent.features.level,
            pipes=tuple(MigratePipe(p.inode, p.writes, i, p.key) for i, p in enumerate(pipes)),
            moves=proc.moves + 1, nulls=nulls, sockets=tuple(m for m, _ in socks),
        )  # fmt: skip
        # post-copy for a large process (move_lazy has no tcp_close: a TCP one goes plain)
        lazy = not any(m.tcp for m, _ in socks) and lazymove.wanted(pid)
        deputy = Deputy(job, proc, target, proc.cmd)
        deputy.started.set()
        self.moving.add(pid)
        try:
            try:
                report = await self._dump_and_restore(
                    proc, job, tracer, target, prepare, pipes, deputy, socks, lazy=lazy
                )
            except MigrationFailed as exc:
                lost = proc.state.startswith("lost:")  # after the commit: no second try
                if not lazy or lost or not lazymove.is_lazy_failure(exc):
                    raise
                # failed before the commit: it runs here again; once more, plain
                log.warning("post-copy move of pid %d failed, trying a plain dump: %s", pid, exc)
                retry = f"{self.name}-h{next(self.service._ids)}-{pid}"
                prepare = dataclasses.replace(prepare, move=retry)
                deputy = Deputy(job, proc, target, proc.cmd)
                deputy.started.set()
                report = await self._dump_and_restore(
                    proc, job, tracer, target, prepare, pipes, deputy, socks, lazy=False
                )
        finally:
            self.moving.discard(pid)
            for p in pipes:
                os.close(p.dup)
            for _, dup in socks:
                os.close(dup)
        t0 = time.monotonic()
        try:
            await tracer.deputize(pid, target)
        except DunixError as exc:
            # the target runs it already: keep the one at home, end the other one
            log.error("pid %d was restored on %s but could not become a deputy here (%s): "
                      "killing the copy there", pid, target, exc)  # fmt: skip
            self._forget(deputy)
            with contextlib.suppress(DunixError):
                await self.agent.job_links.send(
                    target, RemoteSignal(proc.job, pid, signal.SIGKILL, False)
                )
            with contextlib.suppress(DunixError):
                await tracer.seize(pid, cont=True)
            raise MigrationFailed(f"restored on {target} but not deputized: {exc}") from None
        report.deputized_ms = round(report.restored_ms + (time.monotonic() - t0) * 1000.0, 1)
        proc.state, proc.node, proc.remote_pid = "deputy", target, report.pid
        proc.cmd, proc.migrated = cmdline, True  # its deputy's own is dunix-deputy --migrated
        proc.moves += 1
        log.info("pid %d of job %s moved %s → %s, a deputy here", pid, proc.job, self.name,
                 target)  # fmt: skip
        return report

    def _duplicate_pipes(
        self, pid: int, fds: list[FdInfo], parent_reads: set[int], written: dict[int, str]
    ) -> list[_HomePipe]:
        pipes: list[_HomePipe] = []
        pidfd = pidfd_open(pid)
        try:
            for inode, writes, fd in pipe_plan(fds, parent_reads):
                pipes.append(_HomePipe(inode, writes, pidfd_getfd(pidfd, fd)))
            for key in dict.fromkeys(written.values()):  # one per file (`> f 2>&1`: fds 1, 2)
                fd = next(n for n, k in written.items() if k == key)
                pipes.append(_HomePipe(0, True, pidfd_getfd(pidfd, fd), key))
        except BaseException:
            for p in pipes:
                os.close(p.dup)
            raise
        finally:
            os.close(pidfd)
        return pipes

    def _duplicate_sockets(
        self, pid: int, fds: list[FdInfo], shared: dict[int, int]
    ) -> list[tuple[MigrateSocket, int]]:
        """A duplicate of each socket (its connection stays open here) with its plan;
        ``MigrationFailed`` naming every socket that cannot be relayed (``shared``:
        inode → another pid holding it, as a child at its fork stop shares its parent's)."""
        held = [f for f in fds if f.kind == "socket"]
        if not held:
            return []
        if shared:
            why = "; ".join(
                f"fd {f.fd} is a socket pid {shared[f.inode]} holds too"
                for f in held
                if f.inode in shared
            )
            raise MigrationFailed(f"cannot move: {why}")
        first = 2 * len(fds)  # stream indexes after every pipe's (one per pipe at most)
        found: list[tuple[MigrateSocket, int]] = []
        reasons: list[str] = []
        pidfd = pidfd_open(pid)
        try:
            for f in held:
                dup = pidfd_getfd(pidfd, f.fd)
                plan = sockets.classify(f.fd, dup, sockets.fd_flags(pid, f.fd))
                if isinstance(plan, str):
                    os.close(dup)
                    reasons.append(plan)
                    continue
                out = first + 2 * len(found)
                relayed = MigrateSocket(plan.inode, plan.tcp, plan.nonblock, out, out + 1)
                found.append((relayed, dup))
        except BaseException:
            for _, dup in found:
                os.close(dup)
            raise
        finally:
            os.close(pidfd)
        if reasons:
            for _, dup in found:
                os.close(dup)
            raise MigrationFailed("cannot move: " + "; ".join(reasons))
        return found

    async def _dump_and_restore(
        self,
        proc: Proc,
        job: Job,
        tracer: Tracer,
        target_node: str,
        prepare: MigratePrepare,
        pipes: list[_HomePipe],
        deputy: Deputy,
        socks: list[tuple[MigrateSocket, int]],
        *,
        lazy: bool = False,
    ) -> HomeMoveReport:
        """Release, dump (leave_running: it stays here, stopped), send, restore there:
        ``driver.move``'s table, whose "source killed" means here "let go by CRIU".

        ``lazy``: post-copy (``driver.move_lazy``): frozen for the images without the
        pages, which the home's criu serves after the target runs it. CRIU keeps the
        home copy seized until the last page was served (criu/cr-dump.c,
        cr_dump_finish: the page server runs before the tree is let go), so the tracer
        cannot deputize it before: this returns once the transfer ended."""
        pid = proc.pid
        service = self.service
        plan: lazymove.SourcePlan | None = None
        if lazy:
            plan = lazymove.source_plan(IMAGES_ROOT, prepare.move)
            prepare = dataclasses.replace(prepare, lazy=plan.wire)
        send, receive = trio.open_memory_channel[object](4)
        out = _Outgoing(prepare.move, target_node, send, receive)  # type: ignore[arg-type]
        service._outgoing[out.move] = out
        remote = RemoteTarget(service, out, prepare)
        home = self
        sent_at: list[float] = []
        t0 = time.monotonic()

        class Target:
            async def prepare(self, pid: int) -> None:
                await remote.prepare(pid)

            async def send(self, images_dir_fd: int) -> None:
                await remote.send(images_dir_fd)
                sent_at.append(time.monotonic() - t0)

            async def restore(self, images_dir_fd: int) -> int:
                restored = await remote.restore(images_dir_fd)
                # it runs there now: relay its pipes, and be ready for its news
                await home._open_relays(deputy, out.streams, pipes, socks)
                return restored

            async def abort(self, pid: int) -> None:
                await remote.abort(pid)

        folder: Path | None = None
        dir_fd = -1
        released = False
        try:
            await remote.prepare(pid)  # refused before freezing: CPU, busy pid
            IMAGES_ROOT.mkdir(parents=True, exist_ok=True)
            folder = Path(tempfile.mkdtemp(prefix=f"out-{out.move}-", dir=IMAGES_ROOT))
            dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            await tracer.release(pid)
            released = True
            t0 = time.monotonic()
            relayed = [m for m, _ in socks]
            files = tuple(p.key for p in pipes if p.key)
            externals = prepare.nulls + files + sockets.dump_externals(relayed)
            try:
                if plan is not None:
                    report = await driver.move_lazy(
                        pid, dir_fd, Target(), plan.plan, self.agent.nursery, shell_job=True,
                        external=externals, phase_timeout=STEP_TIMEOUT, leave_running=True,
                    )  # fmt: skip
                else:
                    report = await driver.move(
                        pid, dir_fd, Target(), shell_job=True, external=externals,
                        tcp_close=any(m.tcp for m in relayed), phase_timeout=STEP_TIMEOUT,
                        leave_running=True,
                    )  # fmt: skip
            except BaseException:
                self._forget(deputy)
                if released:
                    with trio.CancelScope(shield=True), contextlib.suppress(DunixError, OSError):
                        await tracer.seize(pid)  # the release's stop is undone: it runs on here
                with trio.CancelScope(shield=True), contextlib.suppress(DunixError):
                    await remote.abort(pid)
                raise
            served = 0.0
            if report.transfer is not None:  # criu still serves from the folder's log
                served = await self._pages_served(proc, job, tracer, deputy, report.transfer)
        finally:
            service._outgoing.pop(out.move, None)
            if dir_fd >= 0:
                os.close(dir_fd)
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            if plan is not None:
                plan.close()
        ms = 1000.0
        frozen = round(report.freeze_seconds * ms, 1)
        restored = round((report.freeze_seconds + report.downtime_seconds) * ms, 1)
        phases: tuple[MigratePhase, ...] = (
            MigratePhase("frozen", frozen),
            MigratePhase("dumped", round(report.dump_seconds * ms, 1)),
            MigratePhase("sent", round((sent_at[0] if sent_at else 0.0) * ms, 1)),
            MigratePhase("restored", restored),
        )
        if report.transfer is not None:
            phases += (MigratePhase("post-copy: every page served", round(served * ms, 1)),)
        return HomeMoveReport(
            target_node, report.restored_pid, frozen, round(report.dump_seconds * ms, 1),
            restored, 0.0, out.nbytes, phases, round(served * ms, 1),
        )  # fmt: skip

    async def _pages_served(
        self, proc: Proc, job: Job, tracer: Tracer, deputy: Deputy, transfer: driver.PageTransfer
    ) -> float:
        """Wait until the home's criu served the last page (it then lets the home copy go,
        stopped) and return when that was (seconds from the dump's start). A transfer that
        broke off lost the process: the guest misses pages (the target's lazymove.watch
        kills it), and ``driver.move_lazy`` killed the home copy, which CRIU had resumed,
        so its parent sees SIGKILL; raises ``MigrationFailed``.

        Deputizing the home copy earlier is not possible (CRIU is its ptracer until then)
        and not needed: its exit status and signals wait in ``deputy`` and in the kernel."""
        await transfer.done.wait()
        if not transfer.error:
            return transfer.seconds or 0.0
        reason = (
            "its home's page server broke off during post-copy: "
            + (transfer.error.strip().splitlines() or ["criu failed"])[0]
        )
        log.warning("pid %d of job %s is lost: %s", proc.pid, proc.job, reason)
        self._forget(deputy)
        proc.state = f"lost: {reason}"
        with contextlib.suppress(DunixError):
            await self.agent.job_links.send(
                deputy.peer, RemoteSignal(proc.job, proc.pid, signal.SIGKILL, False)
            )
        # the tracer let it go (release) and reports no exit of it: tell the job here,
        # which keeps it in ps as lost until its parent reaped it
        self.agent.jobs._on_event(job, tracer, Exited(proc.pid, signal.SIGKILL), "")
        raise MigrationFailed(f"pid {proc.pid} was lost: {reason}")

    async def _open_relays(
        self,
        deputy: Deputy,
        streams: tuple[tuple[int, int], ...],
        pipes: list[_HomePipe],
        socks: list[tuple[MigrateSocket, int]],
    ) -> None:
        """The target runs it now (its relays are open): relay each pipe to its new
        stream, and each socket both ways (the process's shutdown reaches the peer
        through ``half_close``), and register the deputy so that its guest's news
        finds it."""
        hub = await self.agent.job_links.hub(deputy.peer)
        by_index = dict(streams)
        for i, p in enumerate(pipes):
            stream = by_index.get(i)
            if stream is None:
                continue
            if p.writes:
                deputy.receivers.append(hub.open_receiver(stream, os.dup(p.dup), shared=True))
            else:
                deputy.senders.append(hub.open_sender(stream, os.dup(p.dup), shared=True))
        for m, dup in socks:
            out, into = by_index.get(m.out_stream), by_index.get(m.in_stream)
            # shared: a later move ends these streams without shutting the connection down
            # (half_close passes the process's own shutdown on) or reading it shut
            if out is not None:
                deputy.receivers.append(hub.open_receiver(out, os.dup(dup), shared=True))
                half_close(self.agent, deputy, deputy.receivers[-1], dup)
            if into is not None:
                deputy.senders.append(hub.open_sender(into, os.dup(dup), shared=True))
        key = (deputy.proc.job, deputy.proc.pid)
        self.agent.remote.deputies[key] = deputy
        self.expected[deputy.proc.pid] = deputy

    def _forget(self, deputy: Deputy) -> None:
        key = (deputy.proc.job, deputy.proc.pid)
        if self.agent.remote.deputies.get(key) is deputy:
            self.agent.remote.deputies.pop(key, None)
        if self.expected.get(deputy.proc.pid) is deputy:
            self.expected.pop(deputy.proc.pid, None)
        for endpoint in deputy.senders + deputy.receivers:
            endpoint.stop()

    # -- fork-time placement --------------------------------------------------------------

    def forked(self, job: Job, tracer: Tracer, event: Forked) -> None:
        """A child of ``job`` is held at its fork stop: place it (``hold 1`` is on)."""
        self.agent.nursery.start_soon(self._place_child, job, tracer, event.child, event.parent)

    def choose(self, job: Job) -> str | None:
        """A peer with a slot in the slot table of ``job``'s fork placement mode, in turn."""
        mode = self.agent.jobs.fork_jobs.get(job.id, job.mode)
        if mode == "local":
            return None
        table = [n for n, count in self.agent.slot_table(mode) if count > 0]
        if not table:
            return None
        turn = self._turns.get(job.id, 0)
        self._turns[job.id] = turn + 1
        return table[turn % len(table)]

    async def _place_child(self, job: Job, tracer: Tracer, child: int, parent: int) -> None:
        started = time.monotonic()
        proc = self.agent.jobs.procs.get(child)
        target = self.choose(job)
        try:
            if proc is None or target is None:
                return
            self.check_target(target)
            # a child at its fork stop shares what its parent had (placed already)
            report = await self.move(proc, job, tracer, target, check=False, parent=parent)
            log.info("pid %d of job %s placed on %s at fork in %.1f ms (frozen %.1f ms)",
                     child, job.id, target, (time.monotonic() - started) * 1000.0,
                     report.freeze_ms)  # fmt: skip
            return
        except DunixError as exc:
            log.info("pid %d of job %s stays here: %s", child, job.id, exc)
        finally:
            if proc is None or proc.state != "deputy":
                with contextlib.suppress(DunixError, OSError):
                    await tracer.resume(child)

    # -- the deputy -----------------------------------------------------------------------

    async def serve_migrated(self, pid: int, conn: DeputyConnection) -> None:
        """A deputy the tracer's ``deputize`` made (hello ... ``migrated``): attach it to
        its guest; it then ends as the guest does, as a remote exec's deputy would."""
        deputy = self.expected.pop(pid, None)
        if deputy is None:
            log.warning("migrated deputy %d connected, but no move of it is known", pid)
            await conn.send("exit", 127)
            return
        remote = self.agent.remote
        key = (deputy.proc.job, pid)
        deputy.conn = conn
        try:
            await conn.send("ready")  # its fds were duplicated before the dump
            await remote.attend(deputy, conn)
        finally:
            if remote.deputies.get(key) is deputy:
                remote.deputies.pop(key, None)
            for endpoint in deputy.senders + deputy.receivers:
                endpoint.stop()


def pipe_plan(fds: list[FdInfo], parent_reads: set[int]) -> list[tuple[int, bool, int]]:
    """(pipe inode, the process writes it, the fd to duplicate) for each pipe to relay.

    A pipe is relayed one way (CRIU's inherit_fd gives every end of it the same fd).
    A process that holds both ends (a child at its fork stop, before it closed the one
    its parent keeps) is taken to write it: reading it at home would take its parent's
    bytes. A read-write end is relayed in for fd 0, out otherwise, as for a remote exec.
    A pipe it only reads while its parent (``parent_reads``: inodes) reads it too is not
    relayed, for the same reason: CRIU restores it as a pipe of its own, with the bytes
    it held when dumped, then EOF."""
    ends: dict[int, list[FdInfo]] = {}
    for f in fds:
        if f.kind == "pipe":
            ends.setdefault(f.inode, []).append(f)
    plan = []
    for inode, held in ends.items():
        reads = [f for f in held if f.readable and (not f.writable or f.fd == 0)]
        if inode in parent_reads and len(reads) == len(held):
            continue
        writes = [f for f in held if f not in reads]
        plan.append((inode, bool(writes), (writes or reads)[0].fd))
    return plan


def _mnt_id(pid: int, fd: int) -> int:
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    return -1


def written_files(pid: int, fds: list[FdInfo]) -> dict[int, str]:
    """fd → CRIU external key (``file[MNT:INODE]``) of each regular file the process only
    writes, without O_APPEND (`> log`): such a file goes as a pipe relayed into the home's
    description, as for a remote exec (agent/remote.py), so the process and the writers
    that stay (its parent's `echo done`) share one offset; reopened by path on the target
    it would write over theirs, and one the `dunix run` client opened in its own mount
    namespace cannot be reopened there at all."""
    return {f.fd: _external_key(_mnt_id(pid, f.fd), f.inode) for f in fds if f.written_only}


def _external_key(mnt: int, inode: int) -> str:
    """CRIU's key for an external file (criu/files-reg.c prints both in hex)."""
    return f"file[{mnt:x}:{inode:x}]"


def _foreign_nulls(pid: int, fds: list[FdInfo]) -> tuple[str, ...]:
    """CRIU external keys (``file[MNT:INODE]``, hex as criu/files-reg.c prints them) of
    the null devices on mounts the process's mount namespace does not show: what the
    ``dunix run`` client passed from its own namespace. CRIU cannot dump such a file by
    path ("Can't lookup mount"); as an external it is inherited on restore. A regular
    file there cannot be reopened on the target by path: refused."""
    with open(f"/proc/{pid}/mountinfo") as f:
        mounts = {int(line.split()[0]) for line in f if line.strip()}
    keys: list[str] = []
    for info in fds:
        if info.kind not in ("null", "file", "dir"):
            continue
        mnt = _mnt_id(pid, info.fd)
        if mnt in mounts:
            continue
        if info.kind != "null":
            raise MigrationFailed(
                f"cannot move: fd {info.fd} ({info.target}) is a file its host cannot see"
            )
        key = _external_key(mnt, info.inode)
        if key not in keys:
            keys.append(key)
    return tuple(keys)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    return out


_moves: weakref.WeakKeyDictionary[MigrationService, HomeMoves] = weakref.WeakKeyDictionary()


def home_moves(service: MigrationService) -> HomeMoves:
    """The agent's ``HomeMoves`` (made on first use; it hooks the deputy listener)."""
    moves = _moves.get(service)
    if moves is None:
        moves = _moves[service] = HomeMoves(service)
    return moves
