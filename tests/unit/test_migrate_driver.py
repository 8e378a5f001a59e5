"""The migration driver: the table's actions carried out against a fake criu and target."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pycriu  # noqa: F401  (make setup builds it: a missing one fails)
import pytest
import trio

from dunix.errors import MigrationFailed
from dunix.migrate import driver, swrk
from dunix.migrate.lifecycle import State
from tests.unit.test_migrate_swrk import FAKE


class FakeTarget:
    def __init__(self, fail: str = "", hang: str = "") -> None:
        self.fail = fail
        self.hang = hang
        self.calls: list[str] = []

    async def _step(self, name: str) -> None:
        self.calls.append(name)
        if name == self.hang:
            await trio.sleep_forever()
        if name == self.fail:
            raise MigrationFailed(f"{name} refused")

    async def prepare(self, pid: int) -> None:
        await self._step("prepare")

    async def send(self, images_dir_fd: int) -> None:
        await self._step("send")

    async def restore(self, images_dir_fd: int) -> int:
        await self._step("restore")
        return 4321

    async def abort(self, pid: int) -> None:
        self.calls.append("abort")


@pytest.fixture
def setup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[swrk.CriuCommand, int]]:
    script = tmp_path / "criu"
    script.write_text(f"#!{sys.executable}\n{FAKE}")
    script.chmod(0o755)
    monkeypatch.setenv("FAKE_CRIU", "dump")
    (tmp_path / "images").mkdir()
    fd = os.open(tmp_path / "images", os.O_RDONLY | os.O_DIRECTORY)
    yield swrk.CriuCommand(str(script)), fd
    os.close(fd)


def move(setup: tuple[swrk.CriuCommand, int], target: FakeTarget) -> driver.MoveReport:
    command, fd = setup
    return trio.run(lambda: driver.move(77, fd, target, source=command, phase_timeout=0.5))


def test_a_move_runs_every_step_and_commits(setup: tuple[swrk.CriuCommand, int]) -> None:
    target = FakeTarget()
    report = move(setup, target)
    assert target.calls == ["prepare", "send", "restore"]
    assert report.restored_pid == 4321 and report.history[-1][2] is State.RUNNING_THERE
    assert 0 <= report.dump_seconds <= report.total_seconds
    assert 0 <= report.freeze_seconds <= report.dump_seconds
    assert 0 <= report.downtime_seconds <= report.total_seconds


@pytest.mark.parametrize(
    ("fail", "calls"),
    [
        ("prepare", ["prepare"]),
        ("send", ["prepare", "send", "abort"]),
        ("restore", ["prepare", "send", "restore", "abort"]),
    ],
)
def test_a_failed_step_resumes_the_source(
    setup: tuple[swrk.CriuCommand, int], fail: str, calls: list[str]
) -> None:
    target = FakeTarget(fail=fail)
    with pytest.raises(MigrationFailed, match=f"still running where it was: {fail} refused"):
        move(setup, target)
    assert target.calls == calls


def test_a_hung_restore_times_out_and_aborts(setup: tuple[swrk.CriuCommand, int]) -> None:
    target = FakeTarget(hang="restore")
    with pytest.raises(MigrationFailed, match="start_restore took over"):
        move(setup, target)
    assert target.calls == ["prepare", "send", "restore", "abort"]
