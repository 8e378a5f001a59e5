"""The agent's live balancer: every ``period``, move CPU-bound processes off a hot node.

Each period the service samples the CPU time, memory and age of the local job processes
the migration service can move, hands them with the gossiped loads to the sans-IO
:class:`~dunix.loadbalance.balancer.Balancer`, and starts one ``MigrationService.request``
per decision. A failed move leaves the process running here (the migration service
resumes it where it was), is logged, and the balancer rests that process
(``failure_backoff``).

What can move: what ``MigrationService.request`` accepts, that is a process of a job
whose placement mode is not ``local`` (a user who asked for local gets local), alone in
its (guest) job here, and without children (a tree cannot move yet): a *guest* (running
here for a home elsewhere, or restored back at its home; ``migration.py``) or a process
still *running* at its home (``homemove.py``: it leaves a deputy in its place).

A process's age on this node is its kernel start time: a remote exec starts it here, and
a CRIU restore creates a new task (CRIU does not restore ``start_time``), so a process
that just arrived is young again and the residency rule applies. Processes are keyed by
(pid, start time), never a bare pid, as psutil does.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psutil
import trio

from dunix.errors import ConfigError, DunixError
from dunix.loadbalance.balancer import Balancer, BalancerConfig, Candidate, Decision
from dunix.migrate.cpufeatures import CpuFeatures

if TYPE_CHECKING:
    from dunix.agent.daemon import Agent

log = logging.getLogger("dunix.agent.balance")


@dataclass(frozen=True, slots=True)
class Movable:
    """A local process the migration service could move, as the process table has it."""

    pid: int
    gpid: int
    moves: int
    features: CpuFeatures  # its origin's (its home's)
    not_to: frozenset[str] = frozenset()


#: (pid, start time) → (CPU seconds, wall time) at the previous sample
Seen = dict[tuple[int, float], tuple[float, float]]


def sample(procs: list[Movable], seen: Seen, wall: float) -> tuple[list[Candidate], Seen]:
    """Read each process's CPU time, RSS and start time (``/proc`` through psutil); a
    process seen for the first time gives no candidate yet (no window to measure over)."""
    out: list[Candidate] = []
    now_seen: Seen = {}
    for m in procs:
        if _has_children(m.pid):
            continue  # CRIU would dump the tree, the migration service refuses it
        try:
            p = psutil.Process(m.pid)
            with p.oneshot():
                started = p.create_time()
                times = p.cpu_times()
                rss = p.memory_info().rss
        except psutil.Error:
            continue
        cpu = times.user + times.system
        key = (m.pid, started)
        now_seen[key] = (cpu, wall)
        prev = seen.get(key)
        if prev is None or wall <= prev[1]:
            continue
        used = max(0.0, cpu - prev[0])
        out.append(Candidate(m.gpid, used, wall - prev[1], rss, wall - started, m.moves,
                             m.features, m.not_to))  # fmt: skip
    return out, now_seen


def _has_children(pid: int) -> bool:
    """From ``/proc/PID/task/*/children`` (CONFIG_PROC_CHILDREN), not a scan of all pids."""
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                if f.read().strip():
                    return True
    except OSError:
        return False
    return False


def balancer_config(settings: dict[str, Any]) -> BalancerConfig:
    """The ``[balancer]`` table of the agent's config as a :class:`BalancerConfig`."""
    try:
        return BalancerConfig(**settings)
    except TypeError as exc:
        raise ConfigError(f"[balancer]: {exc}") from None


class BalanceService:
    """Drives a :class:`Balancer` with this agent's processes, loads and migrations."""

    def __init__(self, agent: Agent, config: BalancerConfig) -> None:
        self.agent = agent
        self.config = config
        self.balancer = Balancer(config)
        self._seen: Seen = {}

    def movable(self) -> list[Movable]:
        """Processes the migration service can move (see the module docstring)."""
        jobs = self.agent.jobs
        procs = list(jobs.procs.values())
        me = self.agent.config.name
        # a guest moved from its home has its home pid, which its deputy holds there:
        # it cannot go home (migration refuses it before freezing)
        remote = getattr(self.agent, "remote", None)
        pid_at_home = {g.pid for g in getattr(remote, "guests", {}).values() if g.pid == g.home_pid}
        out = []
        for p in procs:
            job = jobs.jobs.get(p.key)
            if job is None or job.mode == "local":
                continue
            not_to: frozenset[str] = frozenset()
            if p.state == "guest":
                if sum(1 for q in procs if q.key == p.key) != 1:
                    continue
                if p.pid in pid_at_home:
                    not_to = frozenset((p.home,))
            elif p.state != "running" or p.home != me:
                continue
            out.append(Movable(p.pid, p.gpid, p.moves, self._features_of(p.home), not_to))
        return out

    def _features_of(self, node: str) -> CpuFeatures:
        for m in self.agent.membership.members():
            if m.name == node:
                return CpuFeatures(m.load.cpu_level, m.load.cpu_flags)
        return self.agent.features

    async def run(self) -> None:
        log.info("balancer on: every %.1f s, threshold %.2f, residency %.1f s",
                 self.config.period, self.config.threshold, self.config.min_residency)  # fmt: skip
        while True:
            await trio.sleep(self.config.period)
            await self.step()

    async def step(self) -> list[Decision]:
        """One look: sample, decide, start the moves (they run on in the agent's nursery)."""
        procs = self.movable()
        if not procs:
            self._seen = {}
            return []
        seen = self._seen
        candidates, self._seen = await trio.to_thread.run_sync(sample, procs, seen, time.time())
        agent = self.agent
        now = trio.current_time()
        members = agent.membership.members()
        decisions = self.balancer.decide(agent.config.name, members, candidates, now)
        for d in decisions:
            log.info("balancer: moving gpid %d to %s (%s)", d.gpid, d.node, d.reason)
            agent.nursery.start_soon(self._move, d)
        return decisions

    async def _move(self, d: Decision) -> None:
        ok = False
        try:
            reply = await self.agent.migration.request(d.gpid, d.node, None)
        except DunixError as exc:
            log.warning("balancer: gpid %d did not move to %s, it runs on here: %s: %s",
                        d.gpid, d.node, type(exc).__name__, exc)  # fmt: skip
        except Exception:  # a bug in a move must not take the agent down with it
            log.exception("balancer: moving gpid %d to %s failed", d.gpid, d.node)
        else:
            ok = True
            log.info("balancer: gpid %d moved %s → %s, freeze %.0f ms, %d moves",
                     d.gpid, reply.source, reply.target, reply.freeze_ms, reply.moves)  # fmt: skip
        finally:
            self.balancer.finished(d.gpid, ok, trio.current_time())
