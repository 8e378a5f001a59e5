"""MigrationService.peer_gone: when a move stops waiting for a peer that cannot answer."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import trio

from dunix.agent.migration import MigrationService
from dunix.errors import NoSuchNode
from dunix.loadbalance import MemberState


@dataclass
class _Member:
    state: MemberState
    address: str


class _Membership:
    def __init__(self, members: dict[str, _Member]) -> None:
        self.members = members

    def member(self, name: str) -> _Member:
        if name not in self.members:
            raise NoSuchNode(name)
        return self.members[name]


def _service(members: dict[str, _Member]) -> MigrationService:
    agent: Any = SimpleNamespace(config=SimpleNamespace(name="n1"), membership=_Membership(members))
    return MigrationService(agent)


def test_dead_left_unknown_and_refusing_suspects_are_gone() -> None:
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: a connect is refused
    try:
        slow, crashed = listening.getsockname()[1], closed.getsockname()[1]
        members = {
            "alive": _Member(MemberState.ALIVE, "127.0.0.1:1"),
            "dead": _Member(MemberState.DEAD, "127.0.0.1:1"),
            "left": _Member(MemberState.LEFT, "127.0.0.1:1"),
            "slow": _Member(MemberState.SUSPECT, f"127.0.0.1:{slow}"),
            "crashed": _Member(MemberState.SUSPECT, f"127.0.0.1:{crashed}"),
        }
        service = _service(members)

        async def main() -> dict[str, str]:
            names = [*members, "n1", "unknown"]
            return {name: await service.peer_gone(name) for name in names}

        found = trio.run(main)
    finally:
        listening.close()
        closed.close()
    assert found["alive"] == found["slow"] == found["n1"] == ""
    assert found["dead"] == "membership: dead" and found["left"] == "membership: left"
    assert found["unknown"] == "not a member"
    assert found["crashed"].startswith("suspect, and its agent refused a connection")
