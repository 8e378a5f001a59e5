"""Live migration groundwork on a real 2-host simulated cluster (root): a counter process
is dumped inside n1 by the swrk driver and restored inside n2, with the source killed only
after the restore succeeded; and a refused move leaves it running in n1 with nothing lost.

No agents run (each host runs ``sleep``), so nothing else touches the processes. The
counter appends 1, 2, 3, ... to a file under /var/tmp (a folder all hosts share); a move
that lost or repeated work would show as a gap or a repeated number in that file.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.e2e.conftest import exclusive_cluster, require_root, wait_for

pytestmark = pytest.mark.e2e

WORK = Path("/var/tmp/dunix-e2e-migrate")

COUNTER = textwrap.dedent(
    """\
    import os, sys, time
    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    i = 0
    while True:
        i += 1
        os.write(fd, b"%d\\n" % i)
        time.sleep(0.01)
    """
)

# Runs inside a host: makes the counter get pid WANT there (ns_last_pid is per PID
# namespace), detached in its own session with stdio on /dev/null, and prints its pid.
LAUNCH = textwrap.dedent(
    """\
    import subprocess, sys
    want, path, counter = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(want - 1))
    child = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", counter, path],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    print(child.pid)
    """
)


@pytest.fixture(scope="module")
def hosts() -> Iterator[list[Any]]:
    require_root()
    from dunix import cluster

    with exclusive_cluster():
        cluster.down()
        try:
            yield cluster.up(2, None, agent_argv=lambda h: ["sleep", "100000"])
        finally:
            cluster.down()


@pytest.fixture
def work() -> Iterator[Path]:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    yield WORK
    shutil.rmtree(WORK, ignore_errors=True)


def host_proc(host: Any) -> Path:
    """The host's procfs, seen from the machine through its PID 1's root."""
    return Path(f"/proc/{host.init_pid}/root/proc")


def free_pid(*hosts: Any) -> int:
    for _ in range(100):
        pid = random.randrange(20000, 30000)
        if not any((host_proc(h) / str(p)).exists() for h in hosts for p in (pid - 1, pid)):
            return pid
    raise AssertionError("no free pid found")


def start_counter(host: Any, out: Path, *others: Any) -> int:
    """The counter in ``host``, at a pid that is free there and in ``others``."""
    from dunix import cluster

    want = free_pid(host, *others)
    done = cluster.run_in(
        host.name,
        [sys.executable, "-I", "-S", "-c", LAUNCH, str(want), str(out), COUNTER],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout)
    assert pid == want, f"counter got pid {pid}, not {want} (something else forked in)"
    wait_for(lambda: count(out) >= 5, 5, "the counter to start")
    return pid


def numbers(path: Path) -> list[int]:
    text = path.read_text()
    return [int(x) for x in text.splitlines()[: text.count("\n")]]


def count(path: Path) -> int:
    try:
        return len(numbers(path))
    except FileNotFoundError:
        return 0


def assert_exact_sequence(path: Path) -> list[int]:
    got = numbers(path)
    assert got == list(range(1, len(got) + 1)), "a number was lost or repeated"
    return got


def running_counter(proc: Path, pid: int) -> bool:
    try:
        state = (proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = (proc / str(pid) / "cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):  # gone, or going (ESRCH mid-read)
        return False
    return state not in ("Z", "X") and b"os.write" in cmdline


def kill_in(proc: Path, pid: int) -> None:
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        fd = os.open(proc / str(pid), os.O_RDONLY | os.O_DIRECTORY)
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        finally:
            os.close(fd)


@contextlib.contextmanager
def images(work: Path) -> Iterator[int]:
    folder = work / "images"
    folder.mkdir()
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


def test_counter_moves_from_n1_to_n2(hosts: list[Any], work: Path) -> None:
    from dunix.migrate import driver, swrk

    n1, n2 = hosts
    out = work / "count"
    pid = start_counter(n1, out, n2)
    assert not (host_proc(n2) / str(pid)).exists()
    try:
        with images(work) as fd:
            report = trio.run(
                lambda: driver.move(
                    pid,
                    fd,
                    driver.HostTarget.simulated(n2.init_pid, cgroups=n2.cgroup),
                    source=swrk.CriuCommand.in_host(n1.init_pid, cgroups=n1.cgroup),
                )
            )
        print(
            f"\nmigrate n1->n2: frozen after {report.freeze_seconds * 1000:.0f} ms, "
            f"dump {report.dump_seconds * 1000:.0f} ms, "
            f"restore {report.restore_seconds * 1000:.0f} ms, "
            f"downtime {report.downtime_seconds * 1000:.0f} ms, "
            f"total {report.total_seconds * 1000:.0f} ms"
        )
        assert report.restored_pid == pid, "a restored process keeps its pid"
        assert running_counter(host_proc(n2), pid), "not running in n2"
        cgroups = (host_proc(n2) / str(pid) / "cgroup").read_text()
        for path in n2.cgroup:  # accounted to n2, not to the cgroup it had in n1
            assert f":/{path.parent.name}/{path.name}\n" in cgroups, cgroups
        wait_for(lambda: not running_counter(host_proc(n1), pid), 5, "the source to die")
        before = count(out)
        wait_for(lambda: count(out) >= before + 20, 5, "the counter to go on in n2")
        assert running_counter(host_proc(n2), pid)
    finally:
        kill_in(host_proc(n2), pid)
        kill_in(host_proc(n1), pid)
    wait_for(lambda: not running_counter(host_proc(n2), pid), 5, "the counter to die")
    time.sleep(0.05)  # a write in flight at the kill has landed
    assert len(assert_exact_sequence(out)) >= before + 20


def test_failed_restore_leaves_the_source_running(hosts: list[Any], work: Path) -> None:
    from dunix.errors import MigrationFailed
    from dunix.migrate import driver, swrk

    n1, n2 = hosts
    out = work / "count"
    pid = start_counter(n1, out, n2)
    target = driver.HostTarget.simulated(n2.init_pid)
    target.fail_post_restore = True  # the target's CRIU kills what it restored
    try:
        with images(work) as fd, pytest.raises(MigrationFailed, match="still running where"):
            trio.run(
                lambda: driver.move(pid, fd, target, source=swrk.CriuCommand.in_host(n1.init_pid))
            )
        assert running_counter(host_proc(n1), pid), "the source must run on"
        assert not running_counter(host_proc(n2), pid), "the failed restore left a copy"
        before = count(out)
        wait_for(lambda: count(out) >= before + 20, 5, "the counter to go on in n1")
    finally:
        kill_in(host_proc(n1), pid)
        kill_in(host_proc(n2), pid)
    wait_for(lambda: not running_counter(host_proc(n1), pid), 5, "the counter to die")
    time.sleep(0.05)
    assert_exact_sequence(out)


def test_refused_post_dump_resumes_the_source(hosts: list[Any], work: Path) -> None:
    from dunix.migrate import swrk

    n1, _ = hosts
    out = work / "count"
    pid = start_counter(n1, out)

    async def refuse(note: swrk.Notification) -> bool:
        return note.script != "post-dump"

    try:
        with images(work) as fd:
            result = trio.run(
                lambda: swrk.dump(
                    pid, fd, notify=refuse, command=swrk.CriuCommand.in_host(n1.init_pid)
                )
            )
        assert result.resumed and "post-dump" in result.notifications
        before = count(out)
        wait_for(lambda: count(out) >= before + 20, 5, "the counter to go on in n1")
        assert running_counter(host_proc(n1), pid)
    finally:
        kill_in(host_proc(n1), pid)
    wait_for(lambda: not running_counter(host_proc(n1), pid), 5, "the counter to die")
    time.sleep(0.05)
    assert_exact_sequence(out)


def test_restore_into_a_busy_pid_fails_with_criu_message(hosts: list[Any], work: Path) -> None:
    from dunix.errors import MigrationFailed
    from dunix.migrate import swrk

    n1, _ = hosts
    out = work / "count"
    pid = start_counter(n1, out)
    try:
        with images(work) as fd:
            trio.run(
                lambda: swrk.dump(
                    pid, fd, leave_running=True, command=swrk.CriuCommand.in_host(n1.init_pid)
                )
            )
            # The original still runs in n1, so its pid is taken there.
            with pytest.raises(MigrationFailed, match="File exists"):
                trio.run(lambda: swrk.restore(fd, command=swrk.CriuCommand.in_host(n1.init_pid)))
        assert running_counter(host_proc(n1), pid)
    finally:
        kill_in(host_proc(n1), pid)


def test_criu_binary_runs_in_the_host(hosts: list[Any]) -> None:
    from dunix.migrate import swrk

    argv = [*swrk.CriuCommand.in_host(hosts[0].init_pid).argv(0)[:-2], "--version"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    assert done.returncode == 0 and "Version" in done.stdout, done.stderr


def test_cpuinfo_dump_then_check_on_the_same_cpu(hosts: list[Any], work: Path) -> None:
    from dunix.migrate import swrk

    with images(work) as fd:
        command = swrk.CriuCommand.in_host(hosts[1].init_pid)
        trio.run(lambda: swrk.cpuinfo_dump(fd, command=command))
        assert (work / "images" / "cpuinfo.img").exists()
        assert trio.run(lambda: swrk.cpuinfo_check(fd, command=command)) is None
