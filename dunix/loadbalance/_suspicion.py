"""Lifeguard suspicion timers: start long, shrink with independent confirmations.

A member suspected by one prober may only be slow (or the prober's own network may be
bad), so the first suspicion gets ``max_timeout``. Each other member that independently
fails to reach it confirms the suspicion; after ``k`` confirmations the timeout is down to
``min_timeout``, on a log scale in between, as in Lifeguard (Dadgar et al., 2018,
arXiv:1707.00788 §IV-B) and memberlist's suspicion.go.
"""

from __future__ import annotations

import math


def suspicion_timeouts(
    mult: float, max_mult: float, members: int, interval: float
) -> tuple[float, float]:
    """(min, max) suspicion timeout for a cluster of ``members`` live members.

    min = mult x max(1, log10(members + 1)) x interval: the floor of 1 keeps small
    clusters from declaring death after a single probe period.
    """
    scale = max(1.0, math.log10(members + 1))
    low = mult * scale * interval
    return low, low * max_mult


class Suspicion:
    """One running suspicion of one member at one incarnation."""

    __slots__ = ("confirmers", "deadline", "k", "max_timeout", "min_timeout", "start")

    def __init__(
        self, by: str, start: float, k: int, min_timeout: float, max_timeout: float
    ) -> None:
        self.start = start
        self.k = k
        self.min_timeout = min_timeout
        self.max_timeout = max(min_timeout, max_timeout)
        self.confirmers = {by}
        self.deadline = start + (self.min_timeout if k < 1 else self.max_timeout)

    def confirm(self, by: str) -> bool:
        """Count an independent suspicion from ``by``; True if it was new."""
        if self.k < 1 or by in self.confirmers or len(self.confirmers) > self.k:
            return False
        self.confirmers.add(by)
        n = len(self.confirmers) - 1
        frac = math.log(n + 1) / math.log(self.k + 1)
        timeout = self.max_timeout - frac * (self.max_timeout - self.min_timeout)
        self.deadline = self.start + max(self.min_timeout, timeout)
        return True
