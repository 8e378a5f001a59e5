"""Where the next execs of a job go: the sans-IO placement policy behind the slot table.

The tracer decides local-or-remote at every exec without asking anyone (a round trip per
exec would double its cost, see DESIGN.md "Tracer"), from a *slot table* the agent pushes
to it: how many execs it may send to each peer until the next refresh (``docs/run.md``,
mode ``auto``). :class:`PlacementPolicy` computes that table from gossiped membership.

Why two random choices and not "the least loaded peer". Every figure a node has about its
peers is stale (gossiped once a second or less often, and older still on big clusters).
Sending every exec to the peer that *looked* least loaded makes all of them land on that
one peer until the next gossip shows it swamped, and several homes doing the same at once
pile onto the same victim (herding). Mitzenmacher showed that letting each arrival pick
the lighter of two peers drawn at random already gives most of the benefit of full
information (in the supermarket model queue lengths fall doubly exponentially instead of
exponentially; for balls into bins the fullest bin drops from about ln n / ln ln n to
ln ln n / ln 2), and that with old load information "the least loaded" herds and can do
worse than random while two random choices stay close to the best (M. Mitzenmacher, "The
Power of Two Choices in Randomized Load Balancing", IEEE TPDS 12(10), 2001; the stale
model is his "How Useful Is Old Information?", IEEE TPDS 11(1), 2000).

Where that acts here: :meth:`PlacementPolicy.choose` is two choices outright. A slot table
is filled one slot at a time, each going to the lighter of two open peers, charged at once
so the next slot sees it. While every open peer can be filled to its ceiling (below) the
*counts* in the table do not depend on the order, and the spread comes from the ceiling
and the charges; when ``max_table_slots`` binds (big clusters) the two choices decide who
gets the slots, and homes planning from the same stale view then hand them to different
peers instead of all to the same few least loaded ones (``choices`` = the peer count
would do the latter; tests/unit/test_placement.py measures the overlap). On top of that
the policy *charges* each peer for the placements this node made since the peer's load
was last heard, so a burst from one home does not overfill a peer before the gossip
catches up.

Rules, all numbers from :class:`PlacementConfig`:

* a peer is a candidate when it is alive, its load was heard within ``max_load_age``, its
  CPU features can host the origin's (:meth:`CpuFeatures.can_host`) and it reports a
  positive CPU quota;
* a node's load is the higher of ``load_now`` and ``now_weight * load_now + (1 -
  now_weight) * load1`` (both already divided by its CPU quota). With the default
  ``now_weight`` of 1 that is ``load_now`` alone: the runnable threads of the node's
  cgroup when it was sampled, which shows a burst within a sample and a host that has
  just finished its work as idle at once. The 1-minute average lets a dip count only
  slowly: a 2-CPU host that had run 16 jobs for 25 s still shows ``load1`` ~2.7, so
  with the old weight of 0.7 it looked 1.6 runnable busy for most of a minute after,
  and a burst's spill gave it a job fewer (tests/unit/test_placement.py). A quiet
  sample of a host running short jobs may make it look idle; the charges below and the
  spill window bound what one such look sends there. Plus, for a peer, the placements
  charged to it and not yet reflected in its gossiped figure divided by its quota;
* nothing goes remote unless the home's load is at least ``home_threshold``;
* a peer gets slots only if it is at least ``hysteresis`` below the home's load (so a
  process is not sent to a peer that would then want to send it back), and then only until
  it reaches the higher of the home's level (less the hysteresis) and ``target_load``:
  below ``target_load`` an idle peer is worth filling even when the home is only just
  over its threshold; above it, up to the home's level so that a burst spreads evenly
  over the cluster instead of piling on the home;
* at most ``max_slots`` per peer and ``max_table_slots`` in one table.

Nothing here reads a clock or does IO: times come in as ``now``, randomness from the
``random.Random`` the caller passes (seeded in tests and simulations).
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from dunix.errors import ConfigError, NoSuchNode
from dunix.loadbalance._types import Member, MemberState
from dunix.migrate.cpufeatures import CpuFeatures

_INT_FIELDS = ("choices", "max_slots", "max_table_slots", "force_slots", "spill_window")

#: the home in a spill order sent to a tracer (no node is called that)
HOME_MARK = "."


@dataclass(frozen=True, slots=True)
class PlacementConfig:
    """Every threshold of exec-time placement (loads are normalised: 1.0 = quota busy)."""

    #: the home sends nothing away while its load is below this
    home_threshold: float = 0.75
    #: a peer must be at least this much less loaded than the home to get an exec
    hysteresis: float = 0.3
    #: a peer well below the home may be filled up to this load even when the home is not
    #: much higher (above it, peers are filled up to the home's level at most)
    target_load: float = 1.0
    #: weight of ``load_now`` against the 1-minute average ``load1`` when the load falls
    #: (a rise counts at once); below 1 a host that has just finished work looks busy
    #: for about a minute (see the module docstring), so 1: the runnable count alone
    now_weight: float = 1.0
    #: a peer whose load was last heard longer ago than this is not a candidate (on 8
    #: hosts a quiet peer's figure is confirmed every ~2 s; see MembershipConfig)
    max_load_age: float = 10.0
    #: a placement counts against its peer until a load figure heard this long after it
    #: (by then the peer's sampler and gossip have seen the process)
    charge_grace: float = 2.0
    #: random peers compared per slot: 2 is Mitzenmacher's "two choices"; a number at
    #: least the peer count makes it "the least loaded" (herds on stale figures)
    choices: int = 2
    #: slots per peer in one table
    max_slots: int = 8
    #: slots in one table at most (bounds a plan's work and what one stale view can send;
    #: the agent re-plans as soon as a table runs out)
    max_table_slots: int = 64
    #: a table is valid this long; the agent re-plans at expiry, when it runs out, or when
    #: new load gossip arrives
    table_ttl: float = 2.0
    #: slot count per peer with ``force_remote`` (mode ``remote``: "never run out")
    force_slots: int = 1 << 20
    #: execs one spill order places (home included); the agent sends a new one every
    #: slots round (1 s), counting what was sent since
    spill_window: int = 64

    def __post_init__(self) -> None:
        for f in fields(self):
            value: Any = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"placement.{f.name} must be a number")
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"placement.{f.name} must be a finite number >= 0")
            if f.name in _INT_FIELDS and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"placement.{f.name} must be an integer >= 1")
        if self.now_weight > 1:
            raise ConfigError("placement.now_weight must be between 0 and 1")
        if self.max_load_age <= 0 or self.table_ttl <= 0:
            raise ConfigError("placement.max_load_age and table_ttl must be > 0")


@dataclass(frozen=True, slots=True)
class SlotTable:
    """What the agent pushes to a tracer: ``slots NODE COUNT ...``, valid until ``expires``.

    Peers appear in name order with a count >= 1; an empty table means "run everything
    locally".
    """

    slots: tuple[tuple[str, int], ...]
    expires: float

    @property
    def total(self) -> int:
        return sum(n for _, n in self.slots)

    def get(self, node: str) -> int:
        """Slots for ``node`` (0 when it has none)."""
        return next((n for name, n in self.slots if name == node), 0)

    def tracer_message(self) -> bytes:
        """The tracer protocol packet (fields separated by NUL, see ``docs/run.md``)."""
        parts = [b"slots"]
        for name, n in self.slots:
            parts += [name.encode(), str(n).encode()]
        return b"\0".join(parts)


@dataclass(frozen=True, slots=True)
class SpillOrder:
    """Where an auto job's next execs go during a burst, in order (``docs/run.md``, ``spill``).

    ``order`` holds one entry per exec, ``None`` for "stay home"; the tracer takes them one
    by one once ``at`` of the job's processes run at home, and runs everything locally once
    they are used up (until the next order).
    """

    at: int
    order: tuple[str | None, ...]
    expires: float

    def counts(self) -> dict[str | None, int]:
        out: dict[str | None, int] = {}
        for node in self.order:
            out[node] = out.get(node, 0) + 1
        return out

    def runs(self) -> list[tuple[str, int]]:
        """The order run-length encoded, the home as :data:`HOME_MARK` (the wire form)."""
        out: list[tuple[str, int]] = []
        for node in self.order:
            name = HOME_MARK if node is None else node
            if out and out[-1][0] == name:
                out[-1] = (name, out[-1][1] + 1)
            else:
                out.append((name, 1))
        return out


@dataclass(slots=True)
class _Host:
    node: str | None  # None: the home
    busy: float  # CPUs' worth of runnable work, projected
    cpus: float
    given: int = 0  # entries of the order so far
    share: int = 0  # entries it may get (water filling)

    def after(self, n: int, hysteresis: float) -> float:
        """Its load with ``n`` more execs; a peer pays the hysteresis (home wins ties)."""
        return (self.busy + n) / self.cpus + (0.0 if self.node is None else hysteresis)


@dataclass(frozen=True, slots=True)
class Choice:
    """One placement decision: ``node`` None means "run at home"; ``reason`` says why."""

    node: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class _Charge:
    at: float  # when the placement was made
    n: int
    base: float  # the peer's gossiped load (blend) it was decided from


@dataclass(slots=True)
class _Peer:
    name: str
    load: float  # projected: gossiped blend + charges not yet reflected
    cpus: float


class PlacementPolicy:
    """Turns gossiped membership into slot tables and single decisions (sans-IO).

    The agent calls :meth:`plan` when a table expires, runs out or new load gossip
    arrives, pushes the result to its tracers, and calls :meth:`charge` for every
    ``remote`` a tracer reports, so that the next plan counts what was sent since each
    peer's load was last heard. :meth:`choose` is the same decision for one exec.
    """

    def __init__(self, config: PlacementConfig, rng: random.Random) -> None:
        self.config = config
        self._rng = rng
        #: per peer, oldest first: placements its gossiped load may not show yet
        self._charges: dict[str, list[_Charge]] = {}
        #: per peer: the gossiped load (blend) last seen, the base of new charges
        self._figures: dict[str, float] = {}
        self._now = 0.0

    # -- bookkeeping ----------------------------------------------------------------------

    def charge(self, node: str, n: int = 1, at: float | None = None) -> None:
        """Record ``n`` execs sent to ``node`` at ``at`` (default: the last ``now`` seen).

        The charge is anchored to the figure the placement was decided from, so a newer
        figure that already shows the process does not count it twice (see
        :meth:`peer_load`).
        """
        if n <= 0:
            return
        at = self._now if at is None else at
        self._charges.setdefault(node, []).append(_Charge(at, n, self._figures.get(node, 0.0)))

    def _live_charges(self, member: Member) -> list[_Charge]:
        grace = self.config.charge_grace
        return [c for c in self._charges.get(member.name, ()) if member.load_at < c.at + grace]

    def charged(self, member: Member) -> int:
        """Placements sent to ``member`` that its gossiped load may not reflect yet: those
        made less than ``charge_grace`` before its load was last heard."""
        return sum(c.n for c in self._live_charges(member))

    def _prune(self, members: Sequence[Member], now: float) -> None:
        by_name = {m.name: m for m in members}
        horizon = now - self.config.max_load_age - self.config.charge_grace
        grace = self.config.charge_grace
        for name in list(self._charges):
            m = by_name.get(name)
            kept = [
                c
                for c in self._charges[name]
                if m is not None and m.load_at < c.at + grace and c.at >= horizon
            ]
            if kept:
                self._charges[name] = kept
            else:
                del self._charges[name]
        for name in [n for n in self._figures if n not in by_name]:
            del self._figures[name]

    # -- loads ----------------------------------------------------------------------------

    def _blend(self, load_now: float, load1: float) -> float:
        w = self.config.now_weight
        return max(load_now, w * load_now + (1.0 - w) * load1)

    def home_load(self, home: Member, local_runnable_hint: float | None = None) -> float:
        """The home's load; ``local_runnable_hint`` (runnable processes on the home now,
        fresher than its published figure) replaces ``load_now`` when given."""
        now_part = home.load.load_now
        if local_runnable_hint is not None and home.load.cpus > 0:
            now_part = local_runnable_hint / home.load.cpus
        return self._blend(now_part, home.load.load1)

    def peer_load(self, member: Member) -> float:
        """A peer's projected load: its gossiped blend, or more if the charges say so.

        Each live charge adds to the figure it was decided from (its anchor), not to the
        current one: a figure sampled after some placements already counts them, and
        adding them again would make a peer that is catching up look busier than it is.
        So the projection is the highest of the current figure and, for each live charge,
        its anchor plus the charges from it on divided by the peer's quota.
        """
        figure = self._blend(member.load.load_now, member.load.load1)
        cpus = member.load.cpus
        if cpus <= 0:
            return figure
        best = figure
        after = 0
        for c in reversed(self._live_charges(member)):
            after += c.n
            best = max(best, c.base + after / cpus)
        return best

    def _candidates(
        self, self_name: str, members: Sequence[Member], now: float, origin: CpuFeatures
    ) -> list[_Peer]:
        out = []
        for m in members:
            if m.name == self_name or m.state is not MemberState.ALIVE:
                continue
            if now - m.load_at > self.config.max_load_age or m.load.cpus <= 0:
                continue
            if not CpuFeatures(m.load.cpu_level, m.load.cpu_flags).can_host(origin):
                continue
            self._figures[m.name] = self._blend(m.load.load_now, m.load.load1)
            out.append(_Peer(m.name, self.peer_load(m), m.load.cpus))
        out.sort(key=lambda p: p.name)  # the rng alone decides, not the caller's order
        return out

    @staticmethod
    def _home(self_name: str, members: Sequence[Member]) -> Member:
        for m in members:
            if m.name == self_name:
                return m
        raise NoSuchNode(f"{self_name!r} is not in the member list")

    def _open(self, peers: list[_Peer], home: float) -> tuple[list[_Peer], float]:
        """The peers that may take an exec (at least ``hysteresis`` below the home), and
        the level they may be filled to."""
        hyst = self.config.hysteresis
        ceiling = max(home - hyst, self.config.target_load)
        return [p for p in peers if p.load + hyst <= home and p.load < ceiling], ceiling

    def _two_choices(self, open_peers: list[_Peer]) -> tuple[_Peer, _Peer | None]:
        """The lightest of ``choices`` distinct random peers (the first drawn on a tie),
        and the runner-up (None when there was only one to draw)."""
        k = min(self.config.choices, len(open_peers))
        drawn = [open_peers[i] for i in self._rng.sample(range(len(open_peers)), k)]
        drawn.sort(key=lambda p: p.load)  # stable: ties keep the order drawn
        return drawn[0], (drawn[1] if k > 1 else None)

    def _origin(self, home: Member, origin: CpuFeatures | None) -> CpuFeatures:
        return (
            origin if origin is not None else CpuFeatures(home.load.cpu_level, home.load.cpu_flags)
        )

    # -- decisions ------------------------------------------------------------------------

    def plan(
        self,
        self_name: str,
        members: Sequence[Member],
        now: float,
        local_runnable_hint: float | None = None,
        *,
        force_remote: bool = False,
        origin_features: CpuFeatures | None = None,
    ) -> SlotTable:
        """The slot table for the tracers of ``self_name`` (the home) at time ``now``.

        ``origin_features`` defaults to the home's own CPU features. ``force_remote``
        (mode ``remote``) gives every compatible, alive, fresh peer ``force_slots``.
        """
        self._now = now
        self._prune(members, now)
        home = self._home(self_name, members)
        cfg = self.config
        peers = self._candidates(self_name, members, now, self._origin(home, origin_features))
        expires = now + cfg.table_ttl
        if force_remote:
            return SlotTable(tuple((p.name, cfg.force_slots) for p in peers), expires)
        home_load = self.home_load(home, local_runnable_hint)
        if home_load < cfg.home_threshold:
            return SlotTable((), expires)
        open_peers, ceiling = self._open(peers, home_load)
        counts: dict[str, int] = {}
        total = 0
        while open_peers and total < cfg.max_table_slots:
            win, _ = self._two_choices(open_peers)
            counts[win.name] = counts.get(win.name, 0) + 1
            total += 1
            win.load += 1.0 / win.cpus
            if counts[win.name] >= cfg.max_slots or win.load >= ceiling:
                open_peers.remove(win)
        return SlotTable(tuple(sorted(counts.items())), expires)

    def spill(
        self,
        self_name: str,
        members: Sequence[Member],
        now: float,
        local_runnable_hint: float | None = None,
        *,
        origin_features: CpuFeatures | None = None,
        slots: Sequence[tuple[str, int]] = (),
    ) -> SpillOrder:
        """For a burst gossip cannot see yet: the order for the tracers' ``spill``.

        ``plan`` gives no slots while the home looks idle, but a script that starts 32
        CPU-bound jobs at once does so before any load figure moves. The tracer counts the
        job's own processes running here at each exec (state R, so a shell waiting for its
        child does not count, nor the exec-ing process's parent, which just forked it
        and is about to wait in a sequential script) and, once ``at`` of them run (the
        home's quota in CPUs, rounded up), places the next exec by the next entry of this
        order.

        Shares: ``spill_window`` execs water-filled over the home and every candidate
        peer, one at a time to the host whose load (runnable CPUs / quota, projected with
        the charges and with ``at`` running at home) would be lowest after it; a peer must
        beat the home by ``hysteresis``. So a 1-CPU peer gets twice a 0.5-CPU one's share,
        a busy one less, and the home keeps its part instead of sending everything away.
        Order: the same filling again, ties drawn at random, so any prefix of the order
        (a burst of any size) is as even as the whole, and homes planning from the same
        stale view start on different peers. Not two random choices here: the order
        counts this home's own entries exactly (nothing stale in them), and two choices
        leave a prefix of 15 over 4 hosts one or two execs uneven (5 on a host instead of
        4 makes the burst take 25 % longer); stale figures of *other* homes' work are
        what two choices guard against, in :meth:`plan`, and here the window, the charges
        and the next round (1 s) bound what one stale view can send.

        ``slots``: the slot table pushed with this order. The tracer spends it first, so
        its execs count as sent already (without that, a home that gave each of 3 peers
        a slot, its starting job's first process making it look busy, spread a 32-job
        burst 5/9/9/9 instead of 8/8/8/8).
        """
        self._now = now
        self._prune(members, now)
        home = self._home(self_name, members)
        cfg = self.config
        at = max(1, math.ceil(home.load.cpus - 1e-9))
        peers = self._candidates(self_name, members, now, self._origin(home, origin_features))
        home_cpus = home.load.cpus if home.load.cpus > 0 else 1.0
        home_busy = max(self.home_load(home, local_runnable_hint) * home_cpus, float(at))
        given = dict(slots)
        hosts = [_Host(None, home_busy, home_cpus)]
        hosts += [_Host(p.name, p.load * p.cpus + given.get(p.name, 0), p.cpus) for p in peers]
        hyst = cfg.hysteresis
        # (load after one more, tie-break, index): home first among equals, then by name
        heap = [(h.after(1, hyst), i, i) for i, h in enumerate(hosts)]
        heapq.heapify(heap)
        for _ in range(cfg.spill_window if peers else 0):
            _, tie, i = heapq.heappop(heap)
            hosts[i].share += 1
            heapq.heappush(heap, (hosts[i].after(hosts[i].share + 1, hyst), tie, i))
        order: list[str | None] = []
        rnd = self._rng.random
        turns = [(round(h.after(1, hyst), 9), rnd(), i) for i, h in enumerate(hosts) if h.share]
        heapq.heapify(turns)
        while turns:  # the same filling again, ties drawn at random
            _, _, i = heapq.heappop(turns)
            win = hosts[i]
            order.append(win.node)
            win.given += 1
            if win.given < win.share:
                heapq.heappush(turns, (round(win.after(win.given + 1, hyst), 9), rnd(), i))
        if all(node is None for node in order):
            order = []  # nothing would leave: no need to count running processes
        return SpillOrder(at, tuple(order), now + cfg.table_ttl)

    def choose(
        self,
        self_name: str,
        members: Sequence[Member],
        now: float,
        origin_features: CpuFeatures | None = None,
        local_runnable_hint: float | None = None,
        *,
        force_remote: bool = False,
    ) -> Choice:
        """Where one exec should run, by the rules of :meth:`plan`.

        With the same rng state, the node chosen is the one :meth:`plan` gives its first
        slot to, and ``None`` exactly when :meth:`plan` returns an empty table. Nothing is
        charged: call :meth:`charge` for what is actually placed.
        """
        self._now = now
        self._prune(members, now)
        home = self._home(self_name, members)
        peers = self._candidates(self_name, members, now, self._origin(home, origin_features))
        if not peers:
            return Choice(None, "no alive, fresh, CPU-compatible peer")
        home_load = self.home_load(home, local_runnable_hint)
        if force_remote:
            win, _ = self._two_choices(peers)
            return Choice(win.name, "forced remote")
        if home_load < self.config.home_threshold:
            return Choice(None, f"home load {home_load:.2f} below {self.config.home_threshold:.2f}")
        open_peers, _ = self._open(peers, home_load)
        if not open_peers:
            return Choice(
                None,
                f"no peer at least {self.config.hysteresis:.2f} below home load {home_load:.2f}",
            )
        win, other = self._two_choices(open_peers)
        if other is None:
            return Choice(win.name, f"only open peer ({win.load:.2f} < home {home_load:.2f})")
        return Choice(
            win.name,
            f"lightest drawn: {win.name} {win.load:.2f} over {other.name} {other.load:.2f} "
            f"(home {home_load:.2f})",
        )
