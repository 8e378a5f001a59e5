"""Configuration, member records and actions of the membership core."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, fields
from typing import Any

from dunix.errors import ConfigError
from dunix.loadbalance._messages import NodeLoad


@dataclass(frozen=True, slots=True)
class MembershipConfig:
    """Every timing and limit of membership gossip (seconds, counts).

    Defaults aim at a LAN of up to ~1,000 hosts with RTTs well under a millisecond:
    twice memberlist's probe rate (0.5 s against 1 s) and a shorter suspicion (min 1.5 s
    and max 4.5 s on 8 hosts, against memberlist's 4 s and 24 s). On the fake network with
    1% loss a killed host is dead everywhere after 2.5 s at p50 and 4.2 s at p99 on 8
    hosts (400 runs), and 5% loss gives no false deaths. ``bench/gossip_sim.py`` measures
    10 to 1,000 members. The suspicion stays long enough to refute: a member that hears
    it is suspected outbids it within milliseconds on a LAN.
    """

    #: one protocol period: one member probed per period
    probe_interval: float = 0.5
    #: direct ack wait; indirect probes get the rest of the period
    probe_timeout: float = 0.2
    #: members asked to probe indirectly (PingReq)
    indirect_checks: int = 3
    #: a relay sends a Nack after this fraction of ``probe_timeout`` without an ack
    nack_ratio: float = 0.8
    #: min suspicion timeout = mult x max(1, log10(N+1)) x probe_interval
    suspicion_mult: float = 3.0
    #: max suspicion timeout (one suspecter, no confirmations) = max_mult x min
    suspicion_max_mult: float = 3.0
    #: membership updates ride on mult x ceil(log10(N+1)) messages per node
    retransmit_mult: int = 4
    #: ... but at least this many (N-1 when smaller): cheap, and small clusters need it
    min_retransmits: int = 8
    #: while updates are queued, push them this often ...
    gossip_interval: float = 0.2
    #: ... to this many random members
    gossip_nodes: int = 3
    #: members dead for less than this still get gossip (to refute a false death)
    gossip_to_dead_time: float = 30.0
    #: membership updates piggybacked per message at most
    max_piggyback: int = 8
    #: each load version rides on this many messages per node (flat in N on purpose)
    load_retransmits: int = 3
    #: others' load records piggybacked per message at most (own load always rides)
    max_load_piggyback: int = 3
    #: a node gossips its own load at most this often
    load_gossip_interval: float = 1.0
    #: change in normalised load that counts as news (procs/cpu/quota changes always do)
    load_change_threshold: float = 0.1
    #: relative change in free memory that counts as news
    mem_change_ratio: float = 0.1
    #: full-state exchange with one random member (heals partitions)
    pushpull_interval: float = 10.0
    #: a full-state exchange with one random dead member this often (scaled like
    #: push-pull): a restarted node that knows no seed (the founder) is found again
    reconnect_interval: float = 2.0
    #: above this many members the push-pull interval grows linearly, keeping bytes flat
    pushpull_scale_members: int = 32
    #: a second push-pull this long after joining (members that joined alongside)
    join_sync_delay: float = 2.0
    #: join retries until a seed answers
    join_retry_interval: float = 1.0
    #: members told directly of a graceful leave
    leave_fanout: int = 3
    #: Lifeguard local health: probe interval/timeout scale up to this factor
    awareness_max: int = 8
    #: dead and left members are forgotten after this long
    dead_reap_time: float = 3600.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value: Any = getattr(self, f.name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"membership.{f.name} must be a finite number >= 0")
        if self.probe_interval <= 0 or self.probe_timeout <= 0:
            raise ConfigError("membership.probe_interval and probe_timeout must be > 0")
        if self.probe_timeout >= self.probe_interval:
            raise ConfigError("membership.probe_timeout must be below probe_interval")
        if self.retransmit_mult < 1 or self.awareness_max < 1 or self.load_retransmits < 1:
            raise ConfigError("membership retransmit counts and awareness_max must be >= 1")
        if self.suspicion_mult <= 0 or self.suspicion_max_mult < 1:
            raise ConfigError("membership.suspicion_mult > 0 and suspicion_max_mult >= 1")
        if self.pushpull_interval <= 0 or self.join_retry_interval <= 0:
            raise ConfigError("membership push-pull and join intervals must be > 0")
        if self.load_gossip_interval <= 0 or self.gossip_interval <= 0:
            raise ConfigError("membership gossip intervals must be > 0")


class MemberState(enum.StrEnum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


STATE_NAMES = (MemberState.ALIVE, MemberState.SUSPECT, MemberState.DEAD, MemberState.LEFT)


@dataclass(frozen=True, slots=True)
class Member:
    """A snapshot of what this node believes about one member (itself included).

    ``load_at`` is the local time this node last heard the member's current load figure
    (new or confirmed), so a placement policy can discount old figures.
    """

    name: str
    address: str
    node_id: int
    incarnation: int
    state: MemberState
    load: NodeLoad
    state_since: float
    load_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``msg`` to ``to`` ("host:port"), best effort (datagram semantics)."""

    to: str
    msg: Any


@dataclass(frozen=True, slots=True)
class MemberEvent:
    """Something happened to a member.

    ``kind`` is one of ``EVENT_KINDS``: "join" (first seen), "update" (address or node id
    changed), "suspect", "alive" (back from suspect, dead or left), "dead", "left", and
    "id_changed" (this node had to take a new node id; ``member`` is this node).
    """

    kind: str
    member: Member


EVENT_KINDS = ("join", "update", "suspect", "alive", "dead", "left", "id_changed")

Action = Send | MemberEvent
