"""The placement policy on hand-made member lists (no clock, seeded randomness)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dunix.errors import ConfigError, NoSuchNode
from dunix.loadbalance import Member, MemberState, NodeLoad
from dunix.loadbalance.placement import (
    HOME_MARK,
    Choice,
    PlacementConfig,
    PlacementPolicy,
    SlotTable,
    SpillOrder,
)
from dunix.migrate.cpufeatures import LEVELS, CpuFeatures

NOW = 100.0
CFG = PlacementConfig()
V3 = CpuFeatures.from_flags(set().union(*LEVELS[:3]))
V2 = CpuFeatures.from_flags(set().union(*LEVELS[:2]))


def member(
    name: str,
    load: float = 0.0,
    *,
    cpus: float = 1.0,
    state: MemberState = MemberState.ALIVE,
    age: float = 0.5,
    cpu: CpuFeatures = V3,
) -> Member:
    nl = NodeLoad(load1=load, load_now=load, cpus=cpus, cpu_level=cpu.level, cpu_flags=cpu.flags)
    return Member(name, f"{name}:7946", 1, 1, state, nl, 0.0, NOW - age)


def policy(seed: int = 0, **cfg: float) -> PlacementPolicy:
    return PlacementPolicy(PlacementConfig(**cfg), random.Random(seed))  # type: ignore[arg-type]


def cluster(home_load: float, peer_loads: list[float], cpus: float = 1.0) -> list[Member]:
    return [member("home", home_load, cpus=cpus)] + [
        member(f"p{i}", load, cpus=cpus) for i, load in enumerate(peer_loads)
    ]


def test_idle_home_keeps_everything() -> None:
    table = policy().plan("home", cluster(0.2, [0.0] * 7), NOW)
    assert table == SlotTable((), NOW + CFG.table_ttl)
    assert policy().choose("home", cluster(0.2, [0.0] * 7), NOW).node is None


def test_busy_home_spreads_over_idle_peers() -> None:
    table = policy().plan("home", cluster(4.0, [0.0] * 7, cpus=4.0), NOW)
    assert len(table.slots) >= 2
    assert all(n <= CFG.max_slots for _, n in table.slots)
    assert table.total >= 7
    assert table.tracer_message().startswith(b"slots\0p")


@given(st.integers(0, 2**32), st.lists(st.floats(0, 3), min_size=2, max_size=12))
def test_slots_only_go_to_peers_below_home_by_hysteresis(seed: int, loads: list[float]) -> None:
    members = cluster(2.0, loads, cpus=2.0)
    table = policy(seed).plan("home", members, NOW)
    for name, n in table.slots:
        assert n >= 1
        i = int(name[1:])
        assert loads[i] + CFG.hysteresis <= 2.0 + 1e-9
    assert table.total <= CFG.max_table_slots


def test_hysteresis_peer_only_slightly_lighter_gets_nothing() -> None:
    members = cluster(1.0, [0.8, 0.9, 0.75])
    assert policy().plan("home", members, NOW).slots == ()
    choice = policy().choose("home", members, NOW)
    assert choice.node is None and "below home" in choice.reason


def test_incompatible_cpu_never_gets_slots() -> None:
    members = [member("home", 3.0, cpu=V3), member("old", 0.0, cpu=V2), member("new", 0.0)]
    for seed in range(20):
        table = policy(seed).plan("home", members, NOW)
        assert table.get("old") == 0 and table.get("new") >= 1
    # a process started on a v2 host may go to either
    table = policy().plan("home", members, NOW, origin_features=V2)
    assert table.get("old") >= 1


@pytest.mark.parametrize(
    "bad",
    [
        member("x", 0.0, state=MemberState.SUSPECT),
        member("x", 0.0, state=MemberState.DEAD),
        member("x", 0.0, state=MemberState.LEFT),
        member("x", 0.0, age=CFG.max_load_age + 0.1),
        member("x", 0.0, cpus=0.0),
    ],
)
def test_dead_suspect_and_stale_peers_never_get_slots(bad: Member) -> None:
    members = [member("home", 3.0), bad, member("ok", 0.0)]
    for seed in range(10):
        table = policy(seed).plan("home", members, NOW)
        assert table.get("x") == 0 and table.get("ok") >= 1
        assert policy(seed).plan("home", members, NOW, force_remote=True).get("x") == 0
        assert policy(seed).choose("home", members, NOW).node == "ok"


def test_charges_reduce_later_slots_until_gossip_shows_them() -> None:
    members = cluster(6.0, [0.0, 0.0], cpus=2.0)
    pol = policy(max_slots=100)
    first = pol.plan("home", members, NOW)
    for name, n in first.slots:
        pol.charge(name, n)
    again = pol.plan("home", members, NOW + 0.5)
    assert again.total < first.total  # no herd: what was sent counts
    assert pol.charged(members[1]) == first.get("p0")
    # a figure heard long enough after the placements replaces the charges
    fresh = [members[0]] + [replace(m, load_at=NOW + CFG.charge_grace + 0.1) for m in members[1:]]
    assert pol.charged(fresh[1]) == 0
    assert pol.plan("home", fresh, NOW + 3.0).total == first.total


def test_charges_spread_a_burst() -> None:
    """Re-planning after every table from the same stale gossip: no single peer swamped."""
    members = cluster(20.0, [0.0] * 7, cpus=1.0)
    pol = policy(7, max_slots=4)
    sent: dict[str, int] = {}
    for k in range(5):
        table = pol.plan("home", members, NOW + 0.1 * k)
        for name, n in table.slots:
            pol.charge(name, n)
            sent[name] = sent.get(name, 0) + n
    assert len(sent) == 7
    assert max(sent.values()) - min(sent.values()) <= 2
    assert max(sent.values()) <= 20  # never past the home's level


def test_force_remote_gives_every_compatible_peer_many_slots() -> None:
    members = [member("home", 0.0), member("a", 5.0), member("b", 0.0), member("c", 0, cpu=V2)]
    table = policy().plan("home", members, NOW, force_remote=True)
    assert table.slots == (("a", CFG.force_slots), ("b", CFG.force_slots))
    assert policy().choose("home", members, NOW, force_remote=True).node in {"a", "b"}


def test_local_runnable_hint_overrides_stale_home_figure() -> None:
    members = cluster(0.0, [0.0] * 3, cpus=2.0)
    assert policy().plan("home", members, NOW).slots == ()
    assert policy().plan("home", members, NOW, local_runnable_hint=6.0).total > 0


@given(st.integers(0, 2**32), st.floats(0, 6), st.lists(st.floats(0, 4), max_size=10))
def test_choose_agrees_with_plan(seed: int, home: float, loads: list[float]) -> None:
    members = cluster(home, loads)
    table = policy(seed).plan("home", members, NOW)
    choice = policy(seed).choose("home", members, NOW)
    assert isinstance(choice, Choice) and choice.reason
    if choice.node is None:
        assert table.slots == ()
    else:
        assert table.get(choice.node) >= 1
    # same rng state: the first slot plan hands out is the one choose picks
    one = policy(seed, max_table_slots=1).plan("home", members, NOW)
    assert one.slots == (() if choice.node is None else ((choice.node, 1),))


@given(st.integers(0, 2**32), st.lists(st.floats(0, 4), min_size=1, max_size=10))
def test_deterministic_with_a_seeded_rng(seed: int, loads: list[float]) -> None:
    members = cluster(5.0, loads)
    assert policy(seed).plan("home", members, NOW) == policy(seed).plan("home", members, NOW)
    assert policy(seed).plan("home", members, NOW) == policy(seed).plan(
        "home", list(reversed(members)), NOW
    )


def test_unknown_home_is_an_error() -> None:
    with pytest.raises(NoSuchNode):
        policy().plan("nobody", cluster(1.0, [0.0]), NOW)


@pytest.mark.parametrize(
    "bad",
    [
        {"hysteresis": -0.1},
        {"now_weight": 1.5},
        {"max_slots": 0},
        {"choices": 0},
        {"max_slots": 2.5},
        {"table_ttl": 0.0},
        {"max_load_age": float("inf")},
        {"home_threshold": float("nan")},
        {"force_slots": True},
    ],
)
def test_bad_config_is_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        PlacementConfig(**bad)  # type: ignore[arg-type]


def test_a_figure_that_already_shows_the_charges_does_not_count_them_twice() -> None:
    members = cluster(10.0, [0.0], cpus=1.0)
    pol = policy()
    pol.plan("home", members, NOW)
    pol.charge("p0", 3)
    assert pol.peer_load(members[1]) == pytest.approx(3.0)
    # heard within the grace: the peer now reports the three processes itself
    shown = replace(members[1], load=replace(members[1].load, load_now=3.0, load1=3.0))
    assert pol.charged(shown) == 3
    assert pol.peer_load(shown) == pytest.approx(3.0)
    # ... or more, from other work: the figure wins
    busier = replace(members[1], load=replace(members[1].load, load_now=5.0, load1=5.0))
    assert pol.peer_load(busier) == pytest.approx(5.0)


def test_two_choices_spread_homes_with_the_same_stale_view() -> None:
    """Many peers, a table too small for all: "the least loaded" sends every home to the
    same few peers; two random choices send different homes to different ones."""
    rng = random.Random(5)
    peers = [rng.uniform(0.0, 0.5) for _ in range(64)]
    members = cluster(6.0, peers, cpus=4.0)

    def overlap(choices: int) -> float:
        shared = 0
        for seed in range(20):
            a = policy(seed, choices=choices, max_table_slots=16).plan("home", members, NOW)
            b = policy(seed + 100, choices=choices, max_table_slots=16).plan("home", members, NOW)
            shared += sum(min(n, b.get(name)) for name, n in a.slots)
        return shared / (20 * 16)

    assert overlap(64) == 1.0  # herding: identical tables
    assert overlap(2) < 0.5


def test_spill_starts_at_the_homes_quota_and_skips_lesser_cpus() -> None:
    members = [member("home", 0.0, cpus=0.5), member("idle", 0.0, cpus=0.5),
               member("old", 0.0, cpus=0.5, cpu=V2)]  # fmt: skip
    order = policy().spill("home", members, NOW)
    assert order.at == 1  # one running process fills a 0.5-CPU home
    assert set(order.counts()) == {None, "idle"}  # never a lesser CPU
    four = policy().spill("home", [member("home", cpus=4.0), member("p", cpus=4.0)], NOW)
    assert four.at == 4


def test_spill_of_a_burst_is_even_over_equal_hosts() -> None:
    members = [member(n, 0.0, cpus=0.5) for n in ("home", "p1", "p2", "p3")]
    order = policy(spill_window=31).spill("home", members, NOW)
    # the first process stays home (at = 1), then 31 more: 8 on every host
    assert order.counts() == {None: 7, "p1": 8, "p2": 8, "p3": 8}
    assert set(order.order[:3]) == {"p1", "p2", "p3"}  # the idle peers before the home


@given(st.integers(0, 1000), st.lists(st.floats(0.0, 3.0), min_size=1, max_size=6),
       st.lists(st.sampled_from([0.5, 1.0, 2.0]), min_size=7, max_size=7))  # fmt: skip
def test_spill_shares_follow_free_capacity(
    seed: int, loads: list[float], cpus: list[float]
) -> None:
    """Water filling: after the order, no host could take one more exec and end up lighter
    than the busiest host it was given to (hysteresis for peers aside)."""
    members = [member("home", 0.0, cpus=cpus[0])] + [
        member(f"p{i}", load, cpus=cpus[i + 1]) for i, load in enumerate(loads)
    ]
    order = policy(seed).spill("home", members, NOW)
    counts = order.counts()
    assert len(order.order) in (0, CFG.spill_window)
    busy = {None: float(order.at)} | {f"p{i}": load * cpus[i + 1] for i, load in enumerate(loads)}
    quota = {None: cpus[0]} | {f"p{i}": cpus[i + 1] for i in range(len(loads))}

    def after(node: str | None, n: int) -> float:
        return (busy[node] + n) / quota[node] + (0.0 if node is None else CFG.hysteresis)

    if order.order:
        worst = max(after(n, counts[n]) for n in counts)
        assert all(after(n, counts.get(n, 0) + 1) >= worst - 1e-9 for n in busy)


def test_spill_prefers_the_bigger_quota_in_proportion() -> None:
    members = [member("home", 0.0, cpus=0.5), member("small", 0.0, cpus=0.5),
               member("big", 0.0, cpus=1.5)]  # fmt: skip
    counts = policy(spill_window=40).spill("home", members, NOW).counts()
    assert counts["big"] == 3 * counts["small"] or abs(counts["big"] - 3 * counts["small"]) <= 3
    assert abs(counts[None] + 1 - counts["small"]) <= 1  # the home counts its first process


def test_spill_keeps_a_burst_home_when_peers_are_busier() -> None:
    members = [member("home", 0.0, cpus=0.5), member("busy", 6.0, cpus=0.5)]
    # 3 CPUs busy there: the home (1 running) takes 3 more before the peer is lighter
    order = policy(spill_window=3).spill("home", members, NOW)
    assert order.order == ()
    assert order.runs() == []
    assert policy(spill_window=4).spill("home", members, NOW).counts() == {None: 3, "busy": 1}


def test_spill_counts_the_placements_charged_since_gossip() -> None:
    members = [member(n, 0.0, cpus=0.5) for n in ("home", "p1", "p2")]
    pol = policy(spill_window=6)
    pol.charge("p1", 4, at=NOW)
    counts = pol.spill("home", members, NOW).counts()
    assert counts.get("p1", 0) == 0  # 4 sent there already: the others catch up first
    assert counts == {None: 3, "p2": 3}  # 4 per host, the home counting its first


def test_spill_orders_differ_between_homes_but_not_their_counts() -> None:
    members = [member(n, 0.0, cpus=0.5) for n in ["home"] + [f"p{i}" for i in range(8)]]
    orders = [policy(seed).spill("home", members, NOW) for seed in range(10)]
    assert len({o.order[:4] for o in orders}) > 5  # two choices: different first peers
    assert len({tuple(sorted(o.counts().items(), key=str)) for o in orders}) == 1


def test_spill_runs_are_the_wire_form() -> None:
    order = SpillOrder(1, ("a", "a", None, "b", None, None), NOW)
    assert order.runs() == [("a", 2), (HOME_MARK, 1), ("b", 1), (HOME_MARK, 2)]


def test_a_host_that_just_finished_work_gets_a_full_share_of_a_burst() -> None:
    """Its runnable count is 0 at once while its 1-minute average still remembers the
    jobs it ran (16 runnable for 25 s on 2 CPUs: 8 x (1 - e^(-25/60)) ~ 2.7 per CPU)."""
    members = [member(n, 0.0, cpus=2.0) for n in ("home", "p1", "p2", "p3")]
    members[1] = replace(members[1], load=replace(members[1].load, load1=2.7))
    counts = policy(spill_window=31).spill("home", members, NOW).counts()
    assert counts["p1"] == counts["p2"] == counts["p3"] == 8
    # weighing the 1-minute average in as before (0.3 of it), p1 lost a job to the others
    old = policy(spill_window=31, now_weight=0.7).spill("home", members, NOW).counts()
    assert old["p1"] == 7


def test_the_homes_fresh_count_keeps_its_first_exec_home() -> None:
    """A home whose last sample caught a job that has ended since looks busy by it; the
    agent passes the count now (``local_runnable_hint``), and an idle home keeps it."""
    members = [member("home", 2.0, cpus=0.5)] + [member(f"p{i}", 0.0, cpus=0.5) for i in range(3)]
    assert policy().plan("home", members, NOW).total > 0
    assert policy().plan("home", members, NOW, local_runnable_hint=0.0).total == 0


def test_spill_counts_the_slots_the_tracer_spends_first() -> None:
    """A home that looks busy when a job starts (its first process running) gives each
    peer a slot; the tracer spends them before the order, so the order counts them."""
    members = [member(n, 0.0, cpus=0.5) for n in ("home", "p0", "p1", "p2")]
    pol = policy(spill_window=31)
    table = pol.plan("home", members, NOW, local_runnable_hint=1.0)
    assert table.slots == (("p0", 1), ("p1", 1), ("p2", 1))
    order = pol.spill("home", members, NOW, 1.0, slots=table.slots)
    counts = order.counts()
    per_host = [counts.get(None, 0) + order.at] + [
        counts.get(f"p{i}", 0) + table.get(f"p{i}") for i in range(3)
    ]
    assert max(per_host) - min(per_host) <= 1  # 8/8/8/8 give or take the window's end
    assert per_host[0] >= 8  # the home keeps its share
