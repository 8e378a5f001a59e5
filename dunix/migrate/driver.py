"""Runs ``lifecycle.Migration`` with real CRIU at the source and a pluggable target.

The source's CRIU dump is one long swrk call: its ``post-dump`` notify is where the
process is frozen with complete images, and the driver keeps CRIU waiting there while it
carries out the table's actions against the ``Target`` (prepare, send, restore). The
answer it finally gives is the table's: success only after ``KILL_SOURCE`` (the target's
restore succeeded), failure after ``RESUME_SOURCE``.

``Target`` is what the agent implements over the wire (images streamed to the peer, the
peer's agent running criu in its own namespaces). ``HostTarget`` is the local case the
e2e tests use: a simulated host on this machine that shares the images folder.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import trio

from dunix.errors import MigrationFailed
from dunix.migrate import lazy, swrk
from dunix.migrate.lifecycle import Action, Event, EventKind, Migration, State


class Spawner(Protocol):
    """Where a post-copy move's source criu goes on running: a trio nursery or the
    agent's guarded task group."""

    def start_soon(self, async_fn: Callable[..., Awaitable[object]], *args: object) -> None: ...


class Target(Protocol):
    """The receiving side of a move. Each step raises ``MigrationFailed`` to refuse or
    fail; ``abort`` must be safe at any time and kill a tree a late restore left behind."""

    async def prepare(self, pid: int) -> None: ...

    async def send(self, images_dir_fd: int) -> None: ...

    async def restore(self, images_dir_fd: int) -> int: ...

    async def abort(self, pid: int) -> None: ...


@dataclass(frozen=True)
class MoveReport:
    pid: int
    restored_pid: int
    #: dump call start to the tree being seized (CRIU's query-ext-files notify)
    freeze_seconds: float
    #: dump call start to the post-dump notify (freezing plus writing the images)
    dump_seconds: float
    #: the target's restore step
    restore_seconds: float
    #: frozen to restore confirmed: how long the process ran nowhere
    downtime_seconds: float
    total_seconds: float
    history: tuple[tuple[State, EventKind, State], ...]
    #: post-copy: the pages still on their way when ``move_lazy`` returned
    transfer: PageTransfer | None = None
    #: seconds from the move's start to each phase mark (frozen, dumped, sent,
    #: listening, restored, ...): where the downtime goes
    phases: tuple[tuple[str, float], ...] = ()


@dataclass
class PageTransfer:
    """The rest of a post-copy move: the source's criu serves pages until the target's
    lazy-pages daemon has them all, then kills the source."""

    done: trio.Event = field(default_factory=trio.Event)
    #: from the start of the move until the source's criu returned (every page served)
    seconds: float | None = None
    #: why the transfer broke; the target's copy is then lost (see ``lazy.py``)
    error: str | None = None


@dataclass(frozen=True)
class LazyPlan:
    """Where the source's page server listens and how it is secured (``lazy.py``)."""

    port: int
    tls: swrk.TlsFiles | None
    #: the source's procfs: a copy CRIU resumed after a broken transfer is killed there
    source_proc: Path = Path("/proc")


@dataclass
class _Clock:
    started: float = field(default_factory=time.monotonic)
    marks: dict[str, float] = field(default_factory=dict)
    #: durations, not marks
    spans: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str) -> None:
        self.marks[name] = time.monotonic() - self.started


async def _perform(
    action: Action,
    pid: int,
    images_dir_fd: int,
    target: Target,
    clock: _Clock,
    phase_timeout: float,
) -> Event | None:
    """Carry out one of the table's actions against ``target``; the event it led to."""
    with trio.move_on_after(phase_timeout) as scope:
        try:
            if action is Action.PREPARE_TARGET:
                await target.prepare(pid)
                return Event(EventKind.TARGET_READY)
            if action is Action.SEND_IMAGES:
                await target.send(images_dir_fd)
                clock.mark("sent")
                return Event(EventKind.SENT)
            if action is Action.START_RESTORE:
                started = time.monotonic()
                restored = await target.restore(images_dir_fd)
                restore_seconds = time.monotonic() - started
                clock.mark("restored")
                clock.spans["restore"] = restore_seconds
                return Event(EventKind.RESTORE_OK, pid=restored)
        except MigrationFailed as e:
            failed = {
                Action.PREPARE_TARGET: EventKind.TARGET_REFUSED,
                Action.SEND_IMAGES: EventKind.SEND_FAILED,
                Action.START_RESTORE: EventKind.RESTORE_FAILED,
            }[action]
            return Event(failed, str(e))
    if scope.cancelled_caught:
        return Event(EventKind.TIMEOUT, f"{action.value} took over {phase_timeout} s")
    if action is Action.ABORT_TARGET:
        with trio.CancelScope(shield=True):
            await target.abort(pid)
    return None  # KILL/RESUME_SOURCE are the notify answer; REPORT_* the outcome


async def move(
    pid: int,
    images_dir_fd: int,
    target: Target,
    *,
    source: swrk.CriuCommand | None = None,
    tcp_established: bool = False,
    tcp_close: bool = False,
    shell_job: bool = False,
    ext_unix_sk: bool = False,
    external: Sequence[str] = (),
    phase_timeout: float = 30.0,
    leave_running: bool = False,
) -> MoveReport:
    """Move ``pid`` (as the source's criu sees it) to ``target``; raises
    ``MigrationFailed`` when it did not move (then it runs where it was, or was lost).

    ``leave_running``: CRIU lets go of the source instead of killing it, so that the
    caller can turn it into a deputy in place (a process moved away from its home:
    agent/homemove.py); "source killed" then means "source let go", stopped as dumped."""
    machine = Migration()
    clock = _Clock()
    machine.handle(Event(EventKind.START))  # -> START_DUMP, carried out below

    async def perform(action: Action) -> Event | None:
        return await _perform(action, pid, images_dir_fd, target, clock, phase_timeout)

    async def on_notify(note: swrk.Notification) -> bool:
        if note.script == "query-ext-files":  # sent right after seizing (cr-dump.c)
            clock.mark("frozen")
            machine.handle(Event(EventKind.FREEZE_OK))
        if note.script != "post-dump":
            return machine.state is State.FREEZING
        clock.mark("dumped")
        pending = list(machine.handle(Event(EventKind.DUMP_OK)))
        answer = False
        while pending:
            action = pending.pop(0)
            if action is Action.KILL_SOURCE:
                answer = True
            elif action is Action.RESUME_SOURCE:
                answer = False
            event = await perform(action)
            if event is not None:
                pending += machine.handle(event)
        return answer

    try:
        result = await swrk.dump(
            pid,
            images_dir_fd,
            tcp_established=tcp_established,
            tcp_close=tcp_close,
            shell_job=shell_job,
            ext_unix_sk=ext_unix_sk,
            external=external,
            notify=on_notify,
            command=source,
            leave_running=leave_running,
        )
    except MigrationFailed as e:
        if machine.state not in (State.FREEZING, State.FAILED):
            raise  # CRIU failed after the commit: nothing the table can undo
        machine.handle(Event(EventKind.DUMP_FAILED, str(e)))
    else:
        if result.resumed and not (leave_running and machine.state is State.RUNNING_THERE):
            machine.handle(Event(EventKind.SOURCE_RESUMED))
        else:
            machine.handle(Event(EventKind.SOURCE_KILLED))
    clock.mark("end")
    machine.raise_for_outcome()
    return _report(pid, machine, clock, clock.marks["end"])


async def move_lazy(
    pid: int,
    images_dir_fd: int,
    target: Target,
    plan: LazyPlan,
    background: Spawner,
    *,
    source: swrk.CriuCommand | None = None,
    shell_job: bool = False,
    external: Sequence[str] = (),
    phase_timeout: float = 30.0,
    leave_running: bool = False,
) -> MoveReport:
    """Post-copy: move ``pid`` to ``target`` with its pages following on demand.

    The same table as :func:`move`, carried out differently (``lazy.py``): CRIU starts
    its page server only after ``post-dump`` was answered with success, and the
    target's lazy-pages daemon connects to it during the restore, so the answer is yes
    as soon as the images are at the target; the restore is asked for once the page
    server listens. ``RESUME_SOURCE`` then means killing the source's criu, which lets
    the tree go as it was (no client has connected before the restore succeeded).
    Returns once the target runs the process; the source's criu goes on in
    ``background`` until every page was served (``MoveReport.transfer``).
    ``target.restore`` must restore lazily from ``plan``'s port.
    ``leave_running`` (a move from home, agent/homemove.py): once every page was
    served CRIU lets the source go (stopped, as dumped) instead of killing it; it holds
    it seized until then (criu/cr-dump.c, cr_dump_finish).
    """
    machine = Migration()
    clock = _Clock()
    transfer = PageTransfer()
    machine.handle(Event(EventKind.START))
    asked = trio.Event()  # post-dump answered: criu serves pages (or must be killed)
    listening = trio.Event()  # criu's status-ready notify: its page server listens
    ended = trio.Event()
    resume = False
    outcome: list[swrk.DumpResult | MigrationFailed] = []
    criu_scope = trio.CancelScope()

    async def perform(action: Action) -> Event | None:
        return await _perform(action, pid, images_dir_fd, target, clock, phase_timeout)

    async def on_notify(note: swrk.Notification) -> bool:
        nonlocal resume
        if note.script == "query-ext-files":
            clock.mark("frozen")
            machine.handle(Event(EventKind.FREEZE_OK))
        if note.script == "status-ready":  # sent once the page server listens (page-xfer.c)
            clock.mark("listening")
            listening.set()
            return True
        if note.script != "post-dump":
            return machine.state is State.FREEZING
        clock.mark("dumped")
        pending = list(machine.handle(Event(EventKind.DUMP_OK)))
        while pending:
            action = pending.pop(0)
            if action is Action.START_RESTORE:
                asked.set()
                return True  # the page server must listen before the restore
            if action is Action.RESUME_SOURCE:
                resume = True  # criu serves anyway after a refusal: killed below
            event = await perform(action)
            if event is not None:
                pending += machine.handle(event)
        asked.set()
        return False

    async def run_dump() -> None:
        try:
            with criu_scope:
                outcome.append(await swrk.dump(
                    pid, images_dir_fd, shell_job=shell_job, external=external,
                    notify=on_notify, command=source, lazy_port=plan.port, tls=plan.tls,
                    leave_running=leave_running,
                ))  # fmt: skip
        except MigrationFailed as e:
            outcome.append(e)
        finally:
            clock.mark("end")
            ended.set()

    background.start_soon(run_dump)
    async with trio.open_nursery() as waiting:
        waiting.start_soon(until, asked)
        waiting.start_soon(until, ended)
    if asked.is_set() and not resume and not ended.is_set():
        with trio.move_on_after(phase_timeout):
            async with trio.open_nursery() as waiting:
                waiting.start_soon(until, listening)
                waiting.start_soon(until, ended)
        if not listening.is_set():
            why = "the source's page server did not start"
            actions = machine.handle(Event(EventKind.RESTORE_FAILED, why))
        else:
            event = await perform(Action.START_RESTORE)
            assert event is not None
            actions = machine.handle(event)
        for action in actions:
            if action is Action.RESUME_SOURCE:
                resume = True
            elif action is Action.ABORT_TARGET:
                await perform(action)
    if resume or machine.state is not State.RUNNING_THERE:
        criu_scope.cancel()  # before a client connected: the tree is let go as it was
        await ended.wait()
        failure = next((o for o in outcome if isinstance(o, MigrationFailed)), None)
        if machine.state is State.FREEZING:
            machine.handle(Event(EventKind.DUMP_FAILED, str(failure or "criu dump ended")))
        elif machine.state is State.FAILED:
            machine.handle(Event(EventKind.SOURCE_RESUMED))
        machine.raise_for_outcome()
        raise MigrationFailed(machine.reason or "post-copy move failed")

    async def finish() -> None:
        await ended.wait()
        transfer.seconds = clock.marks.get("end")
        result = outcome[0] if outcome else MigrationFailed("criu dump was cancelled")
        if isinstance(result, MigrationFailed):
            transfer.error = str(result)
            # CRIU resumes the tree when the page server fails: the target has it now
            _signal_in(plan.source_proc, pid, signal.SIGKILL)
        machine.handle(Event(EventKind.SOURCE_KILLED))
        transfer.done.set()

    background.start_soon(finish)
    return _report(pid, machine, clock, clock.marks["restored"], transfer)


def _report(
    pid: int, machine: Migration, clock: _Clock, total: float, transfer: PageTransfer | None = None
) -> MoveReport:
    assert machine.restored_pid is not None
    frozen = clock.marks.get("frozen", 0.0)
    return MoveReport(
        pid=pid,
        restored_pid=machine.restored_pid,
        freeze_seconds=frozen,
        dump_seconds=clock.marks["dumped"],
        restore_seconds=clock.spans["restore"],
        downtime_seconds=clock.marks["restored"] - frozen,
        total_seconds=total,
        history=tuple(machine.history),
        transfer=transfer,
        phases=tuple(sorted(clock.marks.items(), key=lambda kv: kv[1])),
    )


async def until(event: trio.Event) -> None:
    """In a nursery of several: wait for ``event``, then end them all (first one wins)."""
    await event.wait()
    trio.lowlevel.current_task().parent_nursery.cancel_scope.cancel()  # type: ignore[union-attr]


def _signal_in(proc: Path, pid: int, sig: int) -> bool:
    """Send ``sig`` to ``pid`` of the PID namespace whose procfs is ``proc``.

    A /proc/PID directory fd works as a pidfd (pidfd_send_signal(2)), also for a
    descendant PID namespace's procfs, so no pid translation is needed.
    """
    try:
        fd = os.open(proc / str(pid), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


class HostTarget:
    """A host whose procfs and criu this process can reach, sharing the images folder.

    For a simulated host seen from the machine: ``HostTarget.simulated(init_pid)``; for
    the agent on its own host: ``HostTarget(swrk.CriuCommand(), Path("/proc"))``.
    """

    def __init__(
        self,
        command: swrk.CriuCommand,
        proc: Path,
        *,
        tcp_established: bool = False,
        shell_job: bool = False,
        ext_unix_sk: bool = False,
        inherit_fd: Sequence[tuple[str, int]] = (),
        lazy_from: tuple[str, int, swrk.TlsFiles | None] | None = None,
    ) -> None:
        self.command = command
        #: post-copy: restore lazily, pages from this (address, port, TLS) page server
        self.lazy_from = lazy_from
        self.daemon: lazy.LazyDaemon | None = None
        #: time.monotonic() of the last restore's steps (daemon ready, restored)
        self.marks: dict[str, float] = {}
        self.proc = proc
        self.tcp_established = tcp_established
        self.shell_job = shell_job
        self.ext_unix_sk = ext_unix_sk
        self.inherit_fd = tuple(inherit_fd)
        #: test hook: answer post-restore with failure (CRIU then kills the restored tree)
        self.fail_post_restore = False
        # True from the start of a restore until CRIU reports it failed (then CRIU has
        # killed what it made): only then may ``abort`` kill the pid. A pid found busy
        # in ``prepare`` or a failed restore's EEXIST belongs to someone else.
        self._maybe_restored = False

    @classmethod
    def simulated(
        cls,
        init_pid: int,
        *,
        cgroups: Sequence[str | os.PathLike[str]] = (),
        tcp_established: bool = False,
        shell_job: bool = False,
        ext_unix_sk: bool = False,
        inherit_fd: Sequence[tuple[str, int]] = (),
        lazy_from: tuple[str, int, swrk.TlsFiles | None] | None = None,
    ) -> HostTarget:
        """A simulated host of the local cluster, reached from the machine; the restored
        tree joins ``cgroups`` (the host's, ``HostInfo.cgroup``)."""
        return cls(
            swrk.CriuCommand.in_host(init_pid, cgroups=cgroups),
            Path(f"/proc/{init_pid}/root/proc"),
            tcp_established=tcp_established,
            shell_job=shell_job,
            ext_unix_sk=ext_unix_sk,
            inherit_fd=inherit_fd,
            lazy_from=lazy_from,
        )

    async def prepare(self, pid: int) -> None:
        if (self.proc / str(pid)).exists():
            raise MigrationFailed(f"pid {pid} is in use on the target")

    async def send(self, images_dir_fd: int) -> None:
        return  # the folder is shared

    async def restore(self, images_dir_fd: int) -> int:
        async def notify(note: swrk.Notification) -> bool:
            return not (note.script == "post-restore" and self.fail_post_restore)

        async def start_daemon() -> None:
            assert self.lazy_from is not None
            address, port, tls = self.lazy_from
            self.daemon = await lazy.LazyDaemon.start(
                images_dir_fd, address, port, tls, command=self.command
            )
            self.marks["daemon ready"] = time.monotonic()

        self._maybe_restored = True
        try:
            # the daemon starts while the restore's criu does (swrk.restore ``ready``)
            result = await swrk.restore(
                images_dir_fd,
                lazy_pages=self.lazy_from is not None,
                inherit_fd=self.inherit_fd,
                tcp_established=self.tcp_established,
                shell_job=self.shell_job,
                ext_unix_sk=self.ext_unix_sk,
                notify=notify,
                command=self.command,
                ready=start_daemon if self.lazy_from is not None else None,
            )
        except MigrationFailed:
            self._maybe_restored = False
            if self.daemon is not None:
                await self.daemon.kill()
            raise
        return result.pid

    async def pages_in(self) -> int:
        """Post-copy: wait until the lazy-pages daemon ended; its exit code (0: every
        page arrived)."""
        assert self.daemon is not None
        return await self.daemon.wait()

    async def abort(self, pid: int) -> None:
        if self.daemon is not None:
            await self.daemon.kill()
        if self._maybe_restored:
            _signal_in(self.proc, pid, signal.SIGKILL)
            self._maybe_restored = False
