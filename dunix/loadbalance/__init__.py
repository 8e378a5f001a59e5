"""Load sampling, peer membership with load gossip, and placement policy.

Membership is a sans-IO SWIM/Lifeguard core (:class:`Membership`): the agent feeds it
messages and the time and performs the actions it returns.
"""

from dunix.loadbalance._messages import (
    MESSAGE_TYPES,
    PUSHPULL_JOIN,
    PUSHPULL_JOIN_REPLY,
    PUSHPULL_SYNC,
    PUSHPULL_SYNC_REPLY,
    Ack,
    Gossip,
    LoadUpdate,
    Nack,
    NodeLoad,
    Ping,
    PingReq,
    PushPull,
    Update,
)
from dunix.loadbalance._types import (
    EVENT_KINDS,
    Action,
    Member,
    MemberEvent,
    MembershipConfig,
    MemberState,
    Send,
)
from dunix.loadbalance.balancer import Balancer, BalancerConfig, Candidate, Decision
from dunix.loadbalance.membership import NODE_ID_MAX, Membership, derive_node_id

__all__ = [
    "EVENT_KINDS",
    "MESSAGE_TYPES",
    "NODE_ID_MAX",
    "PUSHPULL_JOIN",
    "PUSHPULL_JOIN_REPLY",
    "PUSHPULL_SYNC",
    "PUSHPULL_SYNC_REPLY",
    "Ack",
    "Action",
    "Balancer",
    "BalancerConfig",
    "Candidate",
    "Decision",
    "Gossip",
    "LoadUpdate",
    "Member",
    "MemberEvent",
    "MemberState",
    "Membership",
    "MembershipConfig",
    "Nack",
    "NodeLoad",
    "Ping",
    "PingReq",
    "PushPull",
    "Send",
    "Update",
    "derive_node_id",
]
