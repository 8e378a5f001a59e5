"""Structured cluster-wide process ids and the per-node PID ranges behind them.

Layout (64-bit safe, 32 bits used)::

    gpid = node_id << PID_BITS | pid            node_id: 10 bits, pid: 22 bits

``PID_BITS`` is 22 because the kernel's ``pid_max`` cannot exceed 2**22 (``PID_MAX_LIMIT``
in include/linux/threads.h), so every kernel pid fits. Node ids are 1..1023; 0 is never a
node (it marks "no node" and owns the low PIDs that each host's init and agent use).

PID ranges. A process that migrates keeps its kernel pid (CRIU restores it with the same
pid and fails with EEXIST if the pid is taken, see DESIGN.md), so two nodes must never hand
out the same pid to job processes. Each node's job processes are therefore allocated from
the node's own slice of the pid space, inside that host's dunix PID namespace::

    range(node_id) = [node_id * RANGE_SIZE, (node_id + 1) * RANGE_SIZE)   RANGE_SIZE = 4096

so the pid alone names the node it was born on, and a process restored anywhere finds its
pid free there unless that host strayed out of its own range. The kernel wraps allocation to
300 after ``pid_max``, not to a lower bound, so ``pid_max`` alone cannot confine a host;
what the agent does (``dunix.pid.steer``): point the namespace's ``ns_last_pid`` cursor at
the range's start, and put it back whenever the tracer reports a fork that left the range
(one stray pid per lap, no cost per fork). A stray pid can still collide, so a migration
target refuses a busy pid and the process stays where it was.
:class:`PidRangeAllocator` is the exact variant (a pid chosen before each fork, skipping
pids alive anywhere) for when forks get steered one by one.

Nothing here does IO: the allocator is told which pids are in use and returns the next one.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from dunix.errors import ConfigError

NODE_BITS = 10
PID_BITS = 22
MAX_NODE_ID = (1 << NODE_BITS) - 1
PID_MASK = (1 << PID_BITS) - 1
RANGE_SIZE = (1 << PID_BITS) >> NODE_BITS  # 4096 pids per node


def make_gpid(node_id: int, pid: int) -> int:
    """Combine an origin node id and a kernel pid into a gpid."""
    if not 1 <= node_id <= MAX_NODE_ID:
        raise ConfigError(f"node id {node_id} outside 1..{MAX_NODE_ID}")
    if not 1 <= pid <= PID_MASK:
        raise ConfigError(f"pid {pid} outside 1..{PID_MASK}")
    return node_id << PID_BITS | pid


def split_gpid(gpid: int) -> tuple[int, int]:
    """The (origin node id, kernel pid) of a gpid."""
    node_id, pid = gpid >> PID_BITS, gpid & PID_MASK
    if gpid < 0 or not 1 <= node_id <= MAX_NODE_ID or pid == 0:
        raise ConfigError(f"{gpid} is not a gpid")
    return node_id, pid


def parse_gpid(text: str) -> int:
    """Accept a gpid as printed by ``dunix ps`` (decimal) or as ``NODE_ID:PID``."""
    try:
        if ":" in text:
            node, pid = text.split(":", 1)
            return make_gpid(int(node), int(pid))
        gpid = int(text, 0)
    except ValueError:
        raise ConfigError(f"{text!r} is not a gpid") from None
    split_gpid(gpid)
    return gpid


@dataclass(frozen=True)
class PidRange:
    """The half-open pid interval ``[first, end)`` a node's job processes come from."""

    first: int
    end: int

    @classmethod
    def for_node(cls, node_id: int) -> PidRange:
        if not 1 <= node_id <= MAX_NODE_ID:
            raise ConfigError(f"node id {node_id} outside 1..{MAX_NODE_ID}")
        return cls(node_id * RANGE_SIZE, (node_id + 1) * RANGE_SIZE)

    def __contains__(self, pid: object) -> bool:
        return isinstance(pid, int) and self.first <= pid < self.end

    def __len__(self) -> int:
        return self.end - self.first


class PidRangeAllocator:
    """Hands out pids of one node's range round-robin, skipping pids still in use.

    Round-robin rather than lowest-free keeps a just-freed pid (possibly still a zombie
    under a late-reaping init, see DESIGN.md) from being reused at once.
    """

    def __init__(self, pid_range: PidRange) -> None:
        self.range = pid_range
        self._next = pid_range.first

    def next_pid(self, in_use: Collection[int]) -> int:
        """The next free pid; ``in_use`` is every pid alive on any node in this range."""
        for _ in range(len(self.range)):
            pid = self._next
            self._next = pid + 1 if pid + 1 < self.range.end else self.range.first
            if pid not in in_use:
                return pid
        raise ConfigError(f"pid range {self.range.first}..{self.range.end - 1} is exhausted")

    def last_pid_for(self, pid: int) -> int:
        """The value to write to ``ns_last_pid`` so the next fork gets ``pid``."""
        if pid not in self.range:
            raise ConfigError(f"pid {pid} is outside this node's range")
        return pid - 1
