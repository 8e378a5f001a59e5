"""A dead peer never leaves a process waiting forever (issue 3, the failure rule).

A job's child is moved from its home n1 to n2, then n2's agent is SIGKILLed: once n2 is
declared dead the child's deputy in n1 ends as killed by SIGKILL (its parent's wait()
sees it), `dunix ps` says `lost: host n2 died` until the parent reaps it, and its pipes
close (the parent reads EOF, its write fails with EPIPE). n2's agent is restarted: the
child it still ran there is killed (nothing of the job is left on any host).

The reverse: a job's home (n3) loses its agent while its child runs on n1 as a guest:
n1 kills the guest (its parent and deputy are gone), and the restarted n3 agent ends
what the dead one left there.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import DUNIX, dunix, ps_json, reap, running_cluster, shared_folder, wait_for

pytestmark = pytest.mark.e2e

WORK = Path("/var/tmp/dunix-e2e-dead-peer")  # seen by every host (/tmp is per host)


def control(host: str) -> str:
    return f"/run/dunix/hosts/{host}/control.sock"


#: the parent: starts CHILD (an echo over two pipes), checks the relay once it moved,
#: then, when argv[2] exists, reads, writes and waits on the lost child
PARENT = """
import os, subprocess, sys, time
child, go, marker = sys.argv[1], sys.argv[2], sys.argv[3]
p = subprocess.Popen(["/usr/bin/python3", "-c", child, marker + "-child"],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
print("started", flush=True)
while not os.path.exists(go + ".moved"):
    time.sleep(0.05)
p.stdin.write(b"ping\\n"); p.stdin.flush()
print("echo", p.stdout.readline().decode().strip(), flush=True)
while not os.path.exists(go):
    time.sleep(0.05)
print("read", repr(p.stdout.read()), flush=True)
try:
    p.stdin.write(b"more\\n"); p.stdin.flush()
    print("write ok", flush=True)
except BrokenPipeError:
    print("write EPIPE", flush=True)
_, status = os.waitpid(p.pid, 0)
print("signal", os.WTERMSIG(status) if os.WIFSIGNALED(status) else None, flush=True)
"""
CHILD = """
import sys, time
for line in sys.stdin:
    sys.stdout.write(line.upper()); sys.stdout.flush()
time.sleep(3600)  # its pipes are gone (EOF): it would run on, but for its killer
"""


@pytest.fixture(scope="module")
def hosts() -> Iterator[list[Any]]:
    shared_folder(WORK)
    with running_cluster(3, alive_from="n1") as up:
        yield up


def agent_pid(name: str) -> int:
    from dunix import cluster

    host = next(h for h in cluster.status() if h.name == name)
    assert host.agent_pid is not None
    return int(host.agent_pid)


def running(marker: str) -> list[str]:
    """Processes anywhere on the machine (every host) whose command line holds ``marker``."""
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout
    return out.split()


def start_job(home: str, marker: str, go: Path) -> tuple[subprocess.Popen[Any], int]:
    """The parent at ``home`` (placed locally) with its child; the child's gpid."""
    for path in (go, Path(f"{go}.moved")):
        path.unlink(missing_ok=True)
    run = subprocess.Popen(
        [*DUNIX, "run", "--node", home, "--control", control(home), "--placement", "local",
         "--", "/usr/bin/python3", "-c", PARENT, CHILD, str(go), marker],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=WORK,
    )  # fmt: skip

    def child() -> int | None:
        found = [p for p in ps_json(control(home)) if f"{marker}-child" in p["cmd"]]
        return found[0]["gpid"] if found else None  # type: ignore[no-any-return]

    return run, wait_for(child, 20, f"the child of the job at {home} in ps")


def move(gpid: int, home: str, target: str, go: Path) -> None:
    dunix("migrate", str(gpid), target, "--control", control(home), timeout=90)
    Path(f"{go}.moved").touch()


def test_a_guest_lost_with_its_host_is_killed_for_its_parent(hosts: list[Any]) -> None:
    from dunix import cluster

    marker = f"dunix-dead-{os.getpid()}"
    go = WORK / marker
    run, gpid = start_job("n1", marker, go)
    try:
        move(gpid, "n1", "n2", go)
        entry = next(p for p in ps_json(control("n1")) if p["gpid"] == gpid)
        assert entry["node"] == "n2" and entry["state"] == "deputy", entry
        os.kill(agent_pid("n2"), signal.SIGKILL)

        def lost() -> Any:
            now = [p for p in ps_json(control("n1")) if p["gpid"] == gpid]
            return now and now[0]["state"] == "lost: host n2 died"

        # the parent has not reaped it yet: ps says why it is gone
        wait_for(lost, 40, "ps on n1 saying the child was lost with n2")
        go.touch()
        out, err = run.communicate(timeout=60)
    finally:
        reap(run)
    lines = out.decode().splitlines()
    assert lines == ["started", "echo PING", "read b''", "write EPIPE", "signal 9"], err.decode()
    assert run.returncode == 0, err.decode()
    # nothing of the job in n1's view; its copy in n2 outlived the agent there ...
    wait_for(lambda: not [p for p in ps_json(control("n1")) if p["gpid"] == gpid], 10,
             "the lost child gone from ps once reaped")  # fmt: skip
    assert running(f"{marker}-child"), "the copy in n2 should still run without its agent"
    # ... until the agent comes back: it ends what the dead one left
    cluster.start_agent("n2")
    wait_for(lambda: not running(marker), 30, "no process of the job left on any host")


def test_a_guest_whose_home_died_is_killed(hosts: list[Any]) -> None:
    from dunix import cluster

    wait_for(lambda: all(n["state"] == "alive" for n in _nodes("n3")), 30, "n2 alive again")
    marker = f"dunix-orphan-{os.getpid()}"
    go = WORK / marker
    run, gpid = start_job("n3", marker, go)
    try:
        move(gpid, "n3", "n1", go)
        wait_for(lambda: running(f"{marker}-child"), 10, "the child running")
        os.kill(agent_pid("n3"), signal.SIGKILL)
        # n1 declares n3 dead and kills the guest of n3 it runs; the parent in n3 runs on
        # without its agent (its deputy died with the agent's socket)
        wait_for(lambda: not running(f"{marker}-child"), 40, "the orphaned guest killed")
        run.wait(timeout=30)  # the client lost its agent
        cluster.start_agent("n3")
        wait_for(lambda: not running(marker), 30, "no process of the job left on any host")
        assert not [p for p in ps_json(control("n1")) if p["gpid"] == gpid]
    finally:
        reap(run)


def _nodes(host: str) -> list[dict[str, Any]]:
    import json

    return json.loads(dunix("nodes", "--json", "--control", control(host)).stdout)  # type: ignore[no-any-return]
