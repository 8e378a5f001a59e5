"""Questions an agent asks its peers (ps, kill) and the answers it gathers.

Peer links are one-way message pipes, so a question carries a query number and the answer
comes back as its own message on the answering agent's link to us. ``ask`` waits for the
answers of the peers it asked, up to a deadline, and names the peers that stayed silent.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import trio


class PeerQueries:
    def __init__(self, send: Callable[[str, Any], None]) -> None:
        self._send = send
        self._numbers = itertools.count(1)
        self._waiting: dict[int, dict[str, Any]] = {}
        self._events: dict[int, trio.Event] = {}
        self._expect: dict[int, set[str]] = {}

    async def ask(
        self,
        peers: Sequence[tuple[str, str]],
        make: Callable[[int], Any],
        timeout: float,
    ) -> tuple[dict[str, Any], list[str]]:
        """Send ``make(query)`` to each (name, address); answers by name, and the silent."""
        query = next(self._numbers)
        answers: dict[str, Any] = {}
        self._waiting[query] = answers
        self._events[query] = done = trio.Event()
        by_address = {address: name for name, address in peers}
        self._expect[query] = set(by_address)
        try:
            if not peers:
                return answers, []
            for _, address in peers:
                self._send(address, make(query))
            with trio.move_on_after(timeout):
                await done.wait()
            silent = sorted(by_address[a] for a in self._expect[query])
            return {by_address.get(k, k): v for k, v in answers.items()}, silent
        finally:
            self._waiting.pop(query, None)
            self._events.pop(query, None)
            self._expect.pop(query, None)

    def answer(self, sender_address: str, query: int, msg: Any) -> None:
        """Record an answer; late or unexpected ones are dropped."""
        answers = self._waiting.get(query)
        expect = self._expect.get(query)
        if answers is None or expect is None or sender_address not in expect:
            return
        expect.discard(sender_address)
        answers[sender_address] = msg
        if not expect:
            self._events[query].set()
