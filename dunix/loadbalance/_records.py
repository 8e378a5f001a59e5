"""Mutable per-member bookkeeping of the membership core (not part of the API)."""

from __future__ import annotations

from dunix.loadbalance._messages import STATE_ALIVE, NodeLoad, Update
from dunix.loadbalance._types import STATE_NAMES, Member, MembershipConfig


class Rec:
    """Mutable per-member state; ``Member`` is the frozen snapshot handed out."""

    __slots__ = (
        "address",
        "incarnation",
        "load",
        "load_at",
        "lver",
        "name",
        "node_id",
        "state",
        "state_since",
    )

    def __init__(self, name: str, address: str, node_id: int, incarnation: int) -> None:
        self.name = name
        self.address = address
        self.node_id = node_id
        self.incarnation = incarnation
        self.state = STATE_ALIVE
        self.state_since = 0.0
        self.load = NodeLoad()
        self.lver = -1
        self.load_at = 0.0

    def snapshot(self) -> Member:
        return Member(
            self.name,
            self.address,
            self.node_id,
            self.incarnation,
            STATE_NAMES[self.state],
            self.load,
            self.state_since,
            self.load_at,
        )

    def update(self, state: int | None = None, by: str = "") -> Update:
        st = self.state if state is None else state
        if st == STATE_ALIVE:
            return Update(self.name, self.address, self.node_id, self.incarnation, st)
        return Update(self.name, "", 0, self.incarnation, st, by)


class Probe:
    __slots__ = ("deadline", "direct_deadline", "expected_nacks", "indirect", "nacks", "seq")

    def __init__(self, seq: int, direct_deadline: float, deadline: float) -> None:
        self.seq = seq
        self.direct_deadline = direct_deadline
        self.deadline = deadline
        self.indirect = False
        self.expected_nacks = 0
        self.nacks = 0


class Relay:
    __slots__ = ("expires", "nack_at", "orig_seq", "requester")

    def __init__(self, requester: str, orig_seq: int, nack_at: float, expires: float) -> None:
        self.requester = requester
        self.orig_seq = orig_seq
        self.nack_at = nack_at
        self.expires = expires


def significant_change(old: NodeLoad, new: NodeLoad, cfg: MembershipConfig) -> bool:
    if (old.cpus, old.procs, old.cpu_level, old.cpu_flags) != (
        new.cpus,
        new.procs,
        new.cpu_level,
        new.cpu_flags,
    ):
        return True
    if abs(old.load1 - new.load1) >= cfg.load_change_threshold:
        return True
    if abs(old.load_now - new.load_now) >= cfg.load_change_threshold:
        return True
    base = max(old.mem_free, 1)
    return abs(new.mem_free - old.mem_free) / base >= cfg.mem_change_ratio
