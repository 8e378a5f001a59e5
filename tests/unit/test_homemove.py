"""Which pipes of a process moved from home are relayed, and which way (agent/homemove.py)."""

from __future__ import annotations

import os

from dunix.agent.homemove import pipe_plan
from dunix.fdmove.inventory import FdInfo


def end(fd: int, inode: int, flags: int) -> FdInfo:
    return FdInfo(fd, "pipe", f"pipe:[{inode}]", None, inode, 0, flags)


def test_a_write_end_is_relayed_out_and_a_read_end_in() -> None:
    fds = [end(0, 7, os.O_RDONLY), end(1, 8, os.O_WRONLY), end(2, 8, os.O_WRONLY)]
    assert pipe_plan(fds, set()) == [(7, False, 0), (8, True, 1)]


def test_a_child_holding_both_ends_writes_the_pipe() -> None:
    # r, w = os.pipe(); fork: the child has both until it closes one
    fds = [end(3, 9, os.O_RDONLY), end(4, 9, os.O_WRONLY)]
    assert pipe_plan(fds, {9}) == [(9, True, 4)]


def test_a_pipe_its_parent_reads_too_is_not_relayed() -> None:
    # an earlier worker's pipe: the child inherited the parent's read end
    fds = [end(3, 10, os.O_RDONLY), end(5, 11, os.O_RDONLY)]
    assert pipe_plan(fds, {10}) == [(11, False, 5)]


def test_a_read_write_end_goes_in_for_fd_0_only() -> None:
    fds = [end(0, 12, os.O_RDWR), end(6, 13, os.O_RDWR)]
    assert pipe_plan(fds, set()) == [(12, False, 0), (13, True, 6)]
