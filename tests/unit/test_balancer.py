"""The live balancer on hand-made loads and a fake clock (no agent, no processes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dunix.errors import ConfigError
from dunix.loadbalance import Member, MemberState, NodeLoad
from dunix.loadbalance.balancer import Balancer, BalancerConfig, Candidate, Decision
from dunix.migrate.cpufeatures import LEVELS, CpuFeatures

V3 = CpuFeatures.from_flags(set().union(*LEVELS[:3]))
V2 = CpuFeatures.from_flags(set().union(*LEVELS[:2]))
MiB = 1 << 20
FRESH = 1e6  # a load heard "later" than any test's clock: always fresh


def member(
    name: str, load: float, *, cpus: float = 0.5, heard: float = FRESH, cpu: CpuFeatures = V3,
    state: MemberState = MemberState.ALIVE, mem_free: int = 0,
) -> Member:  # fmt: skip
    nl = NodeLoad(load1=load, load_now=load, cpus=cpus, mem_free=mem_free,
                  cpu_level=cpu.level, cpu_flags=cpu.flags)  # fmt: skip
    return Member(name, f"{name}:7946", 1, 1, state, nl, 0.0, heard)


def loop(gpid: int, *, age: float = 60.0, rss: int = 8 * MiB, share: float = 1.0 / 12,
         moves: int = 0, cpu: CpuFeatures = V3) -> Candidate:  # fmt: skip
    """A CPU-bound loop: ``share`` of a CPU over a 1-second window."""
    return Candidate(gpid, share, 1.0, rss, age, moves, cpu)


@dataclass
class Sim:
    """Nodes of 0.5 CPU with CPU-bound loops; moves land at once; gossip is fresh."""

    cpus: dict[str, float]
    where: dict[int, str]
    features: dict[str, CpuFeatures] = field(default_factory=dict)
    arrived: dict[int, float] = field(default_factory=dict)
    moves: dict[int, int] = field(default_factory=dict)
    rss: dict[int, int] = field(default_factory=dict)

    def count(self, node: str) -> int:
        return sum(1 for n in self.where.values() if n == node)

    def load(self, node: str) -> float:
        return self.count(node) / self.cpus[node]

    def members(self, now: float) -> list[Member]:
        return [member(n, self.load(n), cpus=c, heard=now, cpu=self.features.get(n, V3))
                for n, c in self.cpus.items()]  # fmt: skip

    def candidates(self, node: str, now: float) -> list[Candidate]:
        n = max(1, self.count(node))
        share = min(1.0, self.cpus[node] / n)
        out = []
        for g, at in self.where.items():
            if at == node:
                age = now - self.arrived.get(g, -60.0)
                rss = self.rss.get(g, 8 * MiB)
                out.append(Candidate(g, share, 1.0, rss, age, self.moves.get(g, 0), V3))
        return out

    def apply(self, d: Decision, now: float) -> None:
        self.where[d.gpid] = d.node
        self.arrived[d.gpid] = now
        self.moves[d.gpid] = self.moves.get(d.gpid, 0) + 1


def test_config_is_checked() -> None:
    with pytest.raises(ConfigError):
        BalancerConfig(max_moves=0)
    with pytest.raises(ConfigError):
        BalancerConfig(threshold=-1.0)
    with pytest.raises(ConfigError):
        BalancerConfig(min_cpu_share=2.0)


def test_hot_node_spreads_six_loops_never_more_than_n_at_once() -> None:
    sim = Sim({"n1": 0.5, "n2": 0.5, "n3": 0.5, "n4": 0.5}, {g: "n1" for g in range(1, 7)})
    bal = Balancer(BalancerConfig(max_moves=2, cooldown=1.0))
    now = 100.0
    for _ in range(20):
        decisions = bal.decide("n1", sim.members(now), sim.candidates("n1", now), now)
        assert len(decisions) <= 2
        assert len(bal.in_flight) <= 2
        for d in decisions:
            assert d.node != "n1"
            sim.apply(d, now + 0.2)
            bal.finished(d.gpid, True, now + 0.2)
        now += 1.0
    counts = sorted(sim.count(n) for n in sim.cpus)
    assert counts == [1, 1, 2, 2]
    assert sim.count("n1") <= 2


def test_in_flight_moves_count_against_the_limit() -> None:
    bal = Balancer(BalancerConfig(max_moves=2, cooldown=0.0))
    members = [member("n1", 12.0), member("n2", 0.0), member("n3", 0.0), member("n4", 0.0)]
    procs = [loop(g) for g in range(1, 7)]
    first = bal.decide("n1", members, procs, 10.0)
    assert len(first) == 2
    assert bal.decide("n1", members, procs, 11.0) == []  # both still in flight
    bal.finished(first[0].gpid, True, 11.5)
    assert len(bal.decide("n1", members, procs, 12.0)) == 1


def test_decisions_shift_load_within_a_round() -> None:
    """Two moves in one round go to two different idle peers, not both to the first."""
    bal = Balancer(BalancerConfig(max_moves=3))
    members = [member("n1", 12.0), member("n2", 0.0), member("n3", 0.0), member("n4", 0.0)]
    out = bal.decide("n1", members, [loop(g) for g in range(1, 7)], 10.0)
    assert sorted(d.node for d in out) == ["n2", "n3", "n4"]


def test_equal_loads_move_nothing() -> None:
    bal = Balancer(BalancerConfig())
    members = [member(n, 4.0) for n in ("n1", "n2", "n3")]
    assert bal.decide("n1", members, [loop(1, share=0.25), loop(2, share=0.25)], 10.0) == []


def test_a_move_that_would_only_swap_the_imbalance_is_not_made() -> None:
    """6 vs 4 on 0.5 CPU: moving one loop would give 4 vs 6 and the peer would send it back."""
    bal = Balancer(BalancerConfig(threshold=0.5))
    members = [member("n1", 6.0), member("n2", 4.0)]
    assert bal.decide("n1", members, [loop(g, share=1 / 6) for g in range(3)], 10.0) == []


def test_a_process_that_just_arrived_does_not_move_before_its_residency() -> None:
    cfg = BalancerConfig(min_residency=5.0, cooldown=0.0)
    bal = Balancer(cfg)
    members = [member("n2", 12.0), member("n3", 0.0)]
    fresh = loop(7, age=1.0, moves=1)
    assert bal.decide("n2", members, [fresh], 10.0) == []
    # after one move it must stay 2 x min_residency
    assert bal.decide("n2", members, [loop(7, age=9.0, moves=1)], 18.0) == []
    assert [d.gpid for d in bal.decide("n2", members, [loop(7, age=10.5, moves=1)], 19.5)] == [7]


def test_a_peer_without_the_features_never_receives() -> None:
    bal = Balancer(BalancerConfig(max_moves=6, cooldown=0.0))
    members = [member("n1", 12.0), member("old", 0.0, cpu=V2), member("n3", 8.0)]
    out = bal.decide("n1", members, [loop(g) for g in range(6)], 10.0)
    assert all(d.node != "old" for d in out)
    assert [d.node for d in out] == ["n3"]  # 12 vs 8: one move leaves 10 vs 10
    # a process of a V2 origin may go there
    bal2 = Balancer(BalancerConfig())
    out2 = bal2.decide("n1", members, [loop(1, cpu=V2)], 10.0)
    assert [d.node for d in out2] == ["old"]


def test_memory_heavy_processes_are_moved_last() -> None:
    bal = Balancer(BalancerConfig(max_moves=2))
    members = [member("n1", 12.0), member("n2", 0.0), member("n3", 0.0)]
    procs = [loop(1, rss=900 * MiB), loop(2, rss=8 * MiB, age=10.0), loop(3, rss=300 * MiB),
             loop(4, rss=9 * MiB, age=600.0)]  # fmt: skip
    out = bal.decide("n1", members, procs, 10.0)
    assert [d.gpid for d in out] == [4, 2]  # small first; among alike sizes, the older
    too_big = Balancer(BalancerConfig(max_rss=512 * MiB))
    assert all(d.gpid != 1 for d in too_big.decide("n1", members, procs, 10.0))


def test_idle_processes_do_not_move() -> None:
    bal = Balancer(BalancerConfig())
    members = [member("n1", 12.0), member("n2", 0.0)]
    assert bal.decide("n1", members, [loop(1, share=0.0), loop(2, share=0.01)], 10.0) == []


def test_a_failed_move_backs_off_and_withdraws_its_shift() -> None:
    bal = Balancer(BalancerConfig(cooldown=0.0, failure_backoff=30.0, max_moves=1))
    members = [member("n1", 4.0), member("n2", 0.0)]
    out = bal.decide("n1", members, [loop(1, share=0.25)], 10.0)
    assert [d.gpid for d in out] == [1]
    bal.finished(1, False, 11.0)
    assert bal.resting(1, 12.0)
    assert bal.decide("n1", members, [loop(1, share=0.25)], 12.0) == []
    assert bal.projected("n2", 0.0) == 0.0  # the failed move no longer counts on n2
    assert [d.gpid for d in bal.decide("n1", members, [loop(1, share=0.25)], 41.5)] == [1]
    bal.finished(1, False, 42.0)
    assert bal.resting(1, 100.0)  # doubled: 60 s
    assert not bal.resting(1, 102.5)


def test_stale_dead_and_quota_less_peers_are_not_targets() -> None:
    bal = Balancer(BalancerConfig(max_load_age=10.0))
    members = [
        member("n1", 12.0, heard=100.0),
        member("stale", 0.0, heard=80.0),
        member("dead", 0.0, heard=100.0, state=MemberState.DEAD),
        member("noquota", 0.0, heard=100.0, cpus=0.0),
        member("full", 0.0, heard=100.0, mem_free=MiB),
    ]
    assert bal.decide("n1", members, [loop(1)], 100.0) == []


def test_cooldown_between_decisions() -> None:
    bal = Balancer(BalancerConfig(cooldown=2.0, max_moves=1))
    members = [member("n1", 12.0), member("n2", 0.0), member("n3", 0.0)]
    procs = [loop(g) for g in range(6)]
    first = bal.decide("n1", members, procs, 10.0)
    for d in first:
        bal.finished(d.gpid, True, 10.2)
    left = [p for p in procs if p.gpid not in {d.gpid for d in first}]
    assert bal.decide("n1", members, left, 11.0) == []
    assert len(bal.decide("n1", members, left, 12.5)) == 1


def test_a_fresh_figure_that_shows_the_move_does_not_count_it_twice() -> None:
    bal = Balancer(BalancerConfig(cooldown=0.0, max_moves=1))
    out = bal.decide("n1", [member("n1", 8.0), member("n2", 0.0)], [loop(1, share=0.125)], 10.0)
    assert [d.node for d in out] == ["n2"]
    bal.finished(1, True, 10.2)
    assert bal.projected("n2", 0.0) == pytest.approx(2.0)  # gossip has not seen it yet
    assert bal.projected("n2", 2.0) == pytest.approx(2.0)  # it has: counted once
    assert bal.projected("n1", 6.0) == pytest.approx(6.0)
    assert bal.projected("n2", 3.0) == pytest.approx(3.0)  # and more came


@settings(max_examples=60, deadline=None)
@given(
    start=st.lists(st.integers(0, 3), min_size=1, max_size=16),
    cpus=st.lists(st.sampled_from([0.5, 1.0, 2.0]), min_size=4, max_size=4),
    max_moves=st.integers(1, 3),
)
def test_every_node_balancing_never_ping_pongs(
    start: list[int], cpus: list[float], max_moves: int
) -> None:
    """Four nodes each running a balancer: no process moves again within its residency,
    no node has more than ``max_moves`` in flight, and in the end no allowed move remains
    (every pair differs by at most one loop's shift)."""
    names = ["n1", "n2", "n3", "n4"]
    sim = Sim(dict(zip(names, cpus, strict=True)), {g: names[n] for g, n in enumerate(start)})
    cfg = BalancerConfig(max_moves=max_moves, min_residency=3.0, cooldown=1.0)
    bals = {n: Balancer(cfg) for n in names}
    now = 100.0
    last_move: dict[int, float] = {}
    for _ in range(60):
        for n in names:
            decisions = bals[n].decide(n, sim.members(now), sim.candidates(n, now), now)
            assert len(decisions) <= max_moves
            for d in decisions:
                assert sim.where[d.gpid] == n
                if d.gpid in last_move:
                    assert now - last_move[d.gpid] >= cfg.min_residency
                last_move[d.gpid] = now
                sim.apply(d, now)
                bals[n].finished(d.gpid, True, now)
        now += 1.0
    # settled: nothing would move now (charges long expired)
    now += 60.0
    for n in names:
        assert bals[n].decide(n, sim.members(now), sim.candidates(n, now), now) == []
    moves = sum(sim.moves.values())
    assert moves <= 2 * len(start)


def test_agent_sampling_of_a_busy_process() -> None:
    """The agent's sampler sees a CPU loop's CPU time over its window, keyed by start time."""
    import subprocess
    import sys
    import time

    from dunix.agent.balance import Movable, sample

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        movable = [Movable(busy.pid, 42, 1, V3)]
        first, seen = sample(movable, {}, time.time())
        assert first == [] and len(seen) == 1  # nothing to measure over yet
        time.sleep(0.5)
        second, seen = sample(movable, seen, time.time())
        (c,) = second
        assert (c.gpid, c.moves, c.features) == (42, 1, V3)
        assert c.cpu_seconds > 0 and c.window > 0 and c.rss > 0 and c.age >= 0
    finally:
        busy.kill()
        busy.wait()
    gone, seen = sample(movable, seen, time.time())
    assert gone == [] and seen == {}


def test_agent_config_table(tmp_path: Path) -> None:
    from dunix.agent.balance import balancer_config
    from dunix.agent.config import load_config

    toml = tmp_path / "a.toml"
    toml.write_text('[agent]\nname = "x"\nbalancer = false\n[balancer]\nmin_residency = 2.5\n')
    cfg = load_config(toml, {})
    assert cfg.balancer is False
    assert balancer_config(cfg.balancer_settings).min_residency == 2.5
    assert load_config(None, {}).balancer is True
    with pytest.raises(ConfigError):
        balancer_config({"no_such_knob": 1})


def test_agent_picks_only_what_the_migration_service_can_move() -> None:
    """Guests alone in their guest job and processes running at home, never a job the
    user asked to keep local, a deputy, or a guest with company (a tree)."""
    from types import SimpleNamespace

    from dunix.agent.balance import BalanceService
    from dunix.agent.jobs import Proc

    def job(mode: str) -> SimpleNamespace:
        return SimpleNamespace(mode=mode)

    procs = {
        1: Proc(1, "j1", 0, "n2", 101, "guest", key="j1/7"),  # alone: movable
        8: Proc(8, "j6", 0, "n2", 108, "guest", key="j6/8"),  # moved from home: not home
        2: Proc(2, "j2", 0, "n2", 102, "guest", key="j2/8"),  # with 3: a tree
        3: Proc(3, "j2", 0, "n2", 103, "guest", key="j2/8"),
        4: Proc(4, "j3", 0, "n1", 104, "running", key="j3"),  # at home: movable
        5: Proc(5, "j3", 0, "n1", 105, "deputy", key="j3"),  # runs elsewhere
        6: Proc(6, "j4", 0, "n1", 106, "running", key="j4"),  # a local job
        7: Proc(7, "j5", 0, "n1", 107, "unmovable: shm", key="j5"),
    }
    jobs = {"j1/7": job("auto"), "j2/8": job("auto"), "j3": job("remote"), "j4": job("local"),
            "j5": job("auto"), "j6/8": job("auto")}  # fmt: skip
    members = [member("n1", 0.0, cpu=V3), member("n2", 0.0, cpu=V2)]
    agent = SimpleNamespace(
        jobs=SimpleNamespace(procs=procs, jobs=jobs),
        config=SimpleNamespace(name="n1"),
        membership=SimpleNamespace(members=lambda: members),
        features=V3,
        remote=SimpleNamespace(guests={
            ("j1", 7): SimpleNamespace(pid=1, home_pid=7),
            ("j6", 8): SimpleNamespace(pid=8, home_pid=8),
        }),
    )  # fmt: skip
    service = BalanceService(agent, BalancerConfig())  # type: ignore[arg-type]
    picked = {m.gpid: (m.features, m.not_to) for m in service.movable()}
    # a guest needs what its home had; one restored with its home pid cannot go home
    assert picked == {101: (V2, frozenset()), 104: (V3, frozenset()),
                      108: (V2, frozenset({"n2"}))}  # fmt: skip


def test_a_node_the_process_may_not_go_to_is_skipped() -> None:
    bal = Balancer(BalancerConfig())
    members = [member("n1", 12.0), member("n2", 0.0), member("n3", 2.0)]
    c = Candidate(5, 1 / 12, 1.0, MiB, 60.0, 1, V3, frozenset({"n2"}))
    assert [d.node for d in bal.decide("n1", members, [c], 10.0)] == ["n3"]
