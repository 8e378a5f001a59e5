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
(b) "least loaded from stale gossip": each exec goes to whichever node looked least loaded
    (n0's own figure fresh): the herding baseline;
(c) a uniformly random node;
(d) everything local.

Reported per strategy (mean over trials): makespan (first arrival to last exit), jobs
placed per node max/mean, and load imbalance = time-integral of the busiest node's
runnable count over that of the mean node's. The lower bound on makespan is total CPU /
total quota = 200 x 2 / (8 x 0.5) = 100 s.

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
from dataclasses import dataclass, field
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
HOME = 0


@dataclass
class Node:
    name: str
    jobs: list[float] = field(default_factory=list)  # CPU seconds left per job
    load1: float = 0.0  # normalised, like NodeLoad.load1
    placed: int = 0

    def load(self) -> NodeLoad:
        return NodeLoad(load1=self.load1, load_now=len(self.jobs) / QUOTA, cpus=QUOTA)


class Placer:
    """A strategy: told about gossip as it arrives, asked at each exec where it goes."""

    def __init__(self, nodes: list[Node], rng: random.Random) -> None:
        self.nodes = nodes
        self.rng = rng
        # what n0 knows of each peer: the last figure delivered and when
        self.known: dict[int, tuple[NodeLoad, float]] = {
            i: (NodeLoad(cpus=QUOTA), 0.0) for i in range(1, len(nodes))
        }

    def heard(self, i: int, load: NodeLoad, now: float) -> None:
        self.known[i] = (load, now)

    def place(self, now: float) -> int:
        raise NotImplementedError


class PolicyPlacer(Placer):
    def __init__(self, nodes: list[Node], rng: random.Random) -> None:
        super().__init__(nodes, rng)
        self.policy = PlacementPolicy(PlacementConfig(), rng)
        self.slots: dict[str, int] = {}
        self.expires = -math.inf
        self.dirty = True
        self.rr = 0
        self.index = {n.name: i for i, n in enumerate(nodes)}

    def heard(self, i: int, load: NodeLoad, now: float) -> None:
        super().heard(i, load, now)
        self.dirty = True

    def members(self, now: float) -> list[Member]:
        home = self.nodes[HOME]
        out = [Member(home.name, "", 1, 1, MemberState.ALIVE, home.load(), 0.0, now)]
        for i, (load, at) in self.known.items():
            out.append(Member(self.nodes[i].name, "", i + 1, 1, MemberState.ALIVE, load, 0.0, at))
        return out

    def place(self, now: float) -> int:
        if self.dirty or now >= self.expires:
            hint = float(len(self.nodes[HOME].jobs))
            table = self.policy.plan(self.nodes[HOME].name, self.members(now), now, hint)
            self.slots = dict(table.slots)
            self.expires = table.expires
            self.dirty = False
        names = sorted(n for n, c in self.slots.items() if c > 0)
        if not names:
            self.dirty = True  # a local exec raised the home's load: the agent re-plans
            return HOME
        name = names[self.rr % len(names)]
        self.rr += 1
        self.slots[name] -= 1
        self.policy.charge(name, at=now)
        if sum(self.slots.values()) == 0:
            self.dirty = True  # the agent re-plans once the tracer reports the last slot
        return self.index[name]


class LeastLoadedPlacer(Placer):
    def place(self, now: float) -> int:
        best, best_load = HOME, len(self.nodes[HOME].jobs) / QUOTA
        for i, (load, _) in sorted(self.known.items()):
            if load.load_now < best_load:
                best, best_load = i, load.load_now
        return best


class RandomPlacer(Placer):
    def place(self, now: float) -> int:
        return self.rng.randrange(len(self.nodes))


class LocalPlacer(Placer):
    def place(self, now: float) -> int:
        return HOME


STRATEGIES: dict[str, Callable[[list[Node], random.Random], Placer]] = {
    "two-choices policy": PolicyPlacer,
    "least loaded (stale)": LeastLoadedPlacer,
    "random": RandomPlacer,
    "all local": LocalPlacer,
}


@dataclass
class Result:
    makespan: float
    placed_ratio: float
    load_ratio: float


def simulate(strategy: str, seed: int) -> Result:
    rng = random.Random(seed)
    nodes = [Node(f"n{i}") for i in range(NODES)]
    placer = STRATEGIES[strategy](nodes, random.Random(seed + 1))
    events: list[tuple[float, int, str, Any]] = []
    seq = 0

    def push(t: float, kind: str, data: Any = None) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, data))

    for t in sorted(rng.uniform(0.0, BURST) for _ in range(JOBS)):
        push(t, "arrive")
    for i in range(1, NODES):
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
        mean_area += sum(counts) / NODES * dt
        for n in nodes:
            if n.jobs:
                share = min(1.0, QUOTA / len(n.jobs)) * dt
                n.jobs = [left - share for left in n.jobs]
        now = to

    while arrived < JOBS or any(n.jobs for n in nodes):
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
            target = nodes[placer.place(now)]
            target.jobs.append(JOB_CPU)
            target.placed += 1
        elif kind == "sample":
            push(now + GOSSIP_DELAY, "deliver", (data, nodes[data].load()))
            push(now + SAMPLE_PERIOD, "sample", data)
        elif kind == "deliver":
            i, load = data
            placer.heard(i, load, now)
        elif kind == "tick":
            for n in nodes:
                n.load1 = n.load1 * LOAD1_DECAY + len(n.jobs) / QUOTA * (1 - LOAD1_DECAY)
            push(now + LOAD1_TICK, "tick")

    placed = [n.placed for n in nodes]
    return Result(last_exit, max(placed) / statistics.mean(placed), max_area / mean_area)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.placement_sim", description=__doc__)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    started = time.perf_counter()
    rows: dict[str, dict[str, float]] = {}
    for name in STRATEGIES:
        runs = [simulate(name, args.seed + 1000 * k) for k in range(args.trials)]
        rows[name] = {
            "makespan_s": statistics.mean(r.makespan for r in runs),
            "makespan_max_s": max(r.makespan for r in runs),
            "placed_max_over_mean": statistics.mean(r.placed_ratio for r in runs),
            "load_max_over_mean": statistics.mean(r.load_ratio for r in runs),
        }
    herd = rows["least loaded (stale)"]["makespan_s"]
    local = rows["all local"]["makespan_s"]
    for row in rows.values():
        row["makespan_vs_least_loaded"] = row["makespan_s"] / herd
        row["makespan_vs_all_local"] = row["makespan_s"] / local
    lower = JOBS * JOB_CPU / (NODES * QUOTA)
    print(
        f"{JOBS} jobs x {JOB_CPU:g} s CPU arriving at n0 within {BURST:g} s; {NODES} nodes x "
        f"{QUOTA:g} CPU; gossip every {SAMPLE_PERIOD:g} s, {GOSSIP_DELAY:g} s late; "
        f"{args.trials} trials; lower bound {lower:.0f} s"
    )
    head = ("strategy", "makespan s", "worst s", "vs (b)", "vs (d)", "placed max/mean")
    print(f"{head[0]:<22}{head[1]:>11}{head[2]:>9}{head[3]:>8}{head[4]:>8}{head[5]:>17}", end="")
    print(f"{'load max/mean':>15}")
    for name, r in rows.items():
        print(
            f"{name:<22}{r['makespan_s']:>11.1f}{r['makespan_max_s']:>9.1f}"
            f"{r['makespan_vs_least_loaded']:>8.2f}{r['makespan_vs_all_local']:>8.2f}"
            f"{r['placed_max_over_mean']:>17.2f}{r['load_max_over_mean']:>15.2f}"
        )
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
    doc = {"setup": setup, "config": vars_of(PlacementConfig()), "strategies": rows}
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"({time.perf_counter() - started:.1f} s; {RESULTS.relative_to(ROOT)})")
    return 0


def vars_of(cfg: PlacementConfig) -> dict[str, float]:
    return {name: getattr(cfg, name) for name in cfg.__dataclass_fields__}


if __name__ == "__main__":
    sys.exit(main())
