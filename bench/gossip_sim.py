"""Membership gossip at 10, 100 and 1,000 members on the fake network (1% loss).

Measures, per cluster size N, with the default ``MembershipConfig``:

(a) protocol periods ("rounds" = probe intervals) until every member knows of a newly
    joined node,
(b) rounds (and seconds) until every member marks a killed node dead,
(c) bytes sent per member per second in steady state, loads changing all the time:
    ``len(dunix.wire.encode(msg)) + 4`` (frame header) for every message, push-pull
    included.

The cluster starts in steady state: every member is handed the full member list as a
push-pull reply (what a join does), then runs a warm-up. Nothing sleeps; a 1,000-member
run takes well under a minute on two cores.

The reference column is HashiCorp memberlist's LAN profile (probe 1 s, timeout 0.5 s,
suspicion mult 4, max mult 6), which is what one would otherwise run. Its figures are
not measured here: for N = 10 the commonly observed 5-7 s dead detection on small
clusters (midpoint used for the ratio); for larger N the floor its formula allows,
min suspicion = 4 x max(1, log10(N)) x 1 s plus one probe period to notice the failure.

    python -m bench.gossip_sim [--quick] [--sizes 10,100,1000] [--trials K]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dunix.loadbalance import (
    PUSHPULL_JOIN_REPLY,
    LoadUpdate,
    MemberEvent,
    Membership,
    MembershipConfig,
    NodeLoad,
    PushPull,
    Update,
    derive_node_id,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "gossip_sim.json"
LOSS = 0.01

#: memberlist DefaultLANConfig
ML_PROBE_INTERVAL = 1.0
ML_SUSPICION_MULT = 4
ML_SMALL_CLUSTER_DETECT = (5.0, 7.0)


def _fakenet() -> Any:
    """tests/unit/fakenet.py, shared with the unit tests (tests/ is not a package)."""
    path = ROOT / "tests" / "unit" / "fakenet.py"
    spec = importlib.util.spec_from_file_location("dunix_bench_fakenet", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def memberlist_detect_seconds(n: int) -> float:
    if n <= 16:
        return sum(ML_SMALL_CLUSTER_DETECT) / 2
    return ML_SUSPICION_MULT * max(1.0, math.log10(n)) * ML_PROBE_INTERVAL + ML_PROBE_INTERVAL


@dataclass
class SizeResult:
    n: int
    join_rounds: list[float] = field(default_factory=list)
    dead_rounds: list[float] = field(default_factory=list)
    dead_seconds: list[float] = field(default_factory=list)
    suspect_seconds: list[float] = field(default_factory=list)
    bytes_per_member_s: float = 0.0
    bytes_by_type: dict[str, float] = field(default_factory=dict)
    msgs_per_member_s: float = 0.0
    false_deaths: int = 0
    load_age: list[float] = field(default_factory=list)
    wall_seconds: float = 0.0


class Sim:
    def __init__(self, n: int, seed: int, cfg: MembershipConfig) -> None:
        fakenet = _fakenet()
        self.cfg = cfg
        self.rng = random.Random(seed)
        self.net = fakenet.FakeNet(seed=seed, loss=LOSS, keep_events=False)
        self.net.on_event = self._on_event
        self.nodes: dict[str, Membership] = {}
        self.loads: dict[str, NodeLoad] = {}
        self.watch: dict[tuple[str, str], dict[str, float]] = {}
        self.deaths = 0
        self.victims: set[str] = set()
        self._next_id = 0
        names = [self._new_name() for _ in range(n)]
        updates = tuple(Update(nm, self.addr(nm), derive_node_id(nm), 0, 0) for nm in names)
        loads = tuple(LoadUpdate(nm, 0, self._load(nm)) for nm in names)
        state = PushPull(names[0], PUSHPULL_JOIN_REPLY, updates, loads)
        for nm in names:
            m = self._make(nm)
            m.join([], 0.0)
            m.receive(self.addr(names[0]), state, 0.0)  # what a join reply carries
            self.net.add(self.addr(nm), m)

    @staticmethod
    def addr(name: str) -> str:
        return f"{name}:7946"

    def _new_name(self) -> str:
        self._next_id += 1
        return f"node{self._next_id:04d}"

    def _load(self, name: str) -> NodeLoad:
        load = NodeLoad(
            load1=round(self.rng.uniform(0, 2), 3),
            load_now=round(self.rng.uniform(0, 2), 3),
            cpus=4.0,
            mem_free=self.rng.randrange(1 << 30, 1 << 34),
            procs=self.rng.randrange(0, 50),
            cpu_level=3,
            cpu_flags=0x3FF,
        )
        self.loads[name] = load
        return load

    def _make(self, name: str) -> Membership:
        m = Membership(
            name,
            self.addr(name),
            derive_node_id(name),
            self.cfg,
            random.Random(self.rng.random()),
            self.loads.get(name) or self._load(name),
        )
        self.nodes[name] = m
        return m

    def _on_event(self, now: float, address: str, action: Any) -> None:
        if not isinstance(action, MemberEvent):
            return
        if action.kind == "dead" and action.member.name not in self.victims:
            self.deaths += 1  # a live member declared dead
        seen = self.watch.get((action.kind, action.member.name))
        if seen is not None and address not in seen:
            seen[address] = now

    def drift_loads(self) -> None:
        """Every member's load wanders (about half of them by a publishable amount)."""
        for name, m in self.nodes.items():
            old = self.loads[name]
            new = NodeLoad(
                load1=round(max(0.0, old.load1 + self.rng.gauss(0, 0.1)), 3),
                load_now=round(max(0.0, old.load_now + self.rng.gauss(0, 0.3)), 3),
                cpus=old.cpus,
                mem_free=max(0, old.mem_free + self.rng.randrange(-(1 << 26), 1 << 26)),
                procs=max(0, old.procs + self.rng.choice((-1, 0, 0, 0, 1))),
                cpu_level=old.cpu_level,
                cpu_flags=old.cpu_flags,
            )
            self.loads[name] = new
            m.set_local_load(new)
            self.net.poke(self.addr(name))

    def run(self, seconds: float) -> None:
        end = self.net.now + seconds
        while self.net.now < end - 1e-9:
            self.net.run_until(min(end, math.floor(self.net.now) + 1.0))
            self.drift_loads()

    def run_until_everyone(
        self, kind: str, name: str, expect: set[str], timeout: float
    ) -> float | None:
        """Seconds until every address in ``expect`` emitted ``kind`` for ``name``."""
        seen = self.watch.setdefault((kind, name), {})
        t0 = self.net.now
        end = t0 + timeout
        while self.net.now < end:
            if expect <= seen.keys():
                return max(seen[a] for a in expect) - t0
            self.net.run_until(min(end, self.net.now + 0.05))
            if int(self.net.now * 20) % 20 == 0:
                self.drift_loads()
        return None


def run_size(n: int, trials: int, seed: int, window: float) -> SizeResult:
    cfg = MembershipConfig()
    res = SizeResult(n)
    started = time.monotonic()
    sim = Sim(n, seed, cfg)
    sim.run(8.0)  # warm-up: timers spread out, loads start moving

    net = sim.net
    net.measure = True
    net.bytes_sent.clear()
    net.bytes_by_type.clear()
    sent0 = net.messages_sent
    sim.run(window)
    total = sum(net.bytes_sent.values())
    res.bytes_per_member_s = total / n / window
    res.bytes_by_type = {k: v / n / window for k, v in sorted(net.bytes_by_type.items())}
    res.msgs_per_member_s = (net.messages_sent - sent0) / n / window
    net.measure = False
    # how old each observer's figure for every other member's load is (50 observers)
    for name in sim.rng.sample(sorted(sim.nodes), min(50, n)):
        res.load_age.extend(
            net.now - x.load_at for x in sim.nodes[name].members() if x.name != name
        )

    for _ in range(trials):
        # (a) a new member joins through a random one
        name = sim._new_name()
        seed_name = sim.rng.choice(list(sim.nodes))
        everyone = {sim.addr(x) for x in sim.nodes}
        sim.watch[("join", name)] = {}
        m = sim._make(name)
        net.add(sim.addr(name), m, m.join([sim.addr(seed_name)], net.now))
        took = sim.run_until_everyone("join", name, everyone, timeout=120.0)
        if took is not None:
            res.join_rounds.append(took / cfg.probe_interval)
        sim.run(2.0)

        # (b) a random member is killed
        victim = sim.rng.choice([x for x in sim.nodes if x != name])
        others = {sim.addr(x) for x in sim.nodes if x != victim}
        sim.watch[("suspect", victim)] = {}
        sim.watch[("dead", victim)] = {}
        sim.victims.add(victim)
        net.crash(sim.addr(victim))
        t0 = net.now
        took = sim.run_until_everyone("dead", victim, others, timeout=120.0)
        if took is not None:
            res.dead_seconds.append(took)
            res.dead_rounds.append(took / cfg.probe_interval)
        suspects = sim.watch[("suspect", victim)]
        if suspects:
            res.suspect_seconds.append(min(suspects.values()) - t0)
        del sim.nodes[victim]
        sim.run(2.0)
    res.false_deaths = sim.deaths
    res.wall_seconds = time.monotonic() - started
    return res


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarise(results: list[SizeResult]) -> dict[str, Any]:
    rows = []
    for r in results:
        ml = memberlist_detect_seconds(r.n)
        dead_p50 = _med(r.dead_seconds)
        rows.append(
            {
                "n": r.n,
                "join_rounds_p50": round(_med(r.join_rounds), 2),
                "join_rounds_max": round(max(r.join_rounds, default=float("nan")), 2),
                "dead_rounds_p50": round(_med(r.dead_rounds), 2),
                "dead_seconds_p50": round(dead_p50, 2),
                "dead_seconds_max": round(max(r.dead_seconds, default=float("nan")), 2),
                "first_suspect_seconds_p50": round(_med(r.suspect_seconds), 2),
                "load_age_seconds_p50": round(_med(r.load_age), 2),
                "load_age_seconds_p90": round(_pct(r.load_age, 0.9), 2),
                "bytes_per_member_s": round(r.bytes_per_member_s, 1),
                "bytes_by_type_per_member_s": {k: round(v, 1) for k, v in r.bytes_by_type.items()},
                "msgs_per_member_s": round(r.msgs_per_member_s, 2),
                "false_deaths": r.false_deaths,
                "trials": len(r.dead_seconds),
                "memberlist_dead_seconds_ref": round(ml, 2),
                "dead_time_ratio_vs_memberlist": round(dead_p50 / ml, 2),
                "wall_seconds": round(r.wall_seconds, 1),
            }
        )
    cfg = MembershipConfig()
    return {
        "benchmark": "gossip_sim",
        "loss": LOSS,
        "config": {
            "probe_interval": cfg.probe_interval,
            "probe_timeout": cfg.probe_timeout,
            "suspicion_mult": cfg.suspicion_mult,
            "suspicion_max_mult": cfg.suspicion_max_mult,
            "retransmit_mult": cfg.retransmit_mult,
            "gossip_interval": cfg.gossip_interval,
            "pushpull_interval": cfg.pushpull_interval,
        },
        "goals": {"join_rounds_max": 15, "bytes_per_member_s": "flat in N"},
        "memberlist_reference": (
            "HashiCorp memberlist LAN defaults (probe 1 s, timeout 0.5 s, suspicion mult 4):"
            " N<=16: observed 5-7 s dead detection (midpoint used); larger N: formula floor"
            " 4*max(1,log10 N)*1 s + 1 probe period. Not measured here."
        ),
        "rows": rows,
    }


def print_table(summary: dict[str, Any]) -> None:
    head = (
        f"{'N':>6} {'join rounds':>12} {'dead rounds':>12} {'dead s p50':>10} "
        f"{'dead s max':>10} {'B/member/s':>11} {'msg/member/s':>12} "
        f"{'memberlist s':>12} {'ratio':>6} {'false dead':>10} {'load age':>9} "
        f"{'wall s':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in summary["rows"]:
        join = f"{r['join_rounds_p50']:.2f} ({r['join_rounds_max']:.2f})"
        age = f"{r['load_age_seconds_p50']:.1f}/{r['load_age_seconds_p90']:.0f}"
        print(
            f"{r['n']:>6} {join:>12} {r['dead_rounds_p50']:>12.1f} "
            f"{r['dead_seconds_p50']:>10.2f} {r['dead_seconds_max']:>10.2f} "
            f"{r['bytes_per_member_s']:>11.0f} {r['msgs_per_member_s']:>12.1f} "
            f"{r['memberlist_dead_seconds_ref']:>12.1f} "
            f"{r['dead_time_ratio_vs_memberlist']:>6.2f} {r['false_deaths']:>10} "
            f"{age:>9} {r['wall_seconds']:>7.1f}"
        )
    print("join rounds: p50 (max); rounds are probe intervals of", end=" ")
    print(f"{summary['config']['probe_interval']} s; loss {summary['loss']:.0%};", end=" ")
    print("load age: p50/p90 seconds since an observer last heard a member's current load")
    for r in summary["rows"]:
        parts = ", ".join(f"{k} {v:.0f}" for k, v in r["bytes_by_type_per_member_s"].items())
        print(f"  N={r['n']}: bytes/member/s by message: {parts}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gossip_sim", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer trials")
    ap.add_argument("--sizes", default="10,100,1000")
    ap.add_argument("--trials", type=int, default=0, help="join/kill trials per size")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    results = []
    for n in sizes:
        trials = args.trials or (2 if args.quick else (3 if n >= 1000 else 10))
        window = 10.0 if args.quick else 20.0
        results.append(run_size(n, trials, args.seed, window))
    summary = summarise(results)
    print_table(summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
