"""Wire messages of membership and load gossip (SWIM with Lifeguard's nacks).

Field values are kept small because every probe carries them: member states travel as
small ints (``STATE_*``), names and addresses once per record, and a sender never names
itself where the receiver already knows who it is (the transport gives the source
address; a node's own load record, first in ``loads``, names it). Sequences are tuples so
messages stay hashable.
"""

from __future__ import annotations

from dataclasses import dataclass

from dunix.wire import message

STATE_ALIVE = 0
STATE_SUSPECT = 1
STATE_DEAD = 2
STATE_LEFT = 3


@message
@dataclass(frozen=True, slots=True)
class NodeLoad:
    """What a node reports about itself for placement.

    ``load1`` and ``load_now`` are run-queue lengths divided by the CPU quota (1.0 = every
    CPU busy); ``cpu_level`` is the x86-64 micro-architecture level (1 to 4) and
    ``cpu_flags`` a bit field of the features migration must match.
    """

    load1: float = 0.0
    load_now: float = 0.0
    cpus: float = 1.0
    mem_free: int = 0
    procs: int = 0
    cpu_level: int = 1
    cpu_flags: int = 0


@message
@dataclass(frozen=True, slots=True)
class Update:
    """One member's state at one incarnation; the unit of membership gossip.

    Alive records carry ``address`` and ``node_id``; suspect, dead and left records may
    leave them empty (``""``, 0). ``by`` names who suspects or declared death, so that
    independent suspicions can shorten the suspicion timeout (Lifeguard).
    """

    name: str
    address: str
    node_id: int
    incarnation: int
    state: int
    by: str = ""


@message
@dataclass(frozen=True, slots=True)
class LoadUpdate:
    """A member's load at load version ``version`` (newer versions win)."""

    name: str
    version: int
    load: NodeLoad


@message
@dataclass(frozen=True, slots=True)
class Ping:
    """A probe. ``target`` is the name the sender means, so a new process at a reused
    address does not answer for an old one. ``loads[0]`` is the sender's own load."""

    seq: int
    target: str
    updates: tuple[Update, ...] = ()
    loads: tuple[LoadUpdate, ...] = ()


@message
@dataclass(frozen=True, slots=True)
class Ack:
    """Answer to a Ping (or relayed for a PingReq); ``loads[0]`` is the prober's target."""

    seq: int
    updates: tuple[Update, ...] = ()
    loads: tuple[LoadUpdate, ...] = ()


@message
@dataclass(frozen=True, slots=True)
class PingReq:
    """Ask the receiver to probe ``target`` at ``address`` on the sender's behalf."""

    seq: int
    target: str
    address: str
    updates: tuple[Update, ...] = ()
    loads: tuple[LoadUpdate, ...] = ()


@message
@dataclass(frozen=True, slots=True)
class Nack:
    """Lifeguard: the relay got no answer from the target in time.

    A prober that hears neither ack nor nacks suspects its own network, not the target.
    """

    seq: int


@message
@dataclass(frozen=True, slots=True)
class Gossip:
    """News pushed to a few members between probes (no answer): queued membership
    updates, and the sender's own load when it has just published a new figure."""

    updates: tuple[Update, ...] = ()
    loads: tuple[LoadUpdate, ...] = ()


#: PushPull kinds: a joiner's request and its answer (every load included), and the
#: periodic anti-entropy exchange (membership only)
PUSHPULL_JOIN = 0
PUSHPULL_JOIN_REPLY = 1
PUSHPULL_SYNC = 2
PUSHPULL_SYNC_REPLY = 3


@message
@dataclass(frozen=True, slots=True)
class PushPull:
    """Full-state anti-entropy: a request (``PUSHPULL_JOIN`` or ``PUSHPULL_SYNC``) is
    answered with the receiver's full state. Used to join and, periodically, to heal
    partitions."""

    sender: str
    kind: int
    members: tuple[Update, ...]
    loads: tuple[LoadUpdate, ...] = ()


GossipMessage = Ping | Ack | PingReq | Nack | Gossip | PushPull

#: the message types ``Membership.receive`` takes, for routing in a transport
MESSAGE_TYPES: tuple[type, ...] = (Ping, Ack, PingReq, Nack, Gossip, PushPull)
