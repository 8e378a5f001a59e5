"""The live balancer on a simulated cluster: 12 CPU-bound loops started on one of 4 hosts.

Time-stepped simulation (``dt`` = 10 ms), nothing sleeps, nothing runs. 4 hosts with
0.5-CPU quotas (processor sharing: ``r`` runnable loops on a host each get 0.5/r CPU); 12
loops of ``work`` CPU-seconds each start on h1 at t = 0. Every host samples its run queue
every second (its own figure is fresh to itself, as the agent's sampler is) and the figure
reaches the others ``delay`` seconds later (gossip). Every host runs a
:class:`~dunix.loadbalance.balancer.Balancer` each period, with the default config but
for the residency (``--residency``, 5 s as in the agent). A decided move keeps the loop
running on its source until the freeze, stops it for the downtime (neither host runs it),
then it runs on the target; the costs are the smallest row of bench/results/migrate.json
(a ~24 MiB process between two simulated hosts: total and downtime) or 0.2 s / 0.2 s when
that file is missing.

Reported per gossip delay: time until the load is even (every host within one loop of
every other), the wall time until the last loop ends, against the same loops without a
balancer (all on h1) and the lower bound (total CPU / total quota), and the moves made.

    python -m bench.balance_sim [--work S] [--delays 0.5,1,2]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dunix.loadbalance import Balancer, BalancerConfig, Candidate, Member, MemberState, NodeLoad

RESULTS = Path(__file__).parent / "results"
MIGRATE_RESULTS = RESULTS / "migrate.json"
DT = 0.01
HOSTS = ("h1", "h2", "h3", "h4")
CPUS = 0.5
LOOPS = 12
SAMPLE = 1.0


def move_costs() -> tuple[float, float, str]:
    """(move total, downtime, where from): the smallest measured migration, else 0.2 s."""
    try:
        rows = json.loads(MIGRATE_RESULTS.read_text())
        row = min(rows, key=lambda r: r["mib"])["dunix"]
        return (
            float(row["total_s"]),
            float(row["downtime_s"]),
            f"migrate.json {row['rss_mib']:.0f} MiB",
        )
    except (OSError, ValueError, KeyError, TypeError):
        return 0.2, 0.2, "constant"


@dataclass
class Loop:
    gpid: int
    host: str
    left: float  # CPU-seconds of work left
    arrived: float = 0.0
    moves: int = 0
    cpu_window: float = 0.0  # CPU used since the host's last balancer run
    frozen_until: float = -1.0
    moving_to: str = ""
    freeze_at: float = math.inf
    done_at: float = math.inf


@dataclass
class Host:
    name: str
    balancer: Balancer
    phase: float
    figures: list[tuple[float, float]] = field(default_factory=list)  # (visible at, load)
    last_run: float = 0.0


def simulate(
    work: float, delay: float, residency: float, balance: bool, seed: int = 1
) -> dict[str, float]:
    rng = random.Random(seed)
    total, downtime, _ = move_costs()
    cfg = BalancerConfig(min_residency=residency)
    hosts = {n: Host(n, Balancer(cfg), rng.uniform(0, SAMPLE)) for n in HOSTS}
    loops = [Loop(g, "h1", work) for g in range(1, LOOPS + 1)]
    t = 0.0
    even_at = math.inf
    moves = 0
    next_sample = {n: h.phase for n, h in hosts.items()}
    latest: dict[str, tuple[float, float]] = {n: (0.0, 0.0) for n in HOSTS}  # n → (load, at)

    def runnable(host: str) -> list[Loop]:
        return [lp for lp in loops if lp.host == host and lp.left > 0 and t >= lp.frozen_until]

    while any(lp.left > 0 for lp in loops):
        # moves: freeze, then land on the target
        for lp in loops:
            if lp.moving_to and t >= lp.freeze_at:
                lp.host, lp.frozen_until = lp.moving_to, t + downtime
                lp.arrived, lp.moves, lp.moving_to = t + downtime, lp.moves + 1, ""
                lp.freeze_at = math.inf
                for h in hosts.values():
                    if lp.gpid in h.balancer.in_flight:
                        h.balancer.finished(lp.gpid, True, t)
        # processor sharing
        for n in HOSTS:
            run = runnable(n)
            share = min(1.0, CPUS / len(run)) if run else 0.0
            for lp in run:
                used = min(lp.left, share * DT)
                lp.left -= used
                lp.cpu_window += used
                if lp.left <= 0:
                    lp.done_at = t + DT
        counts = [sum(1 for lp in loops if lp.host == n and lp.left > 0) for n in HOSTS]
        if even_at == math.inf and max(counts) - min(counts) <= 1:
            even_at = t
        # sampling and gossip
        for n, h in hosts.items():
            if t >= next_sample[n]:
                load = len(runnable(n)) / CPUS
                h.figures.append((t + delay, load))
                latest[n] = (load, t)
                next_sample[n] += SAMPLE
        if balance:
            for n, h in hosts.items():
                if t < h.last_run + cfg.period or t < h.phase:
                    continue
                window = t - h.last_run if h.last_run else cfg.period
                h.last_run = t
                members = []
                for m in HOSTS:
                    if m == n:
                        load, at = latest[n]
                    else:
                        heard = [(v, load) for v, load in hosts[m].figures if v <= t]
                        if not heard:
                            continue
                        at, load = heard[-1]
                    nl = NodeLoad(load1=load, load_now=load, cpus=CPUS)
                    members.append(Member(m, m, 1, 1, MemberState.ALIVE, nl, 0.0, at))
                mine = [lp for lp in loops if lp.host == n and lp.left > 0 and not lp.moving_to]
                cands = [
                    Candidate(lp.gpid, lp.cpu_window, window, 24 << 20, t - lp.arrived, lp.moves)
                    for lp in mine
                    if t >= lp.frozen_until
                ]
                for lp in mine:
                    lp.cpu_window = 0.0
                for d in h.balancer.decide(n, members, cands, t, latest[n][0]):
                    lp = next(lp for lp in loops if lp.gpid == d.gpid)
                    lp.moving_to, lp.freeze_at = d.node, t + total - downtime
                    moves += 1
        t += DT
    wall = max(lp.done_at for lp in loops)
    return {"even_s": round(even_at, 2), "wall_s": round(wall, 2), "moves": moves}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.balance_sim", description=__doc__)
    ap.add_argument("--work", type=float, default=10.0, help="CPU-seconds per loop")
    ap.add_argument("--delays", default="0.5,1,2", help="gossip delays to try (s)")
    ap.add_argument("--residency", type=float, default=5.0)
    args = ap.parse_args(argv)
    total, downtime, source = move_costs()
    bound = LOOPS * args.work / (len(HOSTS) * CPUS)
    alone = simulate(args.work, 1.0, args.residency, balance=False)  # where gossip does not matter
    print(f"{LOOPS} loops of {args.work:g} CPU-s on h1 of {len(HOSTS)} hosts at {CPUS} CPU; "
          f"move {total:.3f} s, downtime {downtime:.3f} s ({source})")  # fmt: skip
    print(f"{'gossip delay':>12} {'even after':>11} {'wall':>8} {'no balancer':>12} "
          f"{'bound':>7} {'moves':>6}")  # fmt: skip
    rows = []
    for delay in (float(x) for x in args.delays.split(",")):
        r = simulate(args.work, delay, args.residency, balance=True)
        rows.append({"delay_s": delay, **r, "no_balancer_wall_s": alone["wall_s"],
                     "bound_s": bound})  # fmt: skip
        print(f"{delay:>11.1f}s {r['even_s']:>10.2f}s {r['wall_s']:>7.1f}s "
              f"{alone['wall_s']:>11.1f}s {bound:>6.1f}s {r['moves']:>6.0f}")  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    out = {"loops": LOOPS, "hosts": len(HOSTS), "cpus": CPUS, "work_s": args.work,
           "move_s": total, "downtime_s": downtime, "costs_from": source, "rows": rows}  # fmt: skip
    (RESULTS / "balance_sim.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
