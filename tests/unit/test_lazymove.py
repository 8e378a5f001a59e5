"""The agent's post-copy parts: when a move goes lazy, and what a failed daemon means."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import trio

from dunix.agent import lazymove
from dunix.errors import MigrationFailed
from dunix.migrate import lazy


def test_the_size_rule_and_its_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lazy, "unusable_reason", lambda: None)
    small = os.getpid()
    monkeypatch.setattr(lazymove, "resident_bytes", lambda pid: 8 << 20)
    assert not lazymove.wanted(small)
    monkeypatch.setattr(lazymove, "resident_bytes", lambda pid: lazy.LAZY_MIN_RSS)
    assert lazymove.wanted(small)
    monkeypatch.setenv(lazymove.ENV, "never")
    assert not lazymove.wanted(small)
    monkeypatch.setenv(lazymove.ENV, "always")
    monkeypatch.setattr(lazymove, "resident_bytes", lambda pid: 0)
    assert lazymove.wanted(small)
    monkeypatch.setattr(lazy, "unusable_reason", lambda: "no userfaultfd")
    assert not lazymove.wanted(small)  # a host that cannot serve lazy pages never tries


def test_resident_bytes_reads_status() -> None:
    assert lazymove.resident_bytes(os.getpid()) > 0
    assert lazymove.resident_bytes(-1) == 0


def test_lazy_failures_are_told_apart() -> None:
    assert lazymove.is_lazy_failure(MigrationFailed("n3: criu lazy-pages failed: exit 1"))
    assert lazymove.is_lazy_failure(MigrationFailed("restore: uffd: Failed to register"))
    assert not lazymove.is_lazy_failure(MigrationFailed("n3: pid 77 is in use on n3"))


def test_source_plan_keys_reach_the_wire(tmp_path: Path) -> None:
    plan = lazymove.source_plan(tmp_path, "m-1")
    try:
        assert plan.wire.port == plan.plan.port > 0
        assert plan.plan.tls is not None
        assert Path(plan.plan.tls.cert).read_bytes() == plan.wire.cert
    finally:
        plan.close()
    assert not plan.folder.exists()


@pytest.mark.parametrize("code", [0, 1])
def test_a_failed_daemon_loses_the_process(tmp_path: Path, code: int) -> None:
    victim = subprocess.Popen(["sleep", "30"])
    told: list[str] = []

    async def lost(reason: str) -> None:
        told.append(reason)

    async def main() -> None:
        images = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        proc = await trio.lowlevel.open_process(["sh", "-c", f"exit {code}"])
        daemon = lazy.LazyDaemon(proc, images, "lazy-pages.log")
        folder = tmp_path / "keys"
        folder.mkdir()
        keys = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            await lazymove.watch(lazymove.TargetDaemon(daemon, folder, keys), victim.pid, lost)
        finally:
            os.close(images)
        assert not folder.exists()  # the keys go with the daemon

    try:
        trio.run(main)
        if code:
            assert victim.wait(timeout=5) == -9 and "post-copy" in told[0]
        else:
            assert victim.poll() is None and not told
    finally:
        victim.kill()
        victim.wait()
