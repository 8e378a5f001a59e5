"""Sans-IO core of the peer lookup: who has a name this host does not have?

The rule (issue 5): ``open()`` looks on the local disk first; on a miss the host asks every
peer at once and waits up to a deadline. The first peer that has the name answers the
caller; when every peer has said no, or the deadline passes, the answer is "no such file".
That negative answer is cached for a short time, and dropped as soon as any host creates
the name (each host broadcasts :class:`NameCreated` when it does).

:class:`Lookup` is a plain state machine as in h11: the agent feeds it events (a local miss,
a peer's reply, the clock, a creation) with the current time, and carries out the actions it
returns (send a query to peers, answer callers, broadcast a creation). Nothing here sleeps
or touches a socket, so tests drive it with a fake clock and 1,000 simulated peers.

Several callers missing the same name while a query is out share that query. A creation
seen while a query is out marks it stale: its negative outcome is still returned (the
caller asked before the name existed) but not cached.

A peer that does not have a name also says which folder above it it lacks altogether
(``LookupReply.missing``: the shallowest one). For ``negative_ttl`` the names below that
folder are not asked of that peer: it cannot have them without creating one, and every
creation is broadcast (``NameCreated``), which drops what was learnt of the peer for the
folders above the new name. So names in a folder only this host has (a build's output
folder, a job's files) cost no message at all: a create there was one query to every peer
and a wait for the slowest (issue 5, ~5 ms per create on 0.5-CPU hosts). Only a peer's
own creations clear its absences (names it got otherwise, a replica taking a file over
included, broadcast too); an answer from a peer that created something since the query
went out is not kept (the creation may be the folder).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from dunix.errors import ConfigError
from dunix.storagefs.peerfiles import stat_tuple
from dunix.wire import message


@message
@dataclass(frozen=True)
class LookupQuery:
    """Does anyone have ``path`` (a tree path such as ``build/foo.o``)?"""

    query_id: int
    origin: int
    path: str


@message
@dataclass(frozen=True)
class LookupReply:
    """A peer's answer to a :class:`LookupQuery`; the attributes are set when ``found``."""

    query_id: int
    node: int
    path: str
    found: bool
    ino: int = 0
    mode: int = 0
    size: int = 0
    mtime_ns: int = 0
    attrs: tuple[int, ...] = ()  # the full stat (peerfiles.stat_tuple), so no second trip
    #: not found: the shallowest folder above ``path`` this host does not have ("" if it
    #: has them all), so nothing below it is asked of this host for a while
    missing: str = ""


@message
@dataclass(frozen=True)
class NameCreated:
    """Host ``node`` created ``path`` (and the ``more`` paths, in that order): forget any
    cached "no such file" for them. One message carries every name created while the
    sender's loop was busy with earlier ones (``PeerResolver``)."""

    node: int
    path: str
    more: tuple[str, ...] = ()


@dataclass(frozen=True)
class SendQuery:
    """Action: send ``query`` to each of ``peers`` (in parallel)."""

    peers: frozenset[int]
    query: LookupQuery


@dataclass(frozen=True)
class Answer:
    """Action: tell ``callers`` the outcome; ``found`` is None for "no such file"."""

    callers: tuple[int, ...]
    path: str
    found: LookupReply | None


@dataclass(frozen=True)
class Broadcast:
    """Action: send ``message`` to ``peers`` (None: every peer; no reply expected)."""

    message: NameCreated
    peers: frozenset[int] | None = None


Action = SendQuery | Answer | Broadcast


@dataclass(frozen=True)
class LookupConfig:
    """Timings of the lookup, in seconds (from the agent's config)."""

    deadline: float = 0.05
    negative_ttl: float = 1.0
    max_negative: int = 65536

    def __post_init__(self) -> None:
        if self.deadline <= 0 or self.negative_ttl < 0 or self.max_negative < 0:
            raise ConfigError(f"bad lookup timings {self}")


@dataclass
class _Query:
    query_id: int
    path: str
    waiting: set[int]
    callers: list[int]
    deadline: float
    stale: bool = False
    #: per asked peer, how many creations it had announced when the query went out
    heard: dict[int, int] = field(default_factory=dict)
    #: the peers a "no such file" stands for: asked, or known to lack a folder above it
    covered: frozenset[int] = frozenset()


@dataclass
class Lookup:
    """The lookup state of one host (see the module docstring)."""

    node_id: int
    config: LookupConfig = field(default_factory=LookupConfig)
    _queries: dict[int, _Query] = field(default_factory=dict, init=False)
    _by_path: dict[str, int] = field(default_factory=dict, init=False)
    _negative: dict[str, tuple[float, frozenset[int]]] = field(default_factory=dict, init=False)
    _next_id: int = field(default=1, init=False)
    #: peer -> folder it lacks -> until when that is trusted
    _absent: dict[int, dict[str, float]] = field(default_factory=dict, init=False)
    #: peer -> how many NameCreated it sent (an answer across one is not trusted)
    _created_by: dict[int, int] = field(default_factory=dict, init=False)
    #: name or folder this host said it lacks -> peer told -> until when the peer may
    #: rely on it: a creation there is announced to those peers only
    _told: dict[str, dict[int, float]] = field(default_factory=dict, init=False)
    _told_count: int = field(default=0, init=False)
    #: the table overflowed, or it is new (this agent restarted: what it told peers before
    #: is lost, see ``started``): until then every creation goes to every peer
    _tell_all_until: float = field(default=-math.inf, init=False)

    def local_miss(
        self, caller: int, path: str, peers: Collection[int], now: float
    ) -> list[Action]:
        """The name is not on the local disk: answer from the cache or ask ``peers``.

        A cached "no such file" holds only for the peers it was found with: a host that
        joined since may have the name (and was never asked, so never tells us)."""
        others = frozenset(peers) - {self.node_id}
        cached = self._negative.get(path)
        if cached is not None:
            if now < cached[0] and others <= cached[1]:
                return [Answer((caller,), path, None)]
            del self._negative[path]
        running = self._by_path.get(path)
        if running is not None:
            self._queries[running].callers.append(caller)
            return []
        asked = frozenset(p for p in others if not self._lacks(p, path, now))
        if not asked:
            return [Answer((caller,), path, None)]
        query = LookupQuery(self._next_id, self.node_id, path)
        self._next_id += 1
        self._queries[query.query_id] = _Query(
            query.query_id, path, set(asked), [caller], now + self.config.deadline,
            heard={p: self._created_by.get(p, 0) for p in asked}, covered=others,
        )  # fmt: skip
        self._by_path[path] = query.query_id
        return [SendQuery(asked, query)]

    def peer_reply(self, reply: LookupReply, now: float) -> list[Action]:
        """A peer answered; late, duplicate and unasked-for replies are ignored."""
        query = self._queries.get(reply.query_id)
        if query is None or reply.node not in query.waiting or reply.path != query.path:
            return []
        query.waiting.discard(reply.node)
        if reply.found:
            return [self._finish(query, reply, now)]
        if reply.missing and self._created_by.get(reply.node, 0) == query.heard.get(reply.node):
            self._learn_absent(reply.node, reply.missing, query.path, now)
        if not query.waiting:
            return [self._finish(query, None, now)]
        return []

    def peer_gone(self, peer: int, now: float) -> list[Action]:
        """A peer left or died: stop waiting for it (and forget what it lacked)."""
        self._absent.pop(peer, None)
        actions: list[Action] = []
        for query in list(self._queries.values()):
            if peer in query.waiting:
                query.waiting.discard(peer)
                if not query.waiting:
                    actions.append(self._finish(query, None, now))
        return actions

    def tick(self, now: float) -> list[Action]:
        """Time passed: queries past their deadline answer "no such file"."""
        return [
            self._finish(query, None, now)
            for query in list(self._queries.values())
            if now >= query.deadline
        ]

    def next_deadline(self) -> float | None:
        """When :meth:`tick` next has something to do (None: nothing pending)."""
        return min((q.deadline for q in self._queries.values()), default=None)

    def name_created(self, path: str, node: int | None = None) -> list[Action]:
        """Some host (``node``: a peer; None: this one) created ``path``."""
        self._negative.pop(path, None)
        if node is not None and node != self.node_id:
            self._created_by[node] = self._created_by.get(node, 0) + 1
            absent = self._absent.get(node)
            if absent:
                for folder in _folders_above(path, itself=True):
                    if absent.pop(folder, None) is not None:
                        # names below it were found missing without asking that peer
                        below = folder + "/"
                        for name in [n for n in self._negative if n.startswith(below)]:
                            del self._negative[name]
        running = self._by_path.get(path)
        if running is not None:
            self._queries[running].stale = True
        return []

    def created_here(self, path: str, now: float) -> list[Action]:
        """This host created ``path``: invalidate here, and tell the peers that may hold a
        "no such file" for it because of us: those we told we lack it or a folder above it
        (``answered_missing``) within their cache's lifetime. Nobody else asked us, so
        nobody else can (a burst of creates in a folder only this host has sends none)."""
        self.name_created(path)
        told: set[int] = set()
        for key in _folders_above(path, itself=True):
            peers = self._told.pop(key, None)
            if peers:
                self._told_count -= len(peers)
                told.update(p for p, until in peers.items() if now < until)
        message = NameCreated(self.node_id, path)
        if now < self._tell_all_until:
            return [Broadcast(message)]
        return [Broadcast(message, frozenset(told))] if told else []

    def answered_missing(self, peer: int, path: str, missing: str, now: float) -> None:
        """We told ``peer`` we have no ``path`` (and lack folder ``missing`` above it, if
        set): it may rely on that for its ``negative_ttl`` (same config cluster-wide), plus
        the time a reply takes to reach it and its query's deadline."""
        until = now + self._reliance()
        if self._told_count >= max(self.config.max_negative, 1):
            self._told.clear()  # too many to track: tell everybody for a while
            self._told_count = 0
            self._tell_all_until = until
        peers = self._told.setdefault(missing or path, {})
        self._told_count += peer not in peers
        peers[peer] = until

    def started(self, now: float) -> None:
        """This host starts answering (an agent start or restart): what it told peers before
        is lost, so its creations go to every peer for as long as they may rely on that."""
        self._tell_all_until = max(self._tell_all_until, now + self._reliance())

    def _reliance(self) -> float:
        return self.config.negative_ttl + self.config.deadline + 1.0

    def cached_negatives(self) -> int:
        return len(self._negative)

    def absences(self, peer: int) -> list[str]:
        """The folders ``peer`` is taken to lack (whether still trusted or not)."""
        return sorted(self._absent.get(peer, {}))

    def _lacks(self, peer: int, path: str, now: float) -> bool:
        absent = self._absent.get(peer)
        if not absent:
            return False
        for folder in _folders_above(path, itself=False):
            expires = absent.get(folder)
            if expires is not None:
                if now < expires:
                    return True
                del absent[folder]
        return False

    def _learn_absent(self, peer: int, folder: str, path: str, now: float) -> None:
        if not path.startswith(folder + "/") or not self.config.max_negative:
            return  # not a folder above the name asked: ignored
        absent = self._absent.setdefault(peer, {})
        while len(absent) >= self.config.max_negative:
            del absent[next(iter(absent))]  # oldest first
        absent[folder] = now + self.config.negative_ttl

    def _finish(self, query: _Query, found: LookupReply | None, now: float) -> Answer:
        del self._queries[query.query_id]
        del self._by_path[query.path]
        if found is None and not query.stale and self.config.max_negative:
            while len(self._negative) >= self.config.max_negative:
                del self._negative[next(iter(self._negative))]  # oldest first
            self._negative[query.path] = (now + self.config.negative_ttl, query.covered)
        return Answer(tuple(query.callers), query.path, found)


def _folders_above(path: str, *, itself: bool) -> list[str]:
    """The folders above a tree path, shallowest first (and the path itself if asked)."""
    parts = path.split("/")
    stop = len(parts) + 1 if itself else len(parts)
    return ["/".join(parts[:n]) for n in range(1, stop)]


def missing_folder(path: str, exists: Callable[[str], bool]) -> str:
    """The shallowest folder above ``path`` that ``exists`` denies ("" if none): asked of
    the parent first, as a name is mostly missing from a folder that is there."""
    above = _folders_above(path, itself=False)
    if not above or exists(above[-1]):
        return ""
    for folder in above[:-1]:
        if not exists(folder):
            return folder
    return above[-1]


def reply_for(
    query: LookupQuery, node_id: int, st: os.stat_result | None, ino: int, missing: str = ""
) -> LookupReply:
    """The answering side: this host's reply given its local stat of the name (or None)
    and, when it has no such name, the shallowest folder above it that it lacks."""
    if st is None:
        return LookupReply(query.query_id, node_id, query.path, False, missing=missing)
    return LookupReply(
        query.query_id, node_id, query.path, True, ino, st.st_mode, st.st_size, st.st_mtime_ns,
        stat_tuple(st, ino),
    )  # fmt: skip
