"""The agent's nursery for work done on behalf of one job or one peer.

A bug or an unexpected OS error in one remote exec, migration or relay must not end the
agent and with it every other job on the host (trio cancels a whole nursery when one task
raises). Tasks started here log their exception with its traceback and end alone; the
services that make up the agent (listeners, gossip) stay in the plain nursery, where a
failure is fatal and visible.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

log = logging.getLogger("dunix.agent")


class TaskGroup:
    """``start_soon`` and ``start`` of a trio nursery; ``start_soon`` tasks are guarded."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        #: exceptions logged so far (tests and ``dunix agent`` diagnostics read it)
        self.failures = 0

    @property
    def cancel_scope(self) -> trio.CancelScope:
        return self.nursery.cancel_scope

    def start_soon(
        self, fn: Callable[..., Awaitable[Any]], *args: Any, name: object = None
    ) -> None:
        label = name if name is not None else getattr(fn, "__qualname__", repr(fn))
        self.nursery.start_soon(functools.partial(self._guarded, label, fn, *args), name=label)

    async def start(
        self, fn: Callable[..., Awaitable[Any]], *args: Any, name: object = None
    ) -> Any:
        """Unguarded, as ``trio.Nursery.start``: a task that reports started is a service."""
        return await self.nursery.start(fn, *args, name=name)

    async def _guarded(self, label: object, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        try:
            await fn(*args)
        except Exception:
            self.failures += 1
            log.exception("task %s failed (the agent goes on)", label)
