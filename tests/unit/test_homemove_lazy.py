"""The end of a post-copy move from home (agent/homemove.py ``_pages_served``): the home
copy becomes a deputy only once its criu served the last page; a transfer that broke off
lost the process, which its job and ps see as killed by SIGKILL."""

from __future__ import annotations

import signal
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from dunix.agent.homemove import HomeMoves
from dunix.agent.remote import Deputy
from dunix.agent.tracer import Exited
from dunix.errors import MigrationFailed
from dunix.migrate.driver import PageTransfer


class FakeAgent:
    def __init__(self) -> None:
        self.config = SimpleNamespace(name="n1")
        self.remote = SimpleNamespace(deputies={}, on_migrated=None)
        self.sent: list[tuple[str, Any]] = []
        self.events: list[Any] = []
        agent = self

        class Links:
            async def send(self, peer: str, msg: Any) -> None:
                agent.sent.append((peer, msg))

        class Jobs:
            def _on_event(self, job: Any, tracer: Any, event: Any, argv0: str) -> None:
                agent.events.append(event)

        self.job_links = Links()
        self.jobs = Jobs()


def setup() -> tuple[FakeAgent, HomeMoves, Deputy, Any]:
    agent = FakeAgent()
    moves = HomeMoves(SimpleNamespace(agent=agent))  # type: ignore[arg-type]
    proc = SimpleNamespace(pid=4100, job="n1-1-abc", state="running")
    deputy = Deputy(SimpleNamespace(), proc, "n2", "holder")  # type: ignore[arg-type]
    agent.remote.deputies[(proc.job, proc.pid)] = deputy
    moves.expected[proc.pid] = deputy
    return agent, moves, deputy, proc


def served(moves: HomeMoves, deputy: Deputy, proc: Any, transfer: PageTransfer) -> float:
    async def main() -> float | MigrationFailed:
        async def end() -> None:
            await trio.sleep(0.01)  # the deputize waits for the transfer's end
            transfer.done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(end)
            try:
                return await moves._pages_served(proc, None, None, deputy, transfer)  # type: ignore[arg-type]
            except MigrationFailed as exc:
                return exc

    got = trio.run(main)
    if isinstance(got, MigrationFailed):
        raise got
    return got


def test_the_home_copy_waits_for_the_last_page() -> None:
    agent, moves, deputy, proc = setup()
    transfer = PageTransfer(seconds=0.8)
    assert served(moves, deputy, proc, transfer) == 0.8
    assert proc.state == "running" and moves.expected[proc.pid] is deputy
    assert not agent.sent and not agent.events


def test_a_broken_transfer_loses_the_process() -> None:
    agent, moves, deputy, proc = setup()
    transfer = PageTransfer(error="criu dump of pid 4100 failed: Connection reset\n(from dump.log)")
    with pytest.raises(MigrationFailed, match="was lost: its home's page server broke off"):
        served(moves, deputy, proc, transfer)
    assert proc.state.startswith("lost: ") and "Connection reset" in proc.state
    assert not agent.remote.deputies and proc.pid not in moves.expected
    [(peer, kill)] = agent.sent  # the copy there misses pages: killed
    assert peer == "n2" and kill.signal == signal.SIGKILL and kill.home_pid == proc.pid
    # the tracer let it go and reports no exit: the job hears of it as killed
    assert agent.events == [Exited(proc.pid, signal.SIGKILL)]
