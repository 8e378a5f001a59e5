"""Which running processes leave this node, and for where: the sans-IO live balancer.

Exec-time placement (``placement.py``) spreads new work; this moves work that is already
running, as MOSIX's load balancer does (A. Barak, O. La'adan, "The MOSIX multicomputer
operating system for high performance cluster computing", FGCS 13(4-5), 1998): a node
whose load exceeds a peer's by more than a threshold sends it a long-running CPU-bound
process of small memory, and a process stays put for a minimum residency after a move.

The agent calls :meth:`Balancer.decide` every ``period`` with the gossiped members, the
local movable processes (:class:`Candidate`) and the time, carries out the
:class:`Decision` list through the migration service and reports each outcome with
:meth:`Balancer.finished`. Rules, all numbers from :class:`BalancerConfig`:

* loads are run-queue lengths divided by the CPU quota (``NodeLoad.load_now``): a
  CPU-bound loop counts one runnable thread however little CPU its quota lets it have;
* a process is a candidate when it has been on this node for ``min_residency`` seconds
  times (1 + its moves so far) (a process that moves often must stay longer), its RSS is
  at most ``max_rss``, it is not in flight nor backing off after a failed move, and it is
  CPU-bound: it used at least ``min_cpu_share`` of its fair share of the node over the
  window (on a 0.5-CPU node with 6 loops each gets 0.083 CPU, and that is "all it can");
* candidates go smallest memory first (power-of-two RSS buckets, so a few kB do not
  outweigh age), then longest on this node, then fewest moves;
* a peer is a target when it is alive, its load was heard within ``max_load_age``, it has
  a positive quota, its CPU features can host the process's origin's, and (when it says)
  it has twice the process's RSS free;
* a move happens only when the source exceeds the target by more than ``threshold`` and,
  after the move, the target would not be busier than the source (otherwise the process
  would be sent straight back: ping-pong); the coldest such target wins (name on ties);
* every decision shifts its expected load at once (the process's runnable share divided
  by each side's quota), so the next decision of the same round, and later rounds until
  gossip shows the move, see it. As in ``placement.py`` a shift is anchored to the figure
  it was decided from, so a fresh figure that already shows the move does not count it
  twice; it expires after ``charge_ttl``;
* at most ``max_moves`` moves in flight, and none decided within ``cooldown`` seconds
  of the last decision (the sampler and gossip need that long to see what moved);
* a failed move puts the process on ``failure_backoff`` seconds of rest, doubled for each
  further failure (capped at 16x); the migration service has left it running where it was.

Nothing here reads a clock or does IO: the time comes in as ``now``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from dunix.errors import ConfigError
from dunix.loadbalance._types import Member, MemberState
from dunix.migrate.cpufeatures import CpuFeatures

_INT_FIELDS = ("max_moves", "max_rss")


@dataclass(frozen=True, slots=True)
class BalancerConfig:
    """Every threshold of the live balancer (loads normalised: 1.0 = quota busy)."""

    #: seconds between two looks at the loads
    period: float = 1.0
    #: the source must exceed the target's load by more than this
    threshold: float = 0.5
    #: seconds a process stays on a node before it may move (times 1 + its moves)
    min_residency: float = 5.0
    #: fraction of its fair share of the node a process must have used to be CPU-bound
    min_cpu_share: float = 0.5
    #: a process with more resident memory than this never moves by itself (bytes)
    max_rss: int = 1 << 30
    #: moves in flight at once from this node
    max_moves: int = 2
    #: seconds after a decision before the next one (lets sampling and gossip catch up)
    cooldown: float = 2.0
    #: seconds a decided move counts in both nodes' projected loads
    charge_ttl: float = 4.0
    #: a peer whose load is older than this is not a target
    max_load_age: float = 10.0
    #: seconds a process rests after a failed move (doubled per further failure)
    failure_backoff: float = 30.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value: Any = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"balancer.{f.name} must be a number")
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"balancer.{f.name} must be a finite number >= 0")
            if f.name in _INT_FIELDS and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"balancer.{f.name} must be an integer >= 1")
        if self.period <= 0 or self.max_load_age <= 0:
            raise ConfigError("balancer.period and max_load_age must be > 0")
        if self.min_cpu_share > 1:
            raise ConfigError("balancer.min_cpu_share must be between 0 and 1")


@dataclass(frozen=True, slots=True)
class Candidate:
    """A local process the balancer may move, as sampled over the last ``window`` seconds."""

    gpid: int
    cpu_seconds: float  # CPU time used during the window
    window: float  # seconds the CPU time was measured over
    rss: int  # bytes
    age: float  # seconds on this node (since it started or arrived here)
    moves: int = 0  # moves so far
    features: CpuFeatures = field(default_factory=lambda: CpuFeatures(0, 0))  # its origin's
    #: nodes it may not go to (e.g. the home of a process moved from home: its deputy
    #: holds its pid there)
    not_to: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Decision:
    """Move ``gpid`` to ``node``; ``reason`` says why (for the log)."""

    gpid: int
    node: str
    reason: str


@dataclass(frozen=True, slots=True)
class _Shift:
    gpid: int
    at: float
    amount: float  # normalised load on that node
    base: float  # the node's figure the decision was made from


@dataclass(slots=True)
class _Peer:
    name: str
    load: float
    cpus: float
    features: CpuFeatures
    mem_free: int


def _rss_bucket(rss: int) -> int:
    return max(rss, 0).bit_length()


class Balancer:
    """Turns loads and local processes into moves (sans-IO); see the module docstring."""

    def __init__(self, config: BalancerConfig) -> None:
        self.config = config
        self._in_flight: dict[int, str] = {}  # gpid → target
        self._failures: dict[int, tuple[int, float]] = {}  # gpid → (count, rest until)
        self._last_decision = -math.inf
        #: per node (this one included): load shifted by our decisions, oldest first
        self._shifts: dict[str, list[_Shift]] = {}

    # -- outcomes -------------------------------------------------------------------------

    @property
    def in_flight(self) -> dict[int, str]:
        return dict(self._in_flight)

    def finished(self, gpid: int, ok: bool, now: float) -> None:
        """A decided move ended: ``ok`` it runs on its target now; else it stayed here,
        its shifts are withdrawn and it rests before it may be chosen again."""
        self._in_flight.pop(gpid, None)
        if ok:
            self._failures.pop(gpid, None)
            return
        for name in list(self._shifts):
            kept = [s for s in self._shifts[name] if s.gpid != gpid]
            if kept:
                self._shifts[name] = kept
            else:
                del self._shifts[name]
        count, _ = self._failures.get(gpid, (0, 0.0))
        rest = self.config.failure_backoff * min(16, 2**count)
        self._failures[gpid] = (count + 1, now + rest)

    def resting(self, gpid: int, now: float) -> bool:
        entry = self._failures.get(gpid)
        return entry is not None and now < entry[1]

    # -- loads ----------------------------------------------------------------------------

    def _prune(self, now: float, gpids: set[int]) -> None:
        ttl = self.config.charge_ttl
        for name in list(self._shifts):
            kept = [s for s in self._shifts[name] if now < s.at + ttl]
            if kept:
                self._shifts[name] = kept
            else:
                del self._shifts[name]
        for gpid in [g for g, (_, until) in self._failures.items() if g not in gpids]:
            if now >= self._failures[gpid][1]:
                del self._failures[gpid]

    def projected(self, name: str, figure: float) -> float:
        """A node's load with our live shifts: each shift counts from the figure it was
        decided from, so a newer figure that already shows it does not count it twice
        (the highest projection for a node that gains, the lowest for one that loses)."""
        projections = []
        after = 0.0
        for s in reversed(self._shifts.get(name, [])):
            after += s.amount
            projections.append(s.base + after)
        if not projections:
            return figure
        return max(figure, *projections) if after > 0 else min(figure, *projections)

    def _shift(self, name: str, gpid: int, now: float, amount: float, base: float) -> None:
        self._shifts.setdefault(name, []).append(_Shift(gpid, now, amount, base))

    def _peers(self, self_name: str, members: Sequence[Member], now: float) -> list[_Peer]:
        out = []
        for m in members:
            if m.name == self_name or m.state is not MemberState.ALIVE:
                continue
            if now - m.load_at > self.config.max_load_age or m.load.cpus <= 0:
                continue
            load = self.projected(m.name, m.load.load_now)
            features = CpuFeatures(m.load.cpu_level, m.load.cpu_flags)
            out.append(_Peer(m.name, load, m.load.cpus, features, m.load.mem_free))
        return out

    # -- candidates -----------------------------------------------------------------------

    def demand(self, c: Candidate, local_load: float, cpus: float) -> float:
        """How many runnable threads ``c`` is worth, 0 to 1: the CPU it used over the
        CPU a fair share of this node would have given it."""
        if c.window <= 0 or cpus <= 0:
            return 0.0
        runnable = max(1.0, local_load * cpus)
        fair = min(1.0, cpus / runnable)
        return min(1.0, (c.cpu_seconds / c.window) / fair)

    def eligible(self, c: Candidate, now: float, demand: float) -> bool:
        cfg = self.config
        return (
            c.age >= cfg.min_residency * (1 + c.moves)
            and c.rss <= cfg.max_rss
            and demand >= cfg.min_cpu_share
            and c.gpid not in self._in_flight
            and not self.resting(c.gpid, now)
        )

    # -- decisions ------------------------------------------------------------------------

    def decide(
        self,
        self_name: str,
        members: Sequence[Member],
        procs: Sequence[Candidate],
        now: float,
        local_load: float | None = None,
    ) -> list[Decision]:
        """The moves to start now (at most ``max_moves`` in flight counting earlier ones).

        ``local_load`` (this node's normalised run-queue length, fresher than its own
        gossiped record) replaces the figure in ``members`` when given.
        """
        cfg = self.config
        self._prune(now, {c.gpid for c in procs})
        if now < self._last_decision + cfg.cooldown:
            return []
        slots = cfg.max_moves - len(self._in_flight)
        if slots <= 0 or not procs:
            return []
        me = next((m for m in members if m.name == self_name), None)
        if me is None or me.load.cpus <= 0:
            return []
        cpus = me.load.cpus
        figure = me.load.load_now if local_load is None else local_load
        load = self.projected(self_name, figure)
        peers = self._peers(self_name, members, now)
        if not peers:
            return []
        scored = [(c, self.demand(c, figure, cpus)) for c in procs]
        ready = [(c, d) for c, d in scored if self.eligible(c, now, d)]
        ready.sort(key=lambda cd: (_rss_bucket(cd[0].rss), -cd[0].age, cd[0].moves, cd[0].gpid))
        out: list[Decision] = []
        for c, d in ready:
            if len(out) >= slots:
                break
            best: _Peer | None = None
            for p in peers:
                if load - p.load <= cfg.threshold or not p.features.can_host(c.features):
                    continue
                if p.name in c.not_to:
                    continue
                if p.mem_free and p.mem_free < 2 * c.rss:
                    continue
                if p.load + d / p.cpus > load - d / cpus + 1e-9:
                    continue  # the target would end up busier than us: it would send it back
                after = (p.load + d / p.cpus, p.name)
                if best is None or after < (best.load + d / best.cpus, best.name):
                    best = p
            if best is None:
                continue
            reason = f"{self_name} {load:.2f} → {best.name} {best.load:.2f}"
            self._shift(self_name, c.gpid, now, -d / cpus, figure)
            self._shift(best.name, c.gpid, now, d / best.cpus, best.load)
            load -= d / cpus
            best.load += d / best.cpus
            self._in_flight[c.gpid] = best.name
            out.append(Decision(c.gpid, best.name, reason))
        if out:
            self._last_decision = now
        return out
