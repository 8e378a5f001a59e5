"""What the home and a guest's host do when membership says a peer died (agent/remote.py)."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import trio
import trio.testing

from dunix.agent.jobs import TRACERS_FOLDER, Job, JobService, Proc, start_time
from dunix.agent.remote import Deputy, Guest, RemoteService
from dunix.wire.jobs import RemoteSignal


class FakeLinks:
    def __init__(self) -> None:
        self.forgotten: list[str] = []
        self.sent: list[tuple[str, Any]] = []

    def forget(self, peer: str) -> None:
        self.forgotten.append(peer)

    async def send(self, peer: str, msg: Any) -> None:
        self.sent.append((peer, msg))


def service(nursery: trio.Nursery) -> tuple[RemoteService, FakeLinks, list[Job]]:
    killed: list[Job] = []
    jobs = SimpleNamespace(jobs={}, kill_job=killed.append)
    agent = SimpleNamespace(config=SimpleNamespace(name="n1"), nursery=nursery, jobs=jobs)
    links = FakeLinks()
    return RemoteService(agent, links), links, killed  # type: ignore[arg-type]


def deputy(pid: int, peer: str, *, started: bool = True) -> Deputy:
    job = Job("n1-1-abc", 1000, 1000, (), "auto")
    proc = Proc(pid, job.id, 1000, "n1", pid, state="deputy", node=peer)
    dep = Deputy(job, proc, peer, "/bin/sleep")
    if started:
        dep.started.set()
    return dep


def test_a_host_that_dies_takes_its_guests_and_their_deputies_end_killed() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            remote, links, _ = service(nursery)
            there, elsewhere = deputy(10, "n2"), deputy(11, "n3")
            starting = deputy(12, "n2", started=False)
            for d in (there, elsewhere, starting):
                remote.deputies[(d.proc.job, d.proc.pid)] = d
            remote.member_changed("suspect", "n2")
            assert not there.exited.is_set()
            remote.member_changed("dead", "n2")
            assert links.forgotten == ["n2"]
            assert there.exited.is_set() and there.status == signal.SIGKILL
            assert there.proc.state == "lost: host n2 died"
            assert starting.started.is_set() and starting.lost  # never run at home too
            assert not elsewhere.exited.is_set() and not elsewhere.lost
            # n2 was only cut off and is back: what it may still run of ours is killed
            remote.member_changed("alive", "n2")
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(m.home_pid for _, m in links.sent) == [10, 12]
            assert all(p == "n2" and isinstance(m, RemoteSignal) and m.group
                       and m.signal == signal.SIGKILL for p, m in links.sent)  # fmt: skip
            remote.member_changed("alive", "n2")  # once only
            await trio.testing.wait_all_tasks_blocked()
            assert len(links.sent) == 2

    trio.run(body)


def test_a_deputy_moving_away_from_a_dead_host_ends_once_the_move_failed() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            remote, _, _ = service(nursery)
            moving = deputy(20, "n2")
            moving.moving = True
            remote.deputies[(moving.proc.job, 20)] = moving
            remote.member_changed("left", "n2")
            assert moving.held_exit == signal.SIGKILL and not moving.exited.is_set()
            assert moving.proc.state == "lost: host n2 left"

    trio.run(body)


def test_guests_whose_home_died_are_killed_and_send_nothing() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            remote, _, killed = service(nursery)
            job = Job("n2-1-abc/30", 1000, 1000, (), "auto", guest=("n2", "n2-1-abc", 30))
            remote.agent.jobs.jobs[job.id] = job
            orphan = Guest("n2-1-abc", "n2", 30)
            other = Guest("n3-1-abc", "n3", 31)
            remote.guests[("n2-1-abc", 30)] = orphan
            remote.guests[("n3-1-abc", 31)] = other
            remote.member_changed("dead", "n2")
            assert orphan.orphaned and not other.orphaned
            assert killed == [job]

    trio.run(body)


def test_a_restarted_agent_kills_the_tracers_the_dead_one_left(tmp_path: Path) -> None:
    """Marks are (pid, start time): a live process named by one is killed, a pid that now
    names another process (a different start time) is left alone, and marks go."""
    agent = SimpleNamespace(config=SimpleNamespace(control=tmp_path / "control.sock"))
    jobs = JobService.__new__(JobService)
    jobs.agent = agent  # type: ignore[assignment]
    left = subprocess.Popen(["sleep", "60"])
    reused = subprocess.Popen(["sleep", "60"])
    try:
        assert jobs._mark(left.pid) is not None
        start = start_time(reused.pid)
        assert start is not None
        (tmp_path / TRACERS_FOLDER / f"{reused.pid}-{start + 1}").touch()
        assert jobs.sweep_leftovers() == 1
        assert left.wait(timeout=5) == -signal.SIGKILL
        assert reused.poll() is None
        assert not list((tmp_path / TRACERS_FOLDER).iterdir())
    finally:
        for p in (left, reused):
            p.kill()
            p.wait()
