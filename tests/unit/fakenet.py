"""A fake clock and a fake datagram network for driving sans-IO protocol cores.

Any object with ``tick(now)``, ``next_deadline()`` and ``receive(src, msg, now)`` that
returns actions can be a node. Actions with ``to`` and ``msg`` attributes are sends; the
network delivers them after ``delay`` (+ uniform ``jitter``), drops a fraction ``loss``,
and drops everything between different sides of a partition. Every other action is
recorded in ``events`` as ``(time, address, action)``.

``on_event`` sees each recorded action as it happens; ``keep_events=False`` stops
keeping them (a 1,000-node run produces a million "join" events).

Nodes can be crashed (silent from then on), frozen (their messages queue up and their
timers wait until they thaw, like a stalled process), and replaced (a restart at the
same address). Everything is deterministic for a given seed; nothing sleeps.

With ``measure=True`` every send is encoded with ``dunix.wire.encode`` and its size plus
the 4-byte frame header is added to ``bytes_sent``; ``roundtrip=True`` also decodes it so
the receiver gets what a real wire would carry.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from dunix.wire import decode, encode

FRAME_HEADER = 4


class Node(Protocol):
    def tick(self, now: float) -> list[Any]: ...

    def next_deadline(self) -> float: ...

    def receive(self, src_address: str, msg: Any, now: float) -> list[Any]: ...


class FakeClock:
    """Monotonic seconds that only move when told to."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


_DELIVER = 0
_TICK = 1
_THAW = 2


class FakeNet:
    """Deterministic event-driven network of sans-IO nodes keyed by address."""

    def __init__(
        self,
        seed: int = 0,
        delay: float = 0.0005,
        jitter: float = 0.0005,
        loss: float = 0.0,
        measure: bool = False,
        roundtrip: bool = False,
        clock: FakeClock | None = None,
        keep_events: bool = True,
    ) -> None:
        self.clock = clock if clock is not None else FakeClock()
        self.rng = random.Random(seed)
        self.delay = delay
        self.jitter = jitter
        self.loss = loss
        self.measure = measure
        self.roundtrip = roundtrip
        self.keep_events = keep_events
        #: bytes by message type name, with ``measure``
        self.bytes_by_type: dict[str, int] = {}
        #: a node whose deadline has passed right after a tick is ticked again this much later
        self.min_gap = 0.001
        self.nodes: dict[str, Node] = {}
        self.events: list[tuple[float, str, Any]] = []
        self.on_event: Callable[[float, str, Any], None] | None = None
        self.bytes_sent: dict[str, int] = {}
        self.messages_sent = 0
        self.messages_dropped = 0
        self._heap: list[tuple[float, int, int, str, str, Any]] = []
        self._n = 0
        self._scheduled: dict[str, float] = {}
        self._crashed: set[str] = set()
        self._frozen: dict[str, list[tuple[str, Any]]] = {}
        self._side: dict[str, int] = {}

    @property
    def now(self) -> float:
        return self.clock.now

    # -- topology -----------------------------------------------------------------------

    def add(self, address: str, node: Node, actions: Iterable[Any] = ()) -> None:
        """Attach ``node`` at ``address`` (replacing whatever was there: a restart)."""
        self.nodes[address] = node
        self._crashed.discard(address)
        self._frozen.pop(address, None)
        self._scheduled[address] = math.inf
        self.perform(address, actions)
        self._reschedule(address)

    def crash(self, address: str) -> None:
        """The node stops: no more ticks, and messages to it are lost."""
        self._crashed.add(address)
        self._frozen.pop(address, None)

    def freeze(self, address: str, duration: float) -> None:
        """Stall the node for ``duration``: inbound messages wait, timers wait."""
        self._frozen.setdefault(address, [])
        self._push(self.now + duration, _THAW, address, "", None)

    def partition(self, *groups: Iterable[str]) -> None:
        """Split the network: only members of the same group reach each other."""
        self._side = {a: i for i, g in enumerate(groups) for a in g}

    def heal(self) -> None:
        self._side = {}

    def reachable(self, src: str, dst: str) -> bool:
        return self._side.get(src, -1) == self._side.get(dst, -1)

    # -- running ------------------------------------------------------------------------

    def perform(self, address: str, actions: Iterable[Any]) -> None:
        """Carry out actions a node returned outside of the network's own calls."""
        for action in actions:
            to = getattr(action, "to", None)
            if to is not None and hasattr(action, "msg"):
                self._send(address, to, action.msg)
            else:
                if self.keep_events:
                    self.events.append((self.now, address, action))
                if self.on_event is not None:
                    self.on_event(self.now, address, action)

    def poke(self, address: str) -> None:
        """Re-read a node's deadline after calling into it from outside the network."""
        self._reschedule(address)

    def run_until(self, t: float) -> None:
        """Process every event up to time ``t``; the clock ends at ``t``."""
        heap = self._heap
        while heap and heap[0][0] <= t:
            when, _, kind, a, b, payload = heapq.heappop(heap)
            self.clock.now = max(self.clock.now, when)
            if kind == _DELIVER:
                self._deliver(a, b, payload)
            elif kind == _TICK:
                if self._scheduled.get(a) != when or a in self._crashed:
                    continue
                if a in self._frozen:
                    continue  # the thaw reschedules
                self._scheduled[a] = math.inf
                self.perform(a, self.nodes[a].tick(self.now))
                self._reschedule(a, floor=self.now + self.min_gap)
            else:
                self._thaw(a)
        self.clock.now = max(self.clock.now, t)

    def run_for(self, duration: float) -> None:
        self.run_until(self.now + duration)

    def run_until_true(self, pred: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
        """Run in ``step`` slices until ``pred()`` holds; False after ``timeout``."""
        end = self.now + timeout
        while self.now < end:
            if pred():
                return True
            self.run_until(min(end, self.now + step))
        return pred()

    # -- internals ----------------------------------------------------------------------

    def _push(self, when: float, kind: int, a: str, b: str, payload: Any) -> None:
        self._n += 1
        heapq.heappush(self._heap, (when, self._n, kind, a, b, payload))

    def _send(self, src: str, dst: str, msg: Any) -> None:
        self.messages_sent += 1
        if self.measure or self.roundtrip:
            data = encode(msg)
            if self.measure:
                size = len(data) + FRAME_HEADER
                self.bytes_sent[src] = self.bytes_sent.get(src, 0) + size
                kind = type(msg).__name__
                self.bytes_by_type[kind] = self.bytes_by_type.get(kind, 0) + size
            if self.roundtrip:
                msg = decode(data)
        if (self.loss and self.rng.random() < self.loss) or not self.reachable(src, dst):
            self.messages_dropped += 1
            return
        when = self.now + self.delay + (self.rng.random() * self.jitter if self.jitter else 0.0)
        self._push(when, _DELIVER, dst, src, msg)

    def _deliver(self, dst: str, src: str, msg: Any) -> None:
        node = self.nodes.get(dst)
        if node is None or dst in self._crashed or not self.reachable(src, dst):
            self.messages_dropped += 1
            return
        held = self._frozen.get(dst)
        if held is not None:
            held.append((src, msg))
            return
        self.perform(dst, node.receive(src, msg, self.now))
        self._reschedule(dst)

    def _thaw(self, address: str) -> None:
        held = self._frozen.pop(address, None)
        if held is None or address in self._crashed:
            return
        node = self.nodes[address]
        self.perform(address, node.tick(self.now))
        for src, msg in held:
            self.perform(address, node.receive(src, msg, self.now))
        self._scheduled[address] = math.inf
        self._reschedule(address)

    def _reschedule(self, address: str, floor: float = -math.inf) -> None:
        if address in self._crashed:
            return
        when = max(self.nodes[address].next_deadline(), self.now, floor)
        if when < self._scheduled.get(address, math.inf):
            self._scheduled[address] = when
            self._push(when, _TICK, address, "", None)
