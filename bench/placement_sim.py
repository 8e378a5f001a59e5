"""Exec-time placement of a burst on a simulated cluster: the policy against the naive ones.

Discrete-event simulation, nothing sleeps. 8 nodes with 0.5-CPU quotas (processor
sharing: ``r`` runnable jobs on a node each get 0.5/r CPU); 200 short jobs of 2 s of CPU
each arrive at node n0 at uniformly random times within 5 s, and each is placed once, at
its exec, never moved afterwards. Every node samples its load every second (``load_now`` =
runnable / quota, ``load1`` the kernel-style 1-minute average ticked every 5 s) and the
figure reaches n0 one second later, so what n0 knows of its peers is 1 to 2 s old. Its own
load it knows now (the agent's sampler: ``local_runnable_hint``).

Strategies:

(a) ``PlacementPolicy``: the agent pushes a slot table and the tracer spends it (round
    robin over the peers with slots left); the agent re-plans when the table runs out or
    expires, when new gossip arrives and when the tracer reports a local exec while the
    table is empty, and charges every placement the tracer reports;
(a1) (a) as the agent runs it: one plan per second (its slots round) from the home's
    runnable count then, and no re-plan at a local exec: a burst that arrives within a
    second stays home;
(e0) (a1) plus the spill as first built (commit c64a784): once ``at`` jobs run at the
    home, execs go round robin to every peer below ``target_load``, ``max_slots`` each
    per round, the home getting none of the burst, nothing charged;
(e) (a1) plus the spill order (``PlacementPolicy.spill``, what the agent pushes now): the
    burst water-filled over the home and the peers by free quota, charged;
(b) "least loaded from stale gossip": each exec goes to whichever node looked least loaded
    (n0's own figure fresh): the herding baseline;
(c) a uniformly random node;
(d) everything local;
(a') the policy comparing all peers instead of two random ones (``choices`` = 8): an
    ablation. On 8 nodes it matches (a) exactly: every open peer is filled to its ceiling,
    so a table's counts do not depend on the order slots are handed out; the spread comes
    from the ceiling and the charges. The two choices matter once ``max_table_slots``
    binds (big clusters), which tests/unit/test_placement.py shows.

Scenarios: the burst at n0 alone, and the same 200 jobs arriving at n0..n3 at once (four
homes placing from the same stale view, each charging only its own placements); and
bench/spread_bench.py's shapes: 32 (16) jobs of 0.75 (0.375) s CPU started within 0.1 s on
4 nodes.

Reported per strategy (mean over trials): makespan (first arrival to last exit), jobs
placed per node max/mean, and load imbalance = time-integral of the busiest node's
runnable count over that of the mean node's. The lower bound on makespan is total CPU /
total quota = 200 x 2 / (8 x 0.5) = 100 s. About 20 s on two cores.

    python -m bench.placement_sim [--trials K] [--seed S]
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dunix.loadbalance import Member, MemberState, NodeLoad
from dunix.loadbalance.placement import PlacementConfig, PlacementPolicy

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "placement.json"

NODES = 8
QUOTA = 0.5
JOBS = 200
JOB_CPU = 2.0
BURST = 5.0
SAMPLE_PERIOD = 1.0
GOSSIP_DELAY = 1.0
LOAD1_TICK = 5.0
LOAD1_DECAY = math.exp(-LOAD1_TICK / 60.0)  # kernel/sched/loadavg.c EXP_1


@dataclass
class Node:
    name: str
    jobs: list[float] = field(default_factory=list)  # CPU seconds left per job
    load1: float = 0.0  # normalised, like NodeLoad.load1
    placed: int = 0

    def load(self) -> NodeLoad:
        return NodeLoad(load1=self.load1, load_now=len(self.jobs) / QUOTA, cpus=QUOTA)


class Placer:
    """A strategy at one home: told about gossip as it arrives, asked at each exec."""

    def __init__(self, nodes: list[Node], home: int, rng: random.Random) -> None:
        self.nodes = nodes
        self.home = home
        self.rng = rng
        # what the home knows of each peer: the last figure delivered and when
        self.known: dict[int, tuple[NodeLoad, float]] = {
            i: (NodeLoad(cpus=QUOTA), 0.0) for i in range(len(nodes)) if i != home
        }

    def heard(self, i: int, load: NodeLoad, now: float) -> None:
        if i != self.home:
            self.known[i] = (load, now)

    def place(self, now: float) -> int:
        raise NotImplementedError

    def sample(self, i: int) -> None:
        """Node ``i`` sampled its load just now (the home's own sample is known at once)."""


class PolicyPlacer(Placer):
    """(a): the slot table, re-planned at once whenever the home's fresh load could change
    it (an idealised agent: its own load known at every exec)."""

    config = PlacementConfig()
    #: plan once per slots round only, from the home's last sample (what the agent does)
    rounds = False
    #: also the spill order, sent with every round
    spill = False

    def __init__(self, nodes: list[Node], home: int, rng: random.Random) -> None:
        super().__init__(nodes, home, rng)
        self.policy = PlacementPolicy(self.config, rng)
        self.slots: dict[str, int] = {}
        self.expires = -math.inf
        self.dirty = True
        self.rr = 0
        self.index = {n.name: i for i, n in enumerate(nodes)}
        self.order: list[str | None] = []
        self.at = 1

    def heard(self, i: int, load: NodeLoad, now: float) -> None:
        super().heard(i, load, now)
        self.dirty = True

    def hint(self) -> float:
        """The home's runnable count when it plans: counted then (the agent's
        ``fresh_runnable``), in rounds as without."""
        return float(len(self.nodes[self.home].jobs))

    def members(self, now: float) -> list[Member]:
        me = self.nodes[self.home]
        load = replace(me.load(), load_now=self.hint() / QUOTA)
        out = [Member(me.name, "", 1, 1, MemberState.ALIVE, load, 0.0, now)]
        for i, (load, at) in self.known.items():
            out.append(Member(self.nodes[i].name, "", i + 1, 1, MemberState.ALIVE, load, 0.0, at))
        return out

    def place(self, now: float) -> int:
        slot = self.take_slot(now)
        return self.home if slot is None else slot

    def take_slot(self, now: float) -> int | None:
        me = self.nodes[self.home]
        if now >= self.expires or (self.dirty and not self.rounds):
            table = self.policy.plan(me.name, self.members(now), now, self.hint())
            self.slots = dict(table.slots)
            self.expires = now + SAMPLE_PERIOD if self.rounds else table.expires
            self.dirty = False
            if self.spill:
                self.make_order(now)
        names = sorted(n for n, c in self.slots.items() if c > 0)
        if not names:
            self.dirty = True  # a local exec raised the home's load: the agent re-plans
            return self.take_spill(now)
        name = names[self.rr % len(names)]
        self.rr += 1
        self.slots[name] -= 1
        self.policy.charge(name, at=now)
        if sum(self.slots.values()) == 0:
            self.dirty = True  # the agent re-plans once the tracer reports the last slot
        return self.index[name]

    def make_order(self, now: float) -> None:
        me = self.nodes[self.home]
        slots = tuple(self.slots.items())  # pushed with the order, spent first
        order = self.policy.spill(me.name, self.members(now), now, self.hint(), slots=slots)
        self.order, self.at = list(order.order), order.at

    def take_spill(self, now: float) -> int | None:
        """The tracer's spill: the order's next entry once ``at`` jobs run at the home."""
        if len(self.nodes[self.home].jobs) < self.at or not self.order:
            return None
        name = self.order.pop(0)
        if name is None:
            return None
        self.policy.charge(name, at=now)  # the tracer reports it: the agent charges it
        return self.index[name]


class RoundsPlacer(PolicyPlacer):
    """(a1): (a) as the agent runs it: one plan per second from the home's last sample."""

    rounds = True


class SpillPlacer(PolicyPlacer):
    """(e): (a1) plus the spill order sent every round (the agent as built)."""

    rounds = True
    spill = True


class EvenSpillPlacer(SpillPlacer):
    """(e0): the spill before quota weighting (commit c64a784): every peer below
    ``target_load`` offered ``max_slots`` per round, round robin, the home none of the
    burst once ``at`` of it run there, and nothing charged."""

    def make_order(self, now: float) -> None:
        idle = sorted(
            self.nodes[i].name
            for i, (load, _) in self.known.items()
            if load.load_now < self.config.target_load
        )
        self.order = [idle[k % len(idle)] for k in range(len(idle) * self.config.max_slots)]
        self.at = math.ceil(QUOTA)

    def take_spill(self, now: float) -> int | None:
        if len(self.nodes[self.home].jobs) < self.at or not self.order:
            return None
        return self.index[str(self.order.pop(0))]


class LeastLoadedChargedPlacer(PolicyPlacer):
    """Ablation: the same policy comparing every peer instead of two random ones."""

    config = PlacementConfig(choices=NODES)


class LeastLoadedPlacer(Placer):
    def place(self, now: float) -> int:
        best, best_load = self.home, len(self.nodes[self.home].jobs) / QUOTA
        for i, (load, _) in sorted(self.known.items()):
            if load.load_now < best_load:
                best, best_load = i, load.load_now
        return best


class RandomPlacer(Placer):
    def place(self, now: float) -> int:
        return self.rng.randrange(len(self.nodes))


class LocalPlacer(Placer):
    def place(self, now: float) -> int:
        return self.home


STRATEGIES: dict[str, Callable[[list[Node], int, random.Random], Placer]] = {
    "(a) two-choices policy": PolicyPlacer,
    "(a1) a in 1 s rounds": RoundsPlacer,
    "(e0) a1 + even spill": EvenSpillPlacer,
    "(e) a1 + spill order": SpillPlacer,
    "(b) least loaded, stale": LeastLoadedPlacer,
    "(c) random": RandomPlacer,
    "(d) all local": LocalPlacer,
    "(a') a, least of all": LeastLoadedChargedPlacer,
}
HERD = "(b) least loaded, stale"
LOCAL = "(d) all local"


@dataclass(frozen=True)
class Shape:
    nodes: int = NODES
    jobs: int = JOBS
    job_cpu: float = JOB_CPU
    burst: float = BURST  # the jobs arrive within this many seconds


#: scenario name -> the nodes the jobs arrive at (split evenly), and the shape
SCENARIOS: dict[str, tuple[tuple[int, ...], Shape]] = {
    "burst at n0": ((0,), Shape()),
    "bursts at n0-n3 at once": ((0, 1, 2, 3), Shape()),
    # bench/spread_bench.py's: 32 jobs of 0.75 s CPU started by one script, 4 hosts
    "32 jobs at once, 4 nodes": ((0,), Shape(nodes=4, jobs=32, job_cpu=0.75, burst=0.1)),
    "16 jobs at once, 4 nodes": ((0,), Shape(nodes=4, jobs=16, job_cpu=0.375, burst=0.1)),
}


@dataclass
class Result:
    makespan: float
    placed_ratio: float
    load_ratio: float


def simulate(
    strategy: str, seed: int, homes: tuple[int, ...] = (0,), shape: Shape = Shape()
) -> Result:
    rng = random.Random(seed)
    nodes = [Node(f"n{i}") for i in range(shape.nodes)]
    placers = {h: STRATEGIES[strategy](nodes, h, random.Random(seed * 31 + h)) for h in homes}
    events: list[tuple[float, int, str, Any]] = []
    seq = 0

    def push(t: float, kind: str, data: Any = None) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, data))

    for k in range(shape.jobs):
        push(rng.uniform(0.0, shape.burst), "arrive", homes[k % len(homes)])
    for i in range(shape.nodes):
        push(rng.uniform(0.0, SAMPLE_PERIOD), "sample", i)
    push(LOAD1_TICK, "tick")

    now = 0.0
    arrived = 0
    max_area = mean_area = 0.0
    last_exit = 0.0

    def advance(to: float) -> None:
        nonlocal now, max_area, mean_area
        dt = to - now
        counts = [len(n.jobs) for n in nodes]
        max_area += max(counts) * dt
        mean_area += sum(counts) / shape.nodes * dt
        for n in nodes:
            if n.jobs:
                share = min(1.0, QUOTA / len(n.jobs)) * dt
                n.jobs = [left - share for left in n.jobs]
        now = to

    while arrived < shape.jobs or any(n.jobs for n in nodes):
        t_done, who = math.inf, -1
        for i, n in enumerate(nodes):
            if n.jobs:
                t = now + min(n.jobs) / min(1.0, QUOTA / len(n.jobs))
                if t < t_done:
                    t_done, who = t, i
        if t_done <= events[0][0]:
            advance(t_done)
            nodes[who].jobs = [left for left in nodes[who].jobs if left > 1e-9]
            last_exit = now
            continue
        t, _, kind, data = heapq.heappop(events)
        advance(t)
        if kind == "arrive":
            arrived += 1
            target = nodes[placers[data].place(now)]
            target.jobs.append(shape.job_cpu)
            target.placed += 1
        elif kind == "sample":
            for placer in placers.values():
                placer.sample(data)
            push(now + GOSSIP_DELAY, "deliver", (data, nodes[data].load()))
            push(now + SAMPLE_PERIOD, "sample", data)
        elif kind == "deliver":
            i, load = data
            for placer in placers.values():
                placer.heard(i, load, now)
        elif kind == "tick":
            for n in nodes:
                n.load1 = n.load1 * LOAD1_DECAY + len(n.jobs) / QUOTA * (1 - LOAD1_DECAY)
            push(now + LOAD1_TICK, "tick")

    placed = [n.placed for n in nodes]
    return Result(last_exit, max(placed) / statistics.mean(placed), max_area / mean_area)


def run_scenario(
    homes: tuple[int, ...], trials: int, seed: int, shape: Shape = Shape()
) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    for name in STRATEGIES:
        runs = [simulate(name, seed + 1000 * k, homes, shape) for k in range(trials)]
        rows[name] = {
            "makespan_s": statistics.mean(r.makespan for r in runs),
            "makespan_max_s": max(r.makespan for r in runs),
            "placed_max_over_mean": statistics.mean(r.placed_ratio for r in runs),
            "load_max_over_mean": statistics.mean(r.load_ratio for r in runs),
        }
    for row in rows.values():
        row["makespan_vs_least_loaded"] = row["makespan_s"] / rows[HERD]["makespan_s"]
        row["makespan_vs_all_local"] = row["makespan_s"] / rows[LOCAL]["makespan_s"]
    return rows


def print_rows(rows: dict[str, dict[str, float]]) -> None:
    head = ("strategy", "makespan s", "worst s", "vs (b)", "vs (d)", "placed max/mean")
    print(f"{head[0]:<26}{head[1]:>11}{head[2]:>9}{head[3]:>8}{head[4]:>8}{head[5]:>17}", end="")
    print(f"{'load max/mean':>15}")
    for name, r in rows.items():
        print(
            f"{name:<26}{r['makespan_s']:>11.1f}{r['makespan_max_s']:>9.1f}"
            f"{r['makespan_vs_least_loaded']:>8.2f}{r['makespan_vs_all_local']:>8.2f}"
            f"{r['placed_max_over_mean']:>17.2f}{r['load_max_over_mean']:>15.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.placement_sim", description=__doc__)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    started = time.perf_counter()
    lower = JOBS * JOB_CPU / (NODES * QUOTA)
    print(
        f"{JOBS} jobs x {JOB_CPU:g} s CPU arriving within {BURST:g} s; {NODES} nodes x "
        f"{QUOTA:g} CPU; gossip every {SAMPLE_PERIOD:g} s, {GOSSIP_DELAY:g} s late; "
        f"{args.trials} trials; makespan lower bound {lower:.0f} s"
    )
    scenarios: dict[str, Any] = {}
    for title, (homes, shape) in SCENARIOS.items():
        rows = run_scenario(homes, args.trials, args.seed, shape)
        scenarios[title] = rows
        bound = shape.jobs * shape.job_cpu / (shape.nodes * QUOTA)
        print(f"\n-- {title} (makespan lower bound {bound:.1f} s)")
        print_rows(rows)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    setup = {
        "nodes": NODES,
        "quota_cpus": QUOTA,
        "jobs": JOBS,
        "job_cpu_s": JOB_CPU,
        "burst_s": BURST,
        "sample_period_s": SAMPLE_PERIOD,
        "gossip_delay_s": GOSSIP_DELAY,
        "trials": args.trials,
        "seed": args.seed,
        "makespan_lower_bound_s": lower,
    }
    doc = {"setup": setup, "config": vars_of(PlacementConfig()), "scenarios": scenarios}
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"({time.perf_counter() - started:.1f} s; {RESULTS.relative_to(ROOT)})")
    return 0


def vars_of(cfg: PlacementConfig) -> dict[str, float]:
    return {name: getattr(cfg, name) for name in cfg.__dataclass_fields__}


if __name__ == "__main__":
    sys.exit(main())
