"""The transmit-limited gossip queue: what to piggyback on the next message.

Infection-style dissemination: each queued item rides on up to ``limit`` outgoing
messages, items sent fewest times first and, among equals, newest first (memberlist's
TransmitLimitedQueue works the same way). A newer item under the same key (a newer state
of the same member) replaces the older one and starts again at zero transmissions.

Items live in buckets by transmit count, so taking ``k`` items costs O(k) however long
the queue is; a 1,000-member cluster that just learned of many members stays cheap.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class TransmitQueue(Generic[T]):
    """Items keyed by member name, each handed out at most ``limit`` times."""

    def __init__(self) -> None:
        self._buckets: list[dict[str, T]] = [{}]
        self._where: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def put(self, key: str, item: T) -> None:
        """Queue ``item``; it replaces any item queued under ``key``."""
        old = self._where.get(key)
        if old is not None:
            del self._buckets[old][key]
        self._buckets[0][key] = item
        self._where[key] = 0

    def discard(self, key: str) -> None:
        old = self._where.pop(key, None)
        if old is not None:
            del self._buckets[old][key]

    def take(self, max_items: int, limit: int) -> list[T]:
        """Up to ``max_items`` items to send now; each counts one transmission.

        Items that reach ``limit`` transmissions leave the queue.
        """
        picked: list[tuple[int, str]] = []
        for count, bucket in enumerate(self._buckets):
            if len(picked) >= max_items:
                break
            if count >= limit:
                # the limit shrank (fewer members): these are done
                for key in bucket:
                    del self._where[key]
                bucket.clear()
                continue
            for key in reversed(bucket):
                picked.append((count, key))
                if len(picked) >= max_items:
                    break
        out: list[T] = []
        for count, key in picked:
            item = self._buckets[count].pop(key)
            out.append(item)
            if count + 1 >= limit:
                del self._where[key]
                continue
            if count + 1 == len(self._buckets):
                self._buckets.append({})
            self._buckets[count + 1][key] = item
            self._where[key] = count + 1
        return out
