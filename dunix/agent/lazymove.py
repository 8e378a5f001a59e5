"""Post-copy moves in the agent: the source's and the target's parts of a lazy move.

``agent/migration.py`` runs every move; for a guest whose resident memory is large
enough (``lazy.LAZY_MIN_RSS``) on hosts where lazy pages work, it asks this module:

* the **source** (:func:`source_plan`) makes a one-move key and picks a port; both go to
  the target inside ``MigratePrepare.lazy`` over the agents' mutual-TLS link, and
  ``driver.move_lazy`` runs the dump, whose page server outlives the move's answer
  (:func:`after_transfer` cleans up once every page was served);
* the **target** (:func:`start_daemon`) starts ``criu lazy-pages`` towards the source's
  address (from membership, so the pages go between the hosts' addresses) before its
  lazy restore, and :func:`watch` waits for it: a daemon that ends with an error left
  the process without some of its pages, so the process is lost and is killed here;
  its home then reports it killed by SIGKILL, as for a dead host.

A post-copy attempt that fails before the commit leaves the process running at the
source; the caller then tries once more with a plain dump (e.g. a target without
userfaultfd).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import trio

from dunix.errors import DunixError, MigrationFailed
from dunix.migrate import driver, lazy
from dunix.wire.migrate import MigrateLazy, MigratePrepare

log = logging.getLogger("dunix.agent.lazymove")

#: ``DUNIX_MIGRATE_LAZY=never|always`` in the agent's environment overrides the size rule
ENV = "DUNIX_MIGRATE_LAZY"


def resident_bytes(pid: int) -> int:
    """``pid``'s resident memory as `dunix ps` and the balancer read it (psutil); 0 when gone."""
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except (psutil.Error, ValueError):  # ValueError: not a pid at all
        return 0


def wanted(pid: int) -> bool:
    """Post-copy for this process? Large enough, and this host can serve lazy pages."""
    choice = os.environ.get(ENV, "")
    if choice == "never":
        return False
    reason = lazy.unusable_reason()
    if reason is not None:
        log.info("plain dump for pid %d: %s", pid, reason)
        return False
    return choice == "always" or resident_bytes(pid) >= lazy.LAZY_MIN_RSS


@dataclass
class SourcePlan:
    """The source's half of one lazy move: the key folder criu reads, and the plan."""

    folder: Path
    dir_fd: int
    plan: driver.LazyPlan
    wire: MigrateLazy

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.dir_fd)
        shutil.rmtree(self.folder, ignore_errors=True)


def source_plan(root: Path, move: str) -> SourcePlan:
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"keys-{move}-", dir=root))
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    keys = lazy.make_keys()
    lazy.write_keys(keys, dir_fd)
    port = lazy.free_port()
    plan = driver.LazyPlan(port, lazy.tls_files(dir_fd))
    return SourcePlan(folder, dir_fd, plan, MigrateLazy(port, keys.cert_pem, keys.key_pem))


async def after_transfer(
    report: driver.MoveReport,
    plan: SourcePlan,
    cleanup: Callable[[], None],
    serving: dict[int, trio.Event],
) -> None:
    """Once the source's criu served every page (or broke off): log and clean up; the
    pid leaves ``serving`` once its copy here is gone (see :func:`wait_served`)."""
    transfer = report.transfer
    try:
        if transfer is not None:
            await transfer.done.wait()
            if transfer.error:
                log.warning("post-copy of pid %d broke off: %s", report.pid, transfer.error)
            else:
                log.info("post-copy of pid %d: every page served %.0f ms after the start",
                         report.pid, (transfer.seconds or 0.0) * 1000)  # fmt: skip
            with trio.move_on_after(5.0):
                while Path(f"/proc/{report.pid}").exists():  # killed; its parent reaps it
                    await trio.sleep(0.01)
    finally:
        plan.close()
        cleanup()
        if transfer is not None and serving.get(report.pid) is transfer.done:
            del serving[report.pid]


async def wait_served(serving: dict[int, trio.Event], pid: int, timeout: float) -> None:
    """Wait until a post-copy source copy of ``pid`` here is gone (its criu served the
    last page and killed it), so the pid is free for the process to come back."""
    done = serving.get(pid)
    if done is None:
        return
    with trio.move_on_after(timeout):
        while serving.get(pid) is done:  # after_transfer drops it once the copy is gone
            await trio.sleep(0.01)


@dataclass
class TargetDaemon:
    daemon: lazy.LazyDaemon
    folder: Path
    dir_fd: int

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.dir_fd)
        shutil.rmtree(self.folder, ignore_errors=True)


async def start_daemon(
    prep: MigratePrepare, address: str, images_dir_fd: int, root: Path
) -> TargetDaemon:
    """The lazy-pages daemon for ``prep``'s restore, fetching from ``address`` (the
    source's host address). Its keys live in their own folder: the daemon reads them
    when it connects, after the restore (and the images folder) may be gone."""
    assert prep.lazy is not None
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"keys-{prep.move}-", dir=root))
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        lazy.write_keys(lazy.PageServerKeys(prep.lazy.cert, prep.lazy.key), dir_fd)
        daemon = await lazy.LazyDaemon.start(
            images_dir_fd, address, prep.lazy.port, lazy.tls_files(dir_fd)
        )
    except BaseException:
        os.close(dir_fd)
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return TargetDaemon(daemon, folder, dir_fd)


async def watch(target: TargetDaemon, pid: int, lost: Callable[[str], Awaitable[None]]) -> None:
    """Wait for the daemon; if it failed, the process misses pages: kill it (SIGKILL,
    what its parent will see) after ``lost(reason)`` told its home."""
    try:
        code = await target.daemon.wait()
        if code == 0:
            return
        why = str(target.daemon.failure(f"exit {code}")).splitlines()
        reason = "its pages stopped arriving from the source during post-copy: " + (
            why[-1] if len(why) > 1 else why[0]
        )
        log.warning("pid %d is lost: %s", pid, reason)
        with contextlib.suppress(DunixError):
            await lost(reason)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    finally:
        target.close()


def is_lazy_failure(exc: MigrationFailed) -> bool:
    """A failure a plain dump may not have: worth one more try without post-copy."""
    text = str(exc)
    return any(word in text for word in ("lazy", "uffd", "userfault", "page server"))
