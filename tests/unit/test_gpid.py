import pytest
from hypothesis import given
from hypothesis import strategies as st

from dunix.errors import ConfigError
from dunix.pid import (
    MAX_NODE_ID,
    PID_BITS,
    RANGE_SIZE,
    PidRange,
    PidRangeAllocator,
    make_gpid,
    parse_gpid,
    split_gpid,
)

node_ids = st.integers(1, MAX_NODE_ID)
pids = st.integers(1, (1 << PID_BITS) - 1)


@given(node_ids, pids)
def test_gpid_round_trip(node_id: int, pid: int) -> None:
    gpid = make_gpid(node_id, pid)
    assert split_gpid(gpid) == (node_id, pid)
    assert parse_gpid(str(gpid)) == gpid
    assert parse_gpid(f"{node_id}:{pid}") == gpid
    assert gpid < 1 << 32


def test_node_bits_are_high() -> None:
    assert make_gpid(3, 5) == (3 << 22) | 5


@pytest.mark.parametrize("bad", ["", "x", "0", "-1", "5", "0:12", "1024:1", "1:0"])
def test_bad_gpids_are_refused(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_gpid(bad)


@given(node_ids, node_ids)
def test_node_ranges_are_disjoint(a: int, b: int) -> None:
    ra, rb = PidRange.for_node(a), PidRange.for_node(b)
    assert len(ra) == RANGE_SIZE
    assert ra.first >= RANGE_SIZE  # below is the hosts' own init and agent
    if a != b:
        assert ra.end <= rb.first or rb.end <= ra.first
    assert ra.end <= 1 << PID_BITS


def test_allocator_skips_used_and_wraps_within_range() -> None:
    rng = PidRange.for_node(7)
    alloc = PidRangeAllocator(rng)
    first = alloc.next_pid(set())
    assert first == rng.first
    assert alloc.next_pid({rng.first + 1, rng.first + 2}) == rng.first + 3
    assert alloc.last_pid_for(rng.first + 10) == rng.first + 9
    used = set(range(rng.first, rng.end)) - {rng.first + 1}
    assert alloc.next_pid(used) == rng.first + 1  # wrapped to the range start, not to 300
    with pytest.raises(ConfigError):
        alloc.next_pid(set(range(rng.first, rng.end)))
    with pytest.raises(ConfigError):
        alloc.last_pid_for(5)
