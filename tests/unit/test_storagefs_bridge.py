"""The storagefs thread's calls into the agent's loop (dunix/agent/storage.py ``_Bridge``):
two trio loops in two threads, as in the agent."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from dunix.agent.storage import _Bridge
from dunix.errors import PeerUnreachable


class AgentLoop:
    """A trio loop in a thread, like the agent's; ``block`` stalls it in a system call."""

    def __init__(self) -> None:
        self.token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=lambda: trio.run(self._main), daemon=True)
        self.thread.start()
        self._ready.wait(5)

    async def _main(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self._ready.set()
        await trio.to_thread.run_sync(self._stop.wait)

    def block(self, seconds: float) -> None:
        assert self.token is not None
        self.token.run_sync_soon(time.sleep, seconds)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5)


class Files:
    timeout = 0.3


@pytest.fixture
def agent() -> Iterator[AgentLoop]:
    loop = AgentLoop()
    yield loop
    loop.stop()


def bridge(agent: AgentLoop) -> _Bridge:
    assert agent.token is not None
    return _Bridge(agent.token, None, Files())  # type: ignore[arg-type]


def test_value_and_error_come_back(agent: AgentLoop) -> None:
    b = bridge(agent)
    seen: list[Any] = []

    async def on_agent_loop() -> int:
        seen.append(trio.lowlevel.current_trio_token() is agent.token)
        await trio.sleep(0)
        return 42

    async def fails() -> None:
        raise FileNotFoundError(2, "gone")

    async def main() -> None:
        assert await b._in_agent(on_agent_loop) == 42
        with pytest.raises(FileNotFoundError):
            await b._in_agent(fails)

    trio.run(main)
    assert seen == [True]


@pytest.mark.parametrize("how", ["blocked", "ended"])
def test_agent_loop_blocked_or_ended_is_unreachable_not_a_hang(agent: AgentLoop, how: str) -> None:
    b = bridge(agent)  # timeout: 0.3 + 1 s
    if how == "blocked":
        agent.block(2.0)
    else:
        agent.stop()

    async def noop() -> None:
        pass

    async def main() -> None:
        with pytest.raises(PeerUnreachable):
            await b._in_agent(noop)

    trio.run(main)
