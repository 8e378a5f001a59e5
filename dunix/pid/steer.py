"""Keeps a host's pid allocation inside its node's range (see ``gpid``'s docstring).

The kernel hands out the next free pid after a per-namespace cursor, ``ns_last_pid``
(kernel/pid.c, ``alloc_pid``: ``idr_alloc_cyclic``), and wraps to 300 at ``pid_max``. So
pointing the cursor at the start of the range once keeps every later fork in the range
(the kernel itself skips pids in use) until the cursor runs past the range's end; the
tracer reports every fork of a job, and a child that landed outside the range puts the
cursor back. That costs one out-of-range pid per lap of the range and no work per fork,
where steering each fork (writing the cursor before it) would need a tracer stop per fork.

Other processes of the host (the agent's own children, a login shell on a real host) take
pids from the same cursor: harmless, they just use up part of the lap. A host whose
``pid_max`` is below the range (a real host with the default 32768) refuses the write:
the steering then turns itself off with one log line; ``dunix migrate`` still refuses a
pid that is busy on the target.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dunix.pid.gpid import PidRange

log = logging.getLogger("dunix.pid")

NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")


class PidSteer:
    """Puts this PID namespace's cursor back into a node's range when a fork left it."""

    def __init__(self, cursor: Path = NS_LAST_PID) -> None:
        self.cursor = cursor
        #: why steering is off (a refused write), or None while it works
        self.off: str | None = None

    def needs_aim(self, node_id: int, pid: int) -> bool:
        """Whether the next fork after ``pid`` would leave ``node_id``'s range."""
        span = PidRange.for_node(node_id)
        return not (span.first <= pid < span.end - 1)

    def forked(self, node_id: int, pid: int) -> None:
        """A job process got ``pid``: re-aim the cursor if the next one would stray."""
        if self.off is None and self.needs_aim(node_id, pid):
            self.aim(node_id)

    def aim(self, node_id: int) -> None:
        """Make the next fork in this namespace get the first free pid of the range."""
        if self.off is not None:
            return
        first = PidRange.for_node(node_id).first
        try:
            self.cursor.write_text(str(first - 1))
        except OSError as e:
            self.off = f"cannot set {self.cursor} to {first - 1}: {e.strerror or e}"
            log.warning("per-node pid ranges off: %s (pid_max too low?)", self.off)
        else:
            log.debug("pid cursor set to %d (node %d's range)", first - 1, node_id)
