"""Load sampling for the local node: run-queue load normalised by the node's CPU quota.

The kernel's load average (``/proc/loadavg``) is global: every container and every
simulated host on one machine sees the same number, so it cannot tell a busy host from an
idle one. Instead the sampler counts the runnable threads of the node's own cgroup
(cgroup v1 ``tasks`` of the cpu hierarchy, v2 ``cgroup.threads``) and keeps a 1-minute
exponential average of that count as the kernel does (kernel/sched/loadavg.c: EXP_1 is
exp(-5 s/60 s) per 5-second tick). Both are divided by the quota in CPUs
(``cpu.cfs_quota_us / cpu.cfs_period_us`` or ``cpu.max``), so 1.0 means "fully busy"
whatever the node's size. A node in the root cgroup (a real host) uses the system's own
``os.getloadavg()`` and CPU count instead.

CFS-throttled threads stay in state R, so a CPU-bound loop under a 0.5-CPU quota counts
as one runnable thread and a normalised load of 2.0.

Placement wants the count *now*: a sample is up to ``sample_interval`` (1 s) old, and a
home that planned a burst from its sample taken while a job had just ended saw itself
busy and sent the job's first process away (spread_bench: the 32-job script ran on n2
instead of n1, and n1's equally stale figure cost it a job). :meth:`LoadSampler.fresh_runnable`
counts again when the last count is older than ``fresh_age`` (cheap: one read of the
cgroup's thread list and one ``/proc/TID/stat`` per thread).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import psutil

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class CgroupView:
    """Where this node's cgroup files are, and its CPU quota in CPUs."""

    threads_file: Path | None  # None: not in a dunix cgroup, use the system's numbers
    cpus: float


def _quota_v1(cpu_dir: Path) -> float | None:
    try:
        quota = int((cpu_dir / "cpu.cfs_quota_us").read_text())
        period = int((cpu_dir / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def _quota_v2(cg_dir: Path) -> float | None:
    try:
        quota, period = (cg_dir / "cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def find_cgroup(proc_cgroup: Path = Path("/proc/self/cgroup")) -> CgroupView:
    """Locate the calling process's CPU cgroup (v1 ``cpu`` controller or the v2 group)."""
    system_cpus = float(os.cpu_count() or 1)
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return CgroupView(None, system_cpus)
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            if path == "/":
                return CgroupView(None, system_cpus)
            cpu_dir = CGROUP_ROOT / "cpu" / path.lstrip("/")
            quota = _quota_v1(cpu_dir)
            return CgroupView(cpu_dir / "tasks", min(quota or system_cpus, system_cpus))
    for line in lines:
        hier, controllers, path = line.split(":", 2)
        if hier == "0" and controllers == "":
            if path == "/":
                return CgroupView(None, system_cpus)
            cg_dir = CGROUP_ROOT / path.lstrip("/")
            quota = _quota_v2(cg_dir)
            return CgroupView(cg_dir / "cgroup.threads", min(quota or system_cpus, system_cpus))
    return CgroupView(None, system_cpus)


#: the agent's own helper programs (``comm``): not the node's work when they are its children
HELPERS = frozenset({"dunix-tracer", "dunix-relay", "criu"})


def count_runnable(threads_file: Path, exclude: set[int], parent: int | None = None) -> int:
    """Threads of the cgroup in state R, not counting ``exclude`` (the sampler itself) nor
    ``parent``'s helpers: its children running one of :data:`HELPERS` (a job's tracer is R
    while it starts, which made a home that planned a new job count it as work and send
    the job's first process away). Its other children are work: a process CRIU restored
    here is the agent's child too (a CPU loop moved here counted as no load, so the
    balancer kept sending loops to a host that had them)."""
    try:
        tids = threads_file.read_text().split()
    except OSError:
        return 0
    running = 0
    for tid in tids:
        if int(tid) in exclude:
            continue
        try:
            stat = Path(f"/proc/{tid}/stat").read_text()
        except OSError:
            continue  # exited between the two reads
        # the state follows the parenthesised command, which may itself hold ") ";
        # then comes the parent's pid (of the thread's process)
        close = stat.rindex(")")
        fields = stat[close + 2 :].split(" ", 2)
        if fields[0] != "R":
            continue
        helper = parent is not None and int(fields[1]) == parent
        if not (helper and stat[stat.index("(") + 1 : close] in HELPERS):
            running += 1
    return running


@dataclass(frozen=True)
class LoadSample:
    load1: float  # 1-minute average run-queue length / cpus
    load_now: float  # instantaneous run-queue length / cpus
    cpus: float
    mem_free: int  # bytes


class LoadSampler:
    """Keeps the 1-minute average between calls; call :meth:`sample` every few seconds."""

    def __init__(self, view: CgroupView | None = None, window: float = 60.0) -> None:
        self.view = view or find_cgroup()
        self.window = window
        self._avg: float | None = None
        self._last: float | None = None
        self._self_tids = {int(t) for t in os.listdir("/proc/self/task")}
        #: the last count of runnable threads and when it was taken (monotonic)
        self._counted: tuple[float, int] | None = None

    def runnable(self) -> int:
        if self.view.threads_file is None:
            return max(0, len(_system_runnable()) - 1)
        self._self_tids = {int(t) for t in os.listdir("/proc/self/task")}
        return count_runnable(self.view.threads_file, self._self_tids, os.getpid())

    def fresh_runnable(self, now: float, fresh_age: float = 0.05) -> int:
        """Runnable threads here, counted at most ``fresh_age`` seconds before ``now``
        (a new count when the last one, by this or :meth:`sample`, is older)."""
        last = self._counted
        if last is not None and 0.0 <= now - last[0] <= fresh_age:
            return last[1]
        count = self.runnable()
        self._counted = (now, count)
        return count

    def sample(self, now: float) -> LoadSample:
        cpus = self.view.cpus
        mem_free = int(psutil.virtual_memory().available)
        count = self.runnable()
        self._counted = (now, count)
        running = float(count)
        if self.view.threads_file is None:
            load1 = os.getloadavg()[0]
        else:
            if self._avg is None or self._last is None:
                self._avg = running
            else:
                decay = math.exp(-max(0.0, now - self._last) / self.window)
                self._avg = self._avg * decay + running * (1.0 - decay)
            load1 = self._avg
        self._last = now
        return LoadSample(load1 / cpus, running / cpus, cpus, mem_free)


def _system_runnable() -> list[int]:
    """Pids of runnable processes machine-wide (for a node that is a whole real host)."""
    out = []
    for proc in psutil.process_iter(["status"]):
        if proc.info["status"] == psutil.STATUS_RUNNING:
            out.append(proc.pid)
    return out
