"""Post-copy moves from home (issue 4, part 3; dunix/agent/homemove.py).

A holder with 96 MiB of random bytes (over ``lazy.LAZY_MIN_RSS``) runs at home in n1, the
background child of a shell that waits for it. `dunix migrate GPID n2` moves it with lazy
pages (the phases say post-copy), a deputy stays in n1 once the last page was served; the
holder's checksum over all its memory is the same after the move, and its exit code
reaches the shell's `wait`. With lazy pages refused by the target it moves by the plain
dump instead. A home whose page server is killed in the middle of the transfer loses the
process: the move fails, and the shell sees it killed by SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dunix.pid import split_gpid
from tests.e2e.conftest import (
    DUNIX,
    MEMORY_HOLDER,
    dunix,
    ps_json,
    reap,
    running_cluster,
    shared_folder,
    wait_for,
)
from tests.e2e.test_migrate_lazy import line, page_servers

pytestmark = pytest.mark.e2e

WORK = Path("/var/tmp/dunix-e2e-migrate-home-lazy")  # seen by every host
N1 = "/run/dunix/hosts/n1/control.sock"
LAZY_KNOB = "migrate-fail-lazy"  # dunix/agent/migration.py FAIL_LAZY_KNOB

# MEMORY_HOLDER, then it waits for the file STOP (argv 3), prints the checksum again
# (every page read) and exits with 7
HOLDER = MEMORY_HOLDER + textwrap.dedent(
    """\
    while not os.path.exists(sys.argv[3]):
        time.sleep(0.05)
    print("sum", hashlib.sha256(data).hexdigest(), flush=True)
    sys.exit(7)
    """
)
# the holder in the background of a shell whose `wait` must see its exit status
JOB = '/usr/bin/python3 -c "$1" "$2" "$3" "$4" & c=$!; wait $c; echo status=$?'


@pytest.fixture(scope="module")
def hosts() -> Iterator[list[Any]]:
    if int(Path("/proc/sys/fs/pipe-max-size").read_text()) < 4 << 20:
        pytest.fail("post-copy needs fs.pipe-max-size >= 4 MiB: scripts/setup.sh raises it")
    shared_folder(WORK)
    with running_cluster(3, quota=None, alive_from="n1") as up:
        yield up


def start(mib: int, fill: bool, stop: Path) -> subprocess.Popen[bytes]:
    stop.unlink(missing_ok=True)
    return subprocess.Popen(
        [*DUNIX, "run", "--node", "n1", "--control", N1, "--placement", "local", "--",
         "sh", "-c", JOB, "sh", HOLDER, str(mib), "1" if fill else "0", str(stop)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=WORK,
    )  # fmt: skip


def holder() -> dict[str, Any] | None:
    found = [p for p in ps_json(N1) if p["cmd"].startswith("/usr/bin/python3 -c")]
    return found[0] if found else None


def move_and_finish(run: subprocess.Popen[bytes], stop: Path, knob: Path | None) -> str:
    """Move the holder n1 -> n2 (with ``knob`` set during the move), check its memory
    and its exit status; the move's output."""
    assert run.stdout is not None
    first = line(run.stdout)
    assert first.startswith("sum "), first
    proc = wait_for(holder, 20, "the holder running in n1")
    gpid = proc["gpid"]
    assert proc["node"] == "n1" and proc["state"] == "running", proc
    if knob is not None:
        knob.touch()
    try:
        out = dunix("migrate", str(gpid), "n2", "--control", N1, timeout=90)
    finally:
        if knob is not None:
            knob.unlink()
    assert "moved n1 -> n2" in out.stdout, out.stdout
    now = [p for p in ps_json(N1) if p["gpid"] == gpid]
    assert now and now[0]["node"] == "n2" and now[0]["state"] == "deputy", now
    stop.touch()
    assert line(run.stdout) == first  # every page came, unchanged
    assert line(run.stdout) == "status=7"  # the shell's wait, through the deputy
    assert run.wait(timeout=30) == 0
    return str(out.stdout)


def test_a_large_process_moves_from_home_with_post_copy(hosts: list[Any]) -> None:
    stop = WORK / f"stop-{os.getpid()}"
    run = start(96, fill=True, stop=stop)
    try:
        out = move_and_finish(run, stop, None)
    finally:
        reap(run)
        stop.unlink(missing_ok=True)
    print(out)
    assert "post-copy: every page served" in out, out


def test_lazy_pages_refused_falls_back_to_a_plain_dump(hosts: list[Any]) -> None:
    stop = WORK / f"stop-plain-{os.getpid()}"
    run = start(96, fill=True, stop=stop)
    try:
        out = move_and_finish(run, stop, Path(f"/run/dunix/hosts/n2/{LAZY_KNOB}"))
    finally:
        reap(run)
        stop.unlink(missing_ok=True)
    assert "post-copy" not in out, out


def test_a_dead_page_server_at_home_loses_the_process(hosts: list[Any]) -> None:
    stop = WORK / f"stop-lost-{os.getpid()}"
    run = start(2048, fill=False, stop=stop)  # ~2 s of pages: the kill lands first
    try:
        assert run.stdout is not None
        assert line(run.stdout).startswith("sum ")
        gpid = wait_for(holder, 20, "the holder running in n1")["gpid"]
        _, pid = split_gpid(gpid)
        n1 = next(h for h in hosts if h.name == "n1")
        n2 = next(h for h in hosts if h.name == "n2")
        mover = subprocess.Popen(
            [*DUNIX, "migrate", str(gpid), "n2", "--control", N1],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

        def running_in_n2() -> bool:
            # restored, and seized by n2's tracer (criu is its tracer while it restores)
            procfs = Path(f"/proc/{n2.init_pid}/root/proc")
            try:
                status = (procfs / str(pid) / "status").read_text()
                fields = dict(x.split(":", 1) for x in status.splitlines() if ":" in x)
                tracer = fields["TracerPid"].strip()
                return (procfs / tracer / "comm").read_text().strip() == "dunix-tracer"
            except (OSError, KeyError):
                return False

        wait_for(running_in_n2, 60, "the holder running in n2", interval=0.02)
        pids = page_servers(n1)
        assert pids, "no criu dump serving pages in n1 after the restore"
        for criu in pids:
            os.kill(criu, signal.SIGKILL)
        out, err = mover.communicate(timeout=90)
        assert mover.returncode != 0 and "lost" in err, (out, err)
        # the shell's wait sees it killed; the copy in n2 is gone too
        assert line(run.stdout) == f"status={128 + signal.SIGKILL}"
        assert run.wait(timeout=60) == 0
        gone = Path(f"/proc/{n2.init_pid}/root/proc/{pid}")
        wait_for(lambda: not gone.exists(), 30, "the copy in n2 killed")
    finally:
        reap(run)
        stop.unlink(missing_ok=True)
