"""Jobs on this node: the processes of `dunix run` that live here, at home or as guests.

A job's first process starts on the node the client asked (see ``start_job``) under a
tracer. Every process the tracer reports is in ``self.procs``; one whose exec the tracer
sent elsewhere is a *deputy* here and a *guest* on the peer (``RemoteExec``). The deputy
keeps the PID and the parent; its exit status is the guest's (``RemoteExited``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pwd
import secrets
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import trio

from dunix.agent.tracer import (
    Done,
    Execed,
    Exited,
    Forked,
    JobContext,
    Started,
    Stopped,
    Tracer,
    TracerEvent,
    Unmovable,
    WentRemote,
)
from dunix.errors import AccessDenied, ConfigError, DunixError, NoSuchProcess
from dunix.pid import make_gpid, split_gpid
from dunix.pid.steer import PidSteer
from dunix.wire.jobs import ProcInfo

if TYPE_CHECKING:
    from dunix.agent.daemon import Agent

log = logging.getLogger("dunix.agent.jobs")

#: a job whose environment sets this to ``auto`` or ``remote`` is placed at fork time too
#: (a child that forks without exec moves to a peer before it runs, chosen from the slot
#: table of that mode); without it placement is at exec time only (bench/forkplace_bench.py)
FORK_PLACEMENT_ENV = "DUNIX_FORK_PLACEMENT"

MODES = ("auto", "local", "remote")
#: the agent's runtime folder keeps a file per running tracer here (``sweep_leftovers``)
TRACERS_FOLDER = "tracers"
#: how often a lost process's zombie is looked at (ps shows it until it is reaped)
REAP_POLL = 0.2


@dataclass
class Proc:
    """A process of a job on this node."""

    pid: int
    job: str
    uid: int
    home: str  # node where it was created
    gpid: int
    state: str = "running"  # running, deputy, guest, unmovable: reason
    node: str = ""  # where it actually runs (for a deputy: the peer)
    remote_pid: int = 0
    cmd: str = ""
    key: str = ""  # the Job (on this node) it belongs to; a guest job has its own
    moves: int = 0  # how often `dunix migrate` moved it
    migrated: bool = False  # a deputy made in place by a move from home (its cmd is kept)


@dataclass
class Job:
    id: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    mode: str
    first_pid: int = 0
    tracers: list[Tracer] = field(default_factory=list)
    finished: trio.Event = field(default_factory=trio.Event)
    status: int | None = None
    #: for the processes of a job that came from elsewhere: (home node, job id, gpid)
    guest: tuple[str, str, int] | None = None


def user_groups(uid: int, gid: int) -> tuple[int, ...]:
    """The supplementary groups the system gives ``uid`` (what a login would have)."""
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return (gid,)
    return tuple(os.getgrouplist(name, gid))


def start_time(pid: int, *, zombies: bool = False) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot): with the pid, what names one
    process (a pid alone may be reused); None if gone (or a zombie, unless ``zombies``)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()  # comm may hold spaces and parentheses
    if fields[0] in (b"X", b"x") or (fields[0] == b"Z" and not zombies):
        return None
    return int(fields[19])


def proc_cmd(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class JobService:
    """The job side of the agent: start jobs, track their processes, answer ps and kill."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.jobs: dict[str, Job] = {}
        self.procs: dict[int, Proc] = {}
        self._ids = itertools.count(1)
        self.default_mode = "auto"
        self.on_remote: Callable[[Job, WentRemote], None] | None = None
        self.on_started: dict[str, Callable[[Started], None]] = {}
        self.on_stopped: Callable[[Job, Stopped], None] | None = None
        self.on_exited: Callable[[int], None] | None = None  # a traced process ended
        #: per job id: its first process stopped (`dunix run` then stops too)
        self.on_first_stopped: dict[str, Callable[[Stopped], None]] = {}
        self.pid_steer = PidSteer() if agent.config.pid_ranges else None
        #: jobs whose new processes are held at fork for a placement decision, and the
        #: slot-table mode for it (``FORK_PLACEMENT_ENV``; agent/homemove.py)
        self.fork_jobs: dict[str, str] = {}

    @property
    def name(self) -> str:
        return self.agent.config.name

    def gpid(self, pid: int) -> int:
        return make_gpid(self.agent.node_id, pid)

    def new_job_id(self) -> str:
        return f"{self.name}-{next(self._ids)}-{secrets.token_hex(3)}"

    def aim_pids(self) -> None:
        """At start-up: the first job process here already gets a pid of this node's range."""
        if self.pid_steer is not None:
            self.pid_steer.aim(self.agent.node_id)

    # -- starting a job -----------------------------------------------------------------

    def context_for(
        self, uid: int, gid: int, groups: tuple[int, ...], cwd: str, umask: int,
        env: dict[str, str], mode: str,
    ) -> JobContext:  # fmt: skip
        if mode not in MODES:
            raise ConfigError(f"placement mode {mode!r} is not one of {', '.join(MODES)}")
        if not 0 <= umask <= 0o777:
            raise ConfigError(f"bad umask {umask:o}")
        return JobContext(uid, gid, groups, umask, cwd, env, mode=mode)

    def start(self, job: Job, ctx: JobContext, argv: list[str], fds: dict[int, int]) -> Tracer:
        tracer = Tracer.spawn(ctx, argv, fds)
        job.tracers.append(tracer)
        self.jobs[job.id] = job
        fork_mode = ctx.env.get(FORK_PLACEMENT_ENV, "")
        if fork_mode in ("auto", "remote"):
            self.fork_jobs[job.id] = fork_mode
        return tracer

    async def follow(self, job: Job, tracer: Tracer, argv0: str = "") -> None:
        """Read the tracer's events until it is done; keep ``self.procs`` current."""
        mark = self._mark(tracer.pid)
        try:
            if job.id in self.fork_jobs:
                await tracer.hold_forks(True)
            while True:
                event = await tracer.next_event()
                if event is None or isinstance(event, Done):
                    break
                self._on_event(job, tracer, event, argv0)
        finally:
            with trio.CancelScope(shield=True):
                tracer.kill()
                await tracer.wait()
            tracer.close()
            if tracer in job.tracers:
                job.tracers.remove(tracer)
            if mark is not None:
                with contextlib.suppress(OSError):
                    mark.unlink()

    # -- what an agent that died left running --------------------------------------------

    @property
    def _marks(self) -> Path:
        return self.agent.config.control.parent / TRACERS_FOLDER

    def _mark(self, pid: int) -> Path | None:
        """Note a running tracer (pid and start time) in the agent's runtime folder: if this
        agent dies, the next one here ends what it traced (``sweep_leftovers``)."""
        start = start_time(pid)
        if start is None:
            return None
        mark = self._marks / f"{pid}-{start}"
        try:
            mark.touch()
        except FileNotFoundError:
            self._marks.mkdir(parents=True, exist_ok=True)
            mark.touch()
        return mark

    def sweep_leftovers(self) -> int:
        """At start-up: kill the tracers an earlier agent here left (it was killed), and
        with them (PTRACE_O_EXITKILL) every process they traced: guests whose home has
        given them up, a home job whose client and deputies are gone. How many."""
        killed = 0
        with contextlib.suppress(FileNotFoundError):
            for mark in self._marks.iterdir():
                pid, _, start = mark.name.partition("-")
                if pid.isdigit() and start.isdigit() and start_time(int(pid)) == int(start):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
                        killed += 1
                with contextlib.suppress(OSError):
                    mark.unlink()
        if killed:
            log.warning("killed %d tracer(s) an earlier agent left, with what they traced",
                        killed)  # fmt: skip
        return killed

    def _on_event(self, job: Job, tracer: Tracer, event: TracerEvent, argv0: str) -> None:
        if self.pid_steer is not None and isinstance(event, Started | Forked):
            new = event.child if isinstance(event, Forked) else event.pid
            self.pid_steer.forked(self.agent.node_id, new)
        if isinstance(event, Started):
            job.first_pid = job.first_pid or event.pid
            if job.guest is not None:
                home, job_id, gpid = job.guest
                proc = Proc(event.pid, job_id, job.uid, home, gpid, "guest", cmd=argv0)
            else:
                proc = Proc(event.pid, job.id, job.uid, self.name, self.gpid(event.pid), cmd=argv0)
            proc.key = job.id
            self.procs[event.pid] = proc
            callback = self.on_started.get(job.id)
            if callback is not None:
                callback(event)
        elif isinstance(event, Forked):
            parent = self.procs.get(event.parent)
            self.procs[event.child] = Proc(
                event.child, parent.job if parent else job.id, job.uid, self.name,
                self.gpid(event.child), cmd=parent.cmd if parent else "", key=job.id,
            )  # fmt: skip
            if job.id in self.fork_jobs:  # held at its fork stop: place it or let it run
                from dunix.agent.homemove import home_moves

                home_moves(self.agent.migration).forked(job, tracer, event)
        elif isinstance(event, Execed):
            known = self.procs.get(event.pid)
            if known is not None:
                known.cmd = event.path
        elif isinstance(event, WentRemote):
            known = self.procs.get(event.pid)
            if known is not None:
                known.state, known.node = "deputy", event.node
            if self.on_remote is not None:
                self.on_remote(job, event)
        elif isinstance(event, Unmovable):
            known = self.procs.get(event.pid)
            if known is not None:
                known.state = f"unmovable: {event.reason}"
        elif isinstance(event, Stopped):
            if self.on_stopped is not None:
                self.on_stopped(job, event)
            first_stopped = self.on_first_stopped.get(job.id)
            if first_stopped is not None and event.pid == job.first_pid:
                first_stopped(event)
        elif isinstance(event, Exited):
            if self.on_exited is not None:
                self.on_exited(event.pid)
            gone = self.procs.pop(event.pid, None)
            if gone is not None and gone.state.startswith("lost:"):
                self.procs[event.pid] = gone  # ps says why until its parent reaps it
                self.agent.nursery.start_soon(self._until_reaped, gone)
            if event.pid == job.first_pid and job.status is None:
                job.status = event.status
                job.finished.set()

    async def _until_reaped(self, proc: Proc) -> None:
        """Drop a lost process's entry once its zombie is reaped (or the job ended)."""
        pid, start = proc.pid, start_time(proc.pid, zombies=True)
        while self.procs.get(pid) is proc and start is not None:
            await trio.sleep(REAP_POLL)
            if start_time(pid, zombies=True) != start:
                break
        if self.procs.get(pid) is proc:
            del self.procs[pid]

    # -- ending a job -------------------------------------------------------------------

    def of(self, job: Job) -> list[Proc]:
        return [p for p in self.procs.values() if p.key == job.id]

    def kill_job(self, job: Job, sig: int = signal.SIGKILL) -> None:
        """Signal every process of the job on this node (the tracer's EXITKILL does the rest)."""
        for proc in self.of(job):
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)

    def forget(self, job: Job) -> None:
        self.fork_jobs.pop(job.id, None)
        for proc in self.of(job):
            self.procs.pop(proc.pid, None)
        for tracer in job.tracers:
            tracer.kill()
        self.jobs.pop(job.id, None)

    # -- ps and kill ----------------------------------------------------------------------

    def ps(self) -> list[ProcInfo]:
        out = []
        for proc in list(self.procs.values()):
            cpu, rss = 0.0, 0
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(proc.pid)
                times = p.cpu_times()
                cpu, rss = times.user + times.system, p.memory_info().rss
            out.append(
                ProcInfo(
                    gpid=proc.gpid,
                    job=proc.job,
                    home=proc.home,
                    node=proc.node or self.name,
                    pid=proc.remote_pid or proc.pid,
                    uid=proc.uid,
                    state=proc.state,
                    cmd=proc.cmd if proc.migrated else proc_cmd(proc.pid) or proc.cmd,
                    cpu=round(cpu, 2),
                    rss=rss,
                    moves=proc.moves,
                )
            )
        return out

    def find_home_pid(self, gpid: int) -> Proc:
        node_id, pid = split_gpid(gpid)
        if node_id != self.agent.node_id:
            raise NoSuchProcess(f"gpid {gpid} was not created on {self.name}")
        proc = self.procs.get(pid)
        if proc is None or proc.gpid != gpid:
            raise NoSuchProcess(f"no managed process with gpid {gpid}")
        return proc

    def kill(self, gpid: int, sig: int, uid: int | None) -> None:
        """Signal a process by gpid as ``uid`` (None: an administrator)."""
        proc = self.find_home_pid(gpid)
        if uid is not None and uid != 0 and uid != proc.uid:
            raise AccessDenied(f"uid {uid} may not signal gpid {gpid} (owned by {proc.uid})")
        try:
            os.kill(proc.pid, sig)  # a deputy forwards it to where the process runs
        except ProcessLookupError:
            raise NoSuchProcess(f"gpid {gpid} has exited") from None
        except OSError as exc:
            raise DunixError(f"cannot signal gpid {gpid}: {exc.strerror}") from None
