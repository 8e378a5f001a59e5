"""Sans-IO cluster membership and load gossip: SWIM with the Lifeguard refinements.

``Membership`` is a plain object: the agent feeds it received messages and the time, and
it returns actions (``Send`` a message, ``MemberEvent``). It never reads a clock, never
sleeps and draws randomness only from the ``random.Random`` it is given, so tests and
``bench/gossip_sim.py`` drive it on a fake clock and network.

Protocol (Das et al., "SWIM", DSN 2002; Dadgar et al., "Lifeguard", arXiv:1707.00788):

* Every ``probe_interval`` a node pings the next member of a shuffled round-robin list.
  With no ack after ``probe_timeout`` it asks ``indirect_checks`` others to ping it
  (``PingReq``); they answer with the relayed ``Ack`` or a ``Nack``. No ack by the end of
  the period makes the target *suspect*.
* A suspicion becomes *dead* after a timeout that starts at ``suspicion_max_mult`` x the
  minimum and shrinks as other members independently suspect the same member. A member
  that hears it is suspected refutes by raising its incarnation.
* Local health (Lifeguard): a node that misses acks *and* nacks doubts itself and stretches
  its own probe interval and timeout, instead of accusing healthy peers.
* State changes ride piggybacked on pings and acks, and while there are any, every
  ``gossip_interval`` a ``Gossip`` message carries them to
  ``gossip_nodes`` members round-robin (suspects and the recently dead included, so they
  can refute); each update goes out on
  mult x ceil(log10(N+1)) messages per node (at least ``min_retransmits``, or N-1 in a
  smaller cluster, so a small cluster tells everyone), fewest-sent first. Precedence: alive at a
  higher incarnation beats everything older; suspect beats alive at the same
  incarnation; dead and left beat everything at or below their incarnation.
* Every ``pushpull_interval`` (stretched linearly above ``pushpull_scale_members`` members,
  so bytes per member stay flat) a node swaps full state with one random member, dead
  ones included: this is what heals a partition. Dead claims received that way count only
  as suspicions (the subject gets a chance to refute), as in memberlist.
* Every ``reconnect_interval`` (scaled the same way) a node that knows dead or left
  members sends one of them, at random, its full state, as serf's reconnect does: a
  restarted node that has no seed to join (the cluster's founder) hears from the others
  within seconds.

Load: each node's ``NodeLoad`` has a version. The newest published version rides first in
the ``loads`` of every ping and ack the node sends, so the members it talks to learn it
directly, and is pushed to ``gossip_nodes`` members (round-robin) when published. A new
version (published at most every ``load_gossip_interval``, and only when
it changed noticeably) is passed on ``load_retransmits`` times by each node that hears
it, but only on pings and acks and at most ``max_load_piggyback`` per message: with a
fixed probe rate that caps load bytes per member whatever N is. Small clusters see every
load within a few seconds; in big ones a node's view of far members' loads ages instead
(``Member.load_at`` says how old it is). A joiner gets every load in its join reply.

Node ids: ``derive_node_id(name, salt)`` hashes the name into 1..1023. A joiner whose
join reply shows another live member with the same id takes the next salt that gives a
free id, bumps its incarnation, re-announces itself and emits ``MemberEvent("id_changed")``
so the agent can move to the new id before allocating any gpid. A node's id settles at
the first join reply it gets, or when, already a member, it first serves someone else's
join (a founder that started alone). A settled id never moves: a later re-join keeps it,
so two clusters formed apart and merged later can hold a collision (the agent should
refuse such a merge).

Restarts: a restarted node (same name, new process) should start from an incarnation
above any it used before (the agent passes a wall-clock-derived ``incarnation``); if it
does not, it learns its old record from the join reply and refutes it.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence

from dunix.errors import NoSuchNode, ProtocolError
from dunix.loadbalance._broadcast import TransmitQueue
from dunix.loadbalance._messages import (
    PUSHPULL_JOIN,
    PUSHPULL_JOIN_REPLY,
    PUSHPULL_SYNC,
    PUSHPULL_SYNC_REPLY,
    STATE_ALIVE,
    STATE_DEAD,
    STATE_LEFT,
    STATE_SUSPECT,
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
from dunix.loadbalance._records import Probe, Rec, Relay, significant_change
from dunix.loadbalance._suspicion import Suspicion, suspicion_timeouts
from dunix.loadbalance._types import (
    STATE_NAMES,
    Action,
    Member,
    MemberEvent,
    MembershipConfig,
    Send,
)

NODE_ID_MAX = 1023
_INF = math.inf
_GONE = (STATE_DEAD, STATE_LEFT)
_LIVE = (STATE_ALIVE, STATE_SUSPECT)


def derive_node_id(name: str, salt: int = 0) -> int:
    """A node id in 1..1023 from the node name: blake2b of ``"salt:name"``.

    Stable across restarts and agents (no coordination needed); ``salt`` moves a node
    off an id that collides with a live member's (see the module docstring).
    """
    digest = hashlib.blake2b(f"{salt}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % NODE_ID_MAX + 1


class Membership:
    """One node's view of the cluster; see the module docstring for the protocol.

    Call ``tick(now)`` at ``next_deadline()`` (or at least every 50 ms), ``receive`` for
    every membership message, and perform the returned ``Send`` actions best effort.
    """

    def __init__(
        self,
        name: str,
        address: str,
        node_id: int,
        config: MembershipConfig,
        rng: random.Random,
        load: NodeLoad | None = None,
        *,
        incarnation: int = 0,
    ) -> None:
        self.config = config
        self._rng = rng
        self._self = Rec(name, address, node_id, incarnation)
        self._self.load = load if load is not None else NodeLoad()
        self._self.lver = 0
        self._members: dict[str, Rec] = {name: self._self}
        self._n_live = 1
        self._probe_list: list[str] = []
        self._probe_idx = 0
        self._probe: Probe | None = None
        self._probe_target: Rec | None = None
        self._next_probe: float | None = None
        self._seq = 0
        self._relays: dict[int, Relay] = {}
        self._suspicions: dict[str, Suspicion] = {}
        self._gone: dict[str, float] = {}
        self._queue: TransmitQueue[Update] = TransmitQueue()
        self._load_queue: TransmitQueue[LoadUpdate] = TransmitQueue()
        self._own_load = LoadUpdate(name, 0, self._self.load)
        self._load_pending: NodeLoad | None = None
        self._load_next_pub = -_INF
        self._awareness = 0
        self._next_pushpull: float | None = None
        self._next_reconnect = -_INF
        self._next_gossip = -_INF
        self._gossip_idx = 0
        self._seeds: tuple[str, ...] = ()
        self._joined = True
        self._next_join = _INF
        self._leaving = False
        self._salt = 0
        self._id_settled = False  # node id checked against a cluster's (first join reply)

    # -- public state -------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._self.name

    @property
    def address(self) -> str:
        return self._self.address

    @property
    def node_id(self) -> int:
        return self._self.node_id

    @property
    def incarnation(self) -> int:
        return self._self.incarnation

    @property
    def joined(self) -> bool:
        """False while join() still waits for a seed to answer."""
        return self._joined

    @property
    def health(self) -> int:
        """Lifeguard local-health score: 0 is healthy; probes stretch by (health + 1)."""
        return self._awareness

    @property
    def num_alive(self) -> int:
        """Members believed alive or suspect, this node included."""
        return self._n_live

    def members(self) -> list[Member]:
        """Every known member, this node included, dead and left ones until reaped."""
        return [rec.snapshot() for rec in self._members.values()]

    def member(self, name: str) -> Member:
        rec = self._members.get(name)
        if rec is None:
            raise NoSuchNode(f"no member named {name!r}")
        return rec.snapshot()

    def set_local_load(self, load: NodeLoad) -> None:
        """Report this node's load; it is published at the next tick if it is news."""
        if significant_change(self._self.load, load, self.config):
            self._load_pending = load
        else:
            self._load_pending = None

    # -- lifecycle ----------------------------------------------------------------------

    def join(self, seeds: Sequence[str], now: float) -> list[Action]:
        """Join through any of ``seeds`` ("host:port"); none means a cluster of one.

        Retries every ``join_retry_interval`` until a seed answers (``joined``).
        """
        if self._leaving:
            self._self.incarnation += 1
        self._leaving = False
        self._self.state = STATE_ALIVE
        self._self.state_since = now
        self._queue.put(self.name, self._self.update())
        self._seeds = tuple(s for s in seeds if s != self.address)
        if not self._seeds:
            self._joined = True
            return []
        self._joined = False
        self._next_join = now + self.config.join_retry_interval
        return self._join_sends()

    def leave(self, now: float) -> list[Action]:
        """Leave gracefully: announce "left" at a new incarnation and stop probing."""
        out: list[Action] = []
        if self._leaving:
            return out
        me = self._self
        me.incarnation += 1
        me.state = STATE_LEFT
        me.state_since = now
        self._leaving = True
        self._joined = True
        left = me.update()
        self._queue.put(self.name, left)
        for rec in self._random_live(self.config.leave_fanout, exclude=()):
            updates, loads = self._piggyback()
            if left not in updates:
                updates = (left, *updates)
            out.append(Send(rec.address, Ping(self._next_seq(), rec.name, updates, loads)))
        return out

    # -- time ---------------------------------------------------------------------------

    def next_deadline(self) -> float:
        """When ``tick`` next has work; ``-inf`` before the first tick."""
        if self._leaving:
            return _INF
        if self._next_probe is None or self._next_pushpull is None:
            return -_INF
        t = min(self._next_probe, self._next_pushpull, self._next_join)
        if len(self._queue):
            t = min(t, self._next_gossip)
        probe = self._probe
        if probe is not None:
            t = min(t, probe.deadline if probe.indirect else probe.direct_deadline)
        for relay in self._relays.values():
            t = min(t, relay.nack_at, relay.expires)
        for s in self._suspicions.values():
            t = min(t, s.deadline)
        if self._load_pending is not None:
            t = min(t, self._load_next_pub)
        for since in self._gone.values():
            t = min(t, since + self.config.dead_reap_time, self._next_reconnect)
            break
        return t

    def tick(self, now: float) -> list[Action]:
        """Run every timer that is due at ``now``."""
        out: list[Action] = []
        if self._leaving:
            return out
        cfg = self.config
        if self._next_probe is None:
            self._next_probe = now + self._rng.uniform(0.0, cfg.probe_interval)
        if self._next_pushpull is None:
            # a uniform phase: members of a cluster started together do not exchange at once
            self._next_pushpull = now + self._pushpull_period() * self._rng.random()
        if self._relays:
            self._tick_relays(now, out)
        if len(self._queue) and now >= self._next_gossip:
            self._gossip(now, out)
        probe = self._probe
        if probe is not None:
            if not probe.indirect and now >= probe.direct_deadline:
                self._send_indirect(probe, out)
            if now >= probe.deadline:
                self._probe_failed(probe, now, out)
        if now >= self._next_probe:
            self._start_probe(now, out)
        if self._suspicions:
            for name, s in list(self._suspicions.items()):
                if now >= s.deadline:
                    rec = self._members[name]
                    self._on_gone(rec, rec.update(STATE_DEAD, self.name), now, out)
        if now >= self._next_pushpull:
            self._next_pushpull = now + self._pushpull_period() * self._rng.uniform(0.75, 1.25)
            peer = self._random_peer()
            if peer is not None:
                out.append(Send(peer.address, self._full_state(PUSHPULL_SYNC)))
        if self._gone and now >= self._next_reconnect:
            self._reconnect(now, out)
        if not self._joined and now >= self._next_join:
            self._next_join = now + cfg.join_retry_interval
            out.extend(self._join_sends())
        if self._load_pending is not None and now >= self._load_next_pub:
            self._publish_load(self._load_pending, now)
            self._gossip(now, out, with_load=True)
        if self._gone:
            self._reap(now)
        return out

    # -- receiving ----------------------------------------------------------------------

    def receive(self, src_address: str, msg: object, now: float) -> list[Action]:
        """Handle one message from ``src_address``; ProtocolError if it is not ours."""
        out: list[Action] = []
        if isinstance(msg, Ping):
            self._gossip_in(msg.updates, msg.loads, now, out, src_address)
            if msg.target == self.name:
                updates, loads = self._piggyback()
                out.append(Send(src_address, Ack(msg.seq, updates, loads)))
        elif isinstance(msg, Ack):
            self._gossip_in(msg.updates, msg.loads, now, out, src_address)
            self._on_ack(msg, now, out)
        elif isinstance(msg, PingReq):
            self._gossip_in(msg.updates, msg.loads, now, out, src_address)
            if not self._leaving:
                self._relay(src_address, msg, now, out)
        elif isinstance(msg, Gossip):
            self._gossip_in(msg.updates, msg.loads, now, out, src_address)
        elif isinstance(msg, Nack):
            if self._probe is not None and self._probe.seq == msg.seq:
                self._probe.nacks += 1
        elif isinstance(msg, PushPull):
            self._on_pushpull(src_address, msg, now, out)
        else:
            raise ProtocolError(f"not a membership message: {type(msg).__name__}")
        return out

    def _gossip_in(
        self,
        updates: tuple[Update, ...],
        loads: tuple[LoadUpdate, ...],
        now: float,
        out: list[Action],
        src: str,
    ) -> None:
        declared_dead = False
        for u in updates:
            declared_dead |= u.name == self._self.name and u.state == STATE_DEAD
            self._apply(u, now, out, gossip_new=True)
        if declared_dead and not self._leaving:
            # the sender buried us, so we were away (a restart): what it knows of the
            # cluster is news here too, and a restarted founder has no seed to ask
            out.append(Send(src, self._full_state(PUSHPULL_SYNC)))
        for lu in loads:
            self._apply_load(lu, now, regossip=True)

    def _on_ack(self, ack: Ack, now: float, out: list[Action]) -> None:
        relay = self._relays.pop(ack.seq, None)
        if relay is not None:
            updates, _ = self._piggyback()
            out.append(Send(relay.requester, Ack(relay.orig_seq, updates, ack.loads[:1])))
            return
        probe = self._probe
        if probe is not None and probe.seq == ack.seq:
            self._probe = None
            self._probe_target = None
            self._awareness = max(0, self._awareness - 1)

    def _relay(self, src: str, req: PingReq, now: float, out: list[Action]) -> None:
        seq = self._next_seq()
        cfg = self.config
        nack_at = now + cfg.probe_timeout * cfg.nack_ratio
        self._relays[seq] = Relay(src, req.seq, nack_at, now + cfg.probe_interval)
        updates, loads = self._piggyback()
        out.append(Send(req.address, Ping(seq, req.target, updates, loads)))

    def _tick_relays(self, now: float, out: list[Action]) -> None:
        for seq, relay in list(self._relays.items()):
            if now >= relay.nack_at:
                relay.nack_at = _INF
                out.append(Send(relay.requester, Nack(relay.orig_seq)))
            if now >= relay.expires:
                del self._relays[seq]

    def _on_pushpull(self, src: str, pp: PushPull, now: float, out: list[Action]) -> None:
        for u in pp.members:
            if u.state == STATE_DEAD and u.name != pp.sender:
                # a dead claim from afar is only a suspicion here: let the subject refute
                u = Update(u.name, u.address, u.node_id, u.incarnation, STATE_SUSPECT, pp.sender)
            self._apply(u, now, out, gossip_new=u.name == pp.sender)
        for lu in pp.loads:
            self._apply_load(lu, now, regossip=False)
        if pp.kind == PUSHPULL_JOIN:
            if self._joined:
                self._id_settled = True  # someone joins through us: our id is established
            out.append(Send(src, self._full_state(PUSHPULL_JOIN_REPLY)))
        elif pp.kind == PUSHPULL_SYNC:
            out.append(Send(src, self._full_state(PUSHPULL_SYNC_REPLY)))
        elif pp.kind == PUSHPULL_JOIN_REPLY and not self._joined:
            self._joined = True
            self._next_join = _INF
            # one early second exchange catches members that joined alongside us, whose
            # alive gossip our seed may have spent before it knew us
            delay = self.config.join_sync_delay * self._rng.uniform(0.5, 1.5)
            self._next_pushpull = now + delay
            if not self._id_settled:
                self._id_settled = True
                self._check_node_id(now, out)

    # -- state changes ------------------------------------------------------------------

    def _apply(self, u: Update, now: float, out: list[Action], gossip_new: bool) -> None:
        if u.name == self._self.name:
            self._about_self(u, now)
            return
        rec = self._members.get(u.name)
        if u.state == STATE_ALIVE:
            self._on_alive(rec, u, now, out, gossip_new)
        elif rec is None or u.incarnation < rec.incarnation:
            return
        elif u.state == STATE_SUSPECT:
            self._on_suspect(rec, u, now, out)
        elif u.state in _GONE:
            self._on_gone(rec, u, now, out)

    def _about_self(self, u: Update, now: float) -> None:
        me = self._self
        if u.incarnation < me.incarnation:
            if u.state in (STATE_SUSPECT, STATE_DEAD) and not self._leaving:
                # the sender missed our refutation: send it again (it rides on our answer)
                self._queue.put(me.name, me.update())
            return
        same = u.state != STATE_ALIVE or (u.address, u.node_id) == (me.address, me.node_id)
        if u.incarnation == me.incarnation and u.state == me.state and same:
            return
        if self._leaving and u.state == STATE_LEFT:
            return
        if u.state in (STATE_SUSPECT, STATE_DEAD) and not self._leaving:
            self._awareness = min(self.config.awareness_max - 1, self._awareness + 1)
        # someone holds an older story about us (suspect, dead, or a previous life):
        # outbid it with our current state (alive, or left while leaving)
        me.incarnation = u.incarnation + 1
        me.state_since = now
        self._queue.put(me.name, me.update())

    def _on_alive(
        self, rec: Rec | None, u: Update, now: float, out: list[Action], gossip_new: bool
    ) -> None:
        if rec is None:
            rec = Rec(u.name, u.address, u.node_id, u.incarnation)
            rec.state_since = now
            self._members[u.name] = rec
            self._n_live += 1
            self._add_to_probe_list(u.name)
            if gossip_new:
                self._queue.put(u.name, u)
            out.append(MemberEvent("join", rec.snapshot()))
            return
        if u.incarnation <= rec.incarnation:
            return
        changed = (u.address, u.node_id) != (rec.address, rec.node_id)
        was = rec.state
        rec.incarnation = u.incarnation
        rec.address = u.address or rec.address
        rec.node_id = u.node_id
        rec.lver = -1  # a new life may restart its load versions
        self._suspicions.pop(u.name, None)
        self._set_state(rec, STATE_ALIVE, now)
        self._queue.put(u.name, u)
        if was != STATE_ALIVE:
            out.append(MemberEvent("alive", rec.snapshot()))
        elif changed:
            out.append(MemberEvent("update", rec.snapshot()))

    def _on_suspect(self, rec: Rec, u: Update, now: float, out: list[Action]) -> None:
        if rec.state in _GONE:
            return
        if rec.state == STATE_SUSPECT and u.incarnation == rec.incarnation:
            s = self._suspicions.get(rec.name)
            if s is not None and s.confirm(u.by):
                self._queue.put(rec.name, u)  # others count confirmations too
            return
        rec.incarnation = u.incarnation
        self._set_state(rec, STATE_SUSPECT, now)
        cfg = self.config
        k = min(cfg.indirect_checks, max(0, self._n_live - 2))
        low, high = suspicion_timeouts(
            cfg.suspicion_mult, cfg.suspicion_max_mult, self._n_live, cfg.probe_interval
        )
        self._suspicions[rec.name] = Suspicion(u.by, now, k, low, high)
        self._queue.put(rec.name, rec.update(STATE_SUSPECT, u.by))
        out.append(MemberEvent("suspect", rec.snapshot()))

    def _on_gone(self, rec: Rec, u: Update, now: float, out: list[Action]) -> None:
        if rec.state in _GONE:
            rec.incarnation = max(rec.incarnation, u.incarnation)
            return
        rec.incarnation = u.incarnation
        self._suspicions.pop(rec.name, None)
        self._set_state(rec, u.state, now)
        self._queue.put(rec.name, rec.update(u.state, u.by))
        self._load_queue.discard(rec.name)
        out.append(MemberEvent(STATE_NAMES[u.state].value, rec.snapshot()))

    def _set_state(self, rec: Rec, state: int, now: float) -> None:
        was_live = rec.state in _LIVE
        rec.state = state
        rec.state_since = now
        if state in _LIVE:
            self._n_live += 0 if was_live else 1
            self._gone.pop(rec.name, None)
        else:
            self._n_live -= 1 if was_live else 0
            self._gone.pop(rec.name, None)
            self._gone[rec.name] = now

    def _check_node_id(self, now: float, out: list[Action]) -> None:
        me = self._self
        taken = {r.node_id for r in self._members.values() if r is not me and r.state in _LIVE}
        if me.node_id not in taken or len(taken) >= NODE_ID_MAX:
            return  # no collision, or no free id at all (more members than ids)
        for _ in range(64 * NODE_ID_MAX):
            self._salt += 1
            node_id = derive_node_id(me.name, self._salt)
            if node_id not in taken:
                break
        else:
            return
        me.node_id = node_id
        me.incarnation += 1
        me.state_since = now
        self._queue.put(me.name, me.update())
        out.append(MemberEvent("id_changed", me.snapshot()))

    # -- load ---------------------------------------------------------------------------

    def _apply_load(self, lu: LoadUpdate, now: float, regossip: bool) -> None:
        rec = self._members.get(lu.name)
        if rec is None or rec is self._self or lu.version < rec.lver:
            return
        if lu.version == rec.lver:
            rec.load_at = now  # still current: the figure is confirmed fresh
            return
        rec.load = lu.load
        rec.lver = lu.version
        rec.load_at = now
        if regossip and rec.state in _LIVE:
            self._load_queue.put(lu.name, lu)

    def _publish_load(self, load: NodeLoad, now: float) -> None:
        me = self._self
        me.load = load
        me.lver += 1
        me.load_at = now
        # no queueing: it rides first on every message we send, and whoever hears a new
        # version gossips it on
        self._own_load = LoadUpdate(me.name, me.lver, load)
        self._load_pending = None
        self._load_next_pub = now + self.config.load_gossip_interval

    # -- probing ------------------------------------------------------------------------

    def _start_probe(self, now: float, out: list[Action]) -> None:
        cfg = self.config
        scale = self._awareness + 1
        self._next_probe = now + cfg.probe_interval * scale
        target = self._next_target()
        if target is None:
            return
        seq = self._next_seq()
        self._probe = Probe(seq, now + cfg.probe_timeout * scale, self._next_probe)
        self._probe_target = target
        updates, loads = self._piggyback()
        if target.state == STATE_SUSPECT:
            # tell the suspect directly so that it can refute (memberlist does the same)
            updates = (target.update(STATE_SUSPECT, self.name), *updates)
        out.append(Send(target.address, Ping(seq, target.name, updates, loads)))

    def _send_indirect(self, probe: Probe, out: list[Action]) -> None:
        probe.indirect = True
        target = self._probe_target
        if target is None:
            return
        helpers = self._random_live(self.config.indirect_checks, exclude=(target.name,))
        probe.expected_nacks = len(helpers)
        for rec in helpers:
            updates, loads = self._piggyback()
            req = PingReq(probe.seq, target.name, target.address, updates, loads)
            out.append(Send(rec.address, req))

    def _probe_failed(self, probe: Probe, now: float, out: list[Action]) -> None:
        target = self._probe_target
        self._probe = None
        self._probe_target = None
        # Lifeguard: missing nacks mean our own network may be at fault
        missed = probe.expected_nacks - probe.nacks if probe.expected_nacks > 0 else 1
        self._awareness = min(self.config.awareness_max - 1, self._awareness + missed)
        if target is None or target.state not in _LIVE:
            return
        self._on_suspect(target, target.update(STATE_SUSPECT, self.name), now, out)

    def _next_target(self) -> Rec | None:
        for _ in range(len(self._probe_list) + 2):
            if self._probe_idx >= len(self._probe_list):
                names = [n for n in dict.fromkeys(self._probe_list) if n in self._members]
                self._rng.shuffle(names)
                self._probe_list = names
                self._probe_idx = 0
                if not names:
                    return None
            rec = self._members.get(self._probe_list[self._probe_idx])
            self._probe_idx += 1
            if rec is not None and rec.state in _LIVE:
                return rec
        return None

    def _add_to_probe_list(self, name: str) -> None:
        pos = self._rng.randint(0, len(self._probe_list))
        self._probe_list.insert(pos, name)
        if pos < self._probe_idx:
            self._probe_idx += 1

    def _random_live(self, k: int, exclude: Sequence[str]) -> list[Rec]:
        """Up to ``k`` distinct alive members other than this node and ``exclude``."""
        plist = self._probe_list
        if k <= 0 or not plist:
            return []
        members = self._members
        if len(plist) <= 8 * k + 16:
            pool = [
                r
                for n in dict.fromkeys(plist)
                if (r := members.get(n)) and r.state == STATE_ALIVE and n not in exclude
            ]
            return self._rng.sample(pool, min(k, len(pool)))
        picked: dict[str, Rec] = {}
        for _ in range(4 * k + 8):
            r = members.get(plist[self._rng.randrange(len(plist))])
            if r is not None and r.state == STATE_ALIVE and r.name not in exclude:
                picked[r.name] = r
                if len(picked) >= k:
                    break
        return list(picked.values())

    def _random_peer(self) -> Rec | None:
        """A push-pull partner: any member not known to have left, the dead included."""
        plist = self._probe_list
        for _ in range(16 if plist else 0):
            r = self._members.get(plist[self._rng.randrange(len(plist))])
            if r is not None and r.state != STATE_LEFT:
                return r
        return None

    def _reconnect(self, now: float, out: list[Action]) -> None:
        """Offer full state to one dead or left member: if it came back alone, it refutes."""
        self._next_reconnect = now + self.config.reconnect_interval * self._size_scale() * (
            self._rng.uniform(0.75, 1.25)
        )
        dead = list(self._gone)  # left ones too: a member that left may be back alone
        if dead:
            rec = self._members[dead[self._rng.randrange(len(dead))]]
            out.append(Send(rec.address, self._full_state(PUSHPULL_SYNC)))

    # -- gossip out ---------------------------------------------------------------------

    def _retransmit_limit(self) -> int:
        cfg = self.config
        scaled = cfg.retransmit_mult * max(1, math.ceil(math.log10(self._n_live + 1)))
        return max(scaled, min(cfg.min_retransmits, self._n_live - 1))

    def _piggyback(self) -> tuple[tuple[Update, ...], tuple[LoadUpdate, ...]]:
        cfg = self.config
        updates = tuple(self._queue.take(cfg.max_piggyback, self._retransmit_limit()))
        others = self._load_queue.take(cfg.max_load_piggyback, cfg.load_retransmits)
        return updates, (self._own_load, *others)

    def _gossip(self, now: float, out: list[Action], with_load: bool = False) -> None:
        """Push news to a few members now, not only on the next probes.

        Targets are taken round-robin from the shuffled probe list, so successive rounds
        reach different members; suspects and the recently dead are included. Queued
        membership updates ride along; ``with_load`` adds this node's own (new) load.
        """
        cfg = self.config
        limit = self._retransmit_limit()
        if len(self._queue):
            self._next_gossip = now + cfg.gossip_interval
        loads = (self._own_load,) if with_load else ()
        for rec in self._gossip_targets(now, cfg.gossip_nodes):
            updates = tuple(self._queue.take(cfg.max_piggyback, limit))
            if not updates and not loads:
                break
            out.append(Send(rec.address, Gossip(updates, loads)))

    def _gossip_targets(self, now: float, k: int) -> list[Rec]:
        dead_since = now - self.config.gossip_to_dead_time
        plist = self._probe_list
        picked: dict[str, Rec] = {}
        for _ in range(len(plist)):
            if len(picked) >= k:
                break
            self._gossip_idx = (self._gossip_idx + 1) % len(plist)
            rec = self._members.get(plist[self._gossip_idx])
            if rec is None or rec.name in picked or rec is self._self:
                continue
            if rec.state in _LIVE or (rec.state == STATE_DEAD and rec.state_since >= dead_since):
                picked[rec.name] = rec
        return list(picked.values())

    def _full_state(self, kind: int) -> PushPull:
        members = tuple(r.update() for r in self._members.values())
        if kind in (PUSHPULL_SYNC, PUSHPULL_SYNC_REPLY):
            # loads are for joiners: periodic exchanges would double their size for
            # figures that probes keep fresh anyway
            return PushPull(self.name, kind, members)
        all_loads = tuple(
            LoadUpdate(r.name, r.lver, r.load)
            for r in self._members.values()
            if r.lver >= 0 and r.state in _LIVE
        )
        return PushPull(self.name, kind, members, all_loads)

    def _pushpull_period(self) -> float:
        return self.config.pushpull_interval * self._size_scale()

    def _size_scale(self) -> float:
        """Periodic full-state sends slow down linearly above ``pushpull_scale_members``."""
        return max(1.0, self._n_live / max(1, self.config.pushpull_scale_members))

    def _join_sends(self) -> list[Action]:
        state = self._full_state(PUSHPULL_JOIN)
        return [Send(seed, state) for seed in self._seeds]

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _reap(self, now: float) -> None:
        limit = now - self.config.dead_reap_time
        for name, since in list(self._gone.items()):
            if since > limit:
                break
            del self._gone[name]
            rec = self._members.get(name)
            if rec is not None and rec is not self._self and rec.state in _GONE:
                del self._members[name]
                self._queue.discard(name)
