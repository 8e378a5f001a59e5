"""Real agents over real loopback TLS in one trio run: join, list, death, leave, watch.

No namespaces or root needed: each agent listens on its own 127.0.0.x address. Waits are
bounded polls on behaviour, not timing assertions.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from dunix.agent.config import load_config
from dunix.agent.daemon import Agent
from dunix.client import Client
from dunix.errors import AccessDenied, PeerUnreachable
from dunix.wire import keygen

FAST = {"probe_interval": 0.2, "probe_timeout": 0.08, "pushpull_interval": 2.0}
_base = 27900  # set per test by the `tls` fixture: runs on one machine must not share ports


def _free_base() -> int:
    """A port base whose 127.0.0.N:base+N (N = 1..3) are free for TCP and UDP right now."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 60000)
        try:
            for n in (1, 2, 3):
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    with socket.socket(socket.AF_INET, kind) as s:
                        s.bind((f"127.0.0.{n}", base + n))
        except OSError:
            continue
        return base
    raise RuntimeError("no free loopback ports")


def addr(name: str) -> str:
    index = int(name[1:])
    return f"127.0.0.{index}:{_base + index}"


@dataclass
class Running:
    agent: Agent
    scope: trio.CancelScope


async def start(nursery: trio.Nursery, tmp: Path, name: str, seed: str | None) -> Running:
    config = load_config(
        None,
        {
            "name": name,
            "listen": addr(name),
            "join": [seed] if seed else None,
            "control": tmp / f"{name}.sock",
            "tls_dir": tmp / "tls",
            "sample_interval": 0.2,
            "membership": FAST,
        },
    )
    agent = Agent(config)
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await agent.run(handle_signals=False, task_status=task_status)

    await nursery.start(run)
    return Running(agent, scope)


async def until(pred: Callable[[], object], timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.05)


def states(agent: Agent) -> dict[str, str]:
    return {n.name: n.state for n in agent.nodes()}


@pytest.fixture
def tls(tmp_path: Path) -> Path:
    global _base
    _base = _free_base()
    keygen(tmp_path / "tls", nodes=["a1", "a2", "a3"], clients=["admin"])
    return tmp_path


def test_three_agents_join_list_and_see_a_death_and_a_leave(tls: Path) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            a1 = await start(nursery, tls, "a1", None)
            a2 = await start(nursery, tls, "a2", addr("a1"))
            a3 = await start(nursery, tls, "a3", addr("a2"))  # join via any member
            everyone = dict.fromkeys(["a1", "a2", "a3"], "alive")
            for r in (a1, a2, a3):
                await until(lambda r=r: states(r.agent) == everyone)

            async with await Client.connect(tls / "a1.sock") as client:
                nodes = await client.nodes()
                assert {n.name: n.state for n in nodes} == everyone
                await until(lambda: all(n.load.mem_free > 0 for n in a1.agent.membership.members()))
                info = await client.agent_info()
                assert info.name == "a1" and info.node_id == a1.agent.node_id

            # a remote admin client over mutual TLS sees the same
            address = addr("a2")
            async with await Client.connect(address=address, tls_dir=tls / "tls") as remote:
                assert {n.name for n in await remote.nodes()} == set(everyone)

            async with await Client.connect(tls / "a1.sock") as watcher:
                events = await watcher.watch()
                a3.scope.cancel()  # a crash: no leave message
                await until(lambda: states(a1.agent).get("a3") == "dead")
                await until(lambda: states(a2.agent).get("a3") == "dead")
                seen = []
                with trio.fail_after(5):
                    async for ev in events:
                        seen.append((ev.kind, ev.node.name))
                        if ev.kind == "dead":
                            break
                assert ("dead", "a3") in seen

            await a2.agent.leave()
            a2.scope.cancel()
            await until(lambda: states(a1.agent).get("a2") == "left")
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_restarted_agent_rejoins_with_higher_incarnation(tls: Path) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            a1 = await start(nursery, tls, "a1", None)
            a2 = await start(nursery, tls, "a2", addr("a1"))
            await until(lambda: states(a1.agent).get("a2") == "alive")
            before = a1.agent.membership.member("a2").incarnation
            a2.scope.cancel()
            await until(lambda: states(a1.agent).get("a2") == "dead")
            await trio.sleep(1.1)  # a new process: the incarnation comes from the clock
            a2 = await start(nursery, tls, "a2", addr("a1"))
            await until(lambda: states(a1.agent).get("a2") == "alive")
            assert a1.agent.membership.member("a2").incarnation > before
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_no_agent_is_a_clear_error(tmp_path: Path) -> None:
    async def main() -> None:
        with pytest.raises(PeerUnreachable):
            await Client.connect(tmp_path / "nothing.sock", timeout=1)

    trio.run(main)


def test_caller_rights() -> None:
    from dunix.agent.control import Caller

    Caller(0, "root").require_owner(1000)
    Caller(None, "client admin").require_owner(1000)
    Caller(1000, "uid 1000").require_owner(1000)
    with pytest.raises(AccessDenied):
        Caller(1001, "uid 1001").require_owner(1000)
