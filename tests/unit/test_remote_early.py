"""The home sends a remote exec at the deputy's exec event, before its hello (agent/remote.py):
what happens when the hello comes, when it never comes, and when the exec cannot be sent."""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from dunix.agent import remote as remote_mod
from dunix.agent.jobs import Job
from dunix.agent.remote import HELLO_TIMEOUT, Deputy, RemoteService
from dunix.agent.tracer import WentRemote
from dunix.errors import DunixError
from dunix.wire.jobs import RemoteExited, RemoteSignal, RemoteStarted


class FakeLinks:
    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    async def send(self, peer: str, msg: Any) -> None:
        self.sent.append((peer, msg))

    async def send_many(self, peer: str, msgs: list[Any]) -> None:
        self.sent.extend((peer, msg) for msg in msgs)

    async def hub(self, peer: str) -> Any:
        return SimpleNamespace()


class FakeConn:
    """A deputy's connection: ``hello`` first, then nothing until it is hung up."""

    def __init__(self) -> None:
        self.told: list[tuple[Any, ...]] = []
        self._hello = True

    async def recv(self) -> list[str] | None:
        if self._hello:
            self._hello = False
            return ["hello", "3"]
        await trio.sleep_forever()
        return None

    async def send(self, *fields: Any) -> None:
        self.told.append(fields)


def service(nursery: trio.Nursery) -> tuple[RemoteService, FakeLinks]:
    jobs = SimpleNamespace(procs={}, jobs={}, gpid=lambda pid: 1000 + pid)
    agent = SimpleNamespace(config=SimpleNamespace(name="n1"), nursery=nursery, jobs=jobs)
    links = FakeLinks()
    return RemoteService(agent, links), links  # type: ignore[arg-type]


JOB = Job("n1-1-abc", 1000, 1000, (), "remote")
EVENT = WentRemote(10, "n2", "/bin/true")


@pytest.fixture
def exec_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    """The exec's preparation (which reads /proc) gives a stand-in RemoteExec."""

    async def prepare(self: RemoteService, deputy: Deputy) -> str:
        return "RemoteExec"

    monkeypatch.setattr(RemoteService, "_prepare", prepare)


def run_mocked(body: Callable[[], Awaitable[None]]) -> None:
    trio.run(body, clock=trio.testing.MockClock(autojump_threshold=0))


def test_the_exec_goes_before_the_hello_and_the_deputy_attaches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def prepare(self: RemoteService, deputy: Deputy) -> str:
        return f"RemoteExec of {deputy.proc.pid}"

    monkeypatch.setattr(RemoteService, "_prepare", prepare)

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            remote, links = service(nursery)
            remote.went_remote(JOB, EVENT)
            await trio.testing.wait_all_tasks_blocked()
            assert links.sent == [("n2", "RemoteExec of 10")]  # no hello yet
            deputy = remote.deputies[(JOB.id, 10)]
            remote.on_peer_message("n2", RemoteStarted(JOB.id, 10, 77))  # before the hello
            conn = FakeConn()
            nursery.start_soon(remote.serve_deputy, 10, conn)
            await trio.testing.wait_all_tasks_blocked()
            assert conn.told == [("ready",)] and deputy.attached.is_set()
            assert deputy.proc.state == "deputy" and deputy.proc.remote_pid == 77
            await trio.sleep(HELLO_TIMEOUT + 1)  # attached: its guest is left alone
            assert len(links.sent) == 1
            nursery.cancel_scope.cancel()

    run_mocked(body)


def test_a_deputy_that_never_connects_takes_its_guest_with_it(exec_sent: None) -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            remote, links = service(nursery)
            remote.went_remote(JOB, EVENT)
            await trio.sleep(HELLO_TIMEOUT + 1)
            assert links.sent[0] == ("n2", "RemoteExec")
            peer, kill = links.sent[1]
            assert peer == "n2" and kill == RemoteSignal(JOB.id, 10, signal.SIGKILL, True)
            assert remote.deputies == {} and remote.pending == {}

    run_mocked(body)


def test_an_exec_that_cannot_be_sent_runs_at_home_once_the_deputy_says_hello(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def prepare(self: RemoteService, deputy: Deputy) -> str:
        raise DunixError("holds something")

    monkeypatch.setattr(RemoteService, "_prepare", prepare)
    monkeypatch.setattr(remote_mod, "log", SimpleNamespace(warning=lambda *a: None))

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            remote, links = service(nursery)
            remote.went_remote(JOB, EVENT)
            await trio.testing.wait_all_tasks_blocked()
            conn = FakeConn()
            nursery.start_soon(remote.serve_deputy, 10, conn)
            await trio.testing.wait_all_tasks_blocked()
            assert links.sent == []
            assert conn.told == [("local", "/bin/true")]
            assert remote.deputies == {}
            nursery.cancel_scope.cancel()

    run_mocked(body)


def test_a_guest_that_stops_before_its_deputy_is_ready_stops_the_deputy_after(
    exec_sent: None,
) -> None:
    """`kill -STOP $$` as the program's first act: the stop comes before the hello."""
    from dunix.wire.jobs import RemoteStopped

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            remote, _ = service(nursery)
            remote.went_remote(JOB, EVENT)
            await trio.testing.wait_all_tasks_blocked()
            remote.on_peer_message("n2", RemoteStarted(JOB.id, 10, 77))
            remote.on_peer_message("n2", RemoteStopped(JOB.id, 10, signal.SIGSTOP))
            conn = FakeConn()
            nursery.start_soon(remote.serve_deputy, 10, conn)
            await trio.testing.wait_all_tasks_blocked()
            assert conn.told == [("ready",), ("stop", signal.SIGSTOP)]
            assert remote.deputies[(JOB.id, 10)].mirrored_stop  # not echoed back to n2
            nursery.cancel_scope.cancel()

    run_mocked(body)


def test_a_deputy_that_ends_before_it_connects_takes_its_guest_with_it_at_once(
    exec_sent: None,
) -> None:
    """A Ctrl-C in the moment after the exec: the deputy dies by it; its guest goes too."""

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            remote, links = service(nursery)
            remote.went_remote(JOB, EVENT)
            await trio.testing.wait_all_tasks_blocked()
            remote.exited(10)  # the tracer saw it end
            await trio.testing.wait_all_tasks_blocked()
            assert trio.current_time() < HELLO_TIMEOUT  # no waiting for a hello
            assert links.sent[1] == ("n2", RemoteSignal(JOB.id, 10, signal.SIGKILL, True))
            assert remote.deputies == {} and remote.pending == {}

    run_mocked(body)


def test_a_guest_that_ended_before_its_deputy_was_ready_ends_it_without_ready(
    exec_sent: None,
) -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            remote, _links = service(nursery)
            remote.went_remote(JOB, EVENT)
            await trio.testing.wait_all_tasks_blocked()
            remote.on_peer_message("n2", RemoteStarted(JOB.id, 10, 77))  # one write:
            remote.on_peer_message("n2", RemoteExited(JOB.id, 10, 3 << 8))  # start, exit
            conn = FakeConn()
            nursery.start_soon(remote.serve_deputy, 10, conn)
            await trio.testing.wait_all_tasks_blocked()
            assert conn.told == [("exit", 3)]  # no `ready`: it obeys exit before it
            assert remote.deputies == {}
            nursery.cancel_scope.cancel()

    run_mocked(body)
