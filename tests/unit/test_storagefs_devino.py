import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dunix.errors import ConfigError
from dunix.pid.devino import (
    LOCAL_MASK,
    MAX_ALLOCATED,
    MAX_DIRECT_INO,
    ROOT_INO,
    DevIno,
    allocated_local,
    dev_node,
    direct_local,
    is_allocated,
    make_dev,
    make_ino,
    split_ino,
)
from dunix.pid.gpid import MAX_NODE_ID

node_ids = st.integers(0, MAX_NODE_ID)
locals_ = st.integers(1, LOCAL_MASK)


@given(node_ids, locals_)
def test_ino_round_trip(node_id: int, local: int) -> None:
    ino = make_ino(node_id, local)
    assert split_ino(ino) == DevIno(node_id, local)
    assert DevIno(node_id, local).ino == ino
    assert 0 < ino < 1 << 63  # positive as a signed 64-bit number


@given(node_ids)
def test_dev_round_trip(node_id: int) -> None:
    dev = make_dev(node_id)
    assert dev_node(dev) == node_id
    assert DevIno(node_id, 1).dev == dev


@given(node_ids, node_ids, locals_, locals_)
def test_ino_unique_across_owners(n1: int, n2: int, l1: int, l2: int) -> None:
    assert (make_ino(n1, l1) == make_ino(n2, l2)) == ((n1, l1) == (n2, l2))


@given(st.integers(1, MAX_DIRECT_INO), st.integers(1, MAX_ALLOCATED))
def test_direct_and_allocated_never_collide(backing: int, counter: int) -> None:
    direct = direct_local(backing)
    assert direct == backing and not is_allocated(backing)
    allocated = allocated_local(counter)
    assert is_allocated(allocated) and allocated != direct
    assert allocated <= LOCAL_MASK


def test_big_backing_inode_needs_counter() -> None:
    assert direct_local(MAX_DIRECT_INO + 1) is None
    assert direct_local(2**64 - 1) is None
    assert direct_local(0) is None


def test_root_is_fuse_root() -> None:
    assert make_ino(0, 1) == ROOT_INO


@pytest.mark.parametrize("bad", [0, -1, 1 << 63, make_ino(3, 1) & ~LOCAL_MASK])
def test_bad_ino_rejected(bad: int) -> None:
    with pytest.raises(ConfigError):
        split_ino(bad)


def test_bad_values_rejected() -> None:
    with pytest.raises(ConfigError):
        make_ino(MAX_NODE_ID + 1, 1)
    with pytest.raises(ConfigError):
        make_ino(1, 0)
    with pytest.raises(ConfigError):
        make_dev(-1)
    with pytest.raises(ConfigError):
        dev_node(os.makedev(8, 1))
    with pytest.raises(ConfigError):
        allocated_local(0)
