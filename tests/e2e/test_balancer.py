"""The live balancer moves CPU-bound processes off a hot host by itself (issue 4, part 7).

A job started on n2 with ``--placement remote`` runs a shell that starts 6 CPU-bound
Python loops. n3 advertises fewer CPU features than n1 and n2, so it receives nothing:
the shell is exec'd on n1 (n2's only compatible peer) and the shell's loops on n2 (n1's),
6 loops on one 0.5-CPU host. No one runs `dunix migrate`: that host's balancer must move
some of them away (to the loops' home, the only compatible peer), never to n3. Each loop
adds up the integers it counts and writes both to its own file (not stdout: lines of
loops relayed to one pipe were seen split and interleaved once), so a loop whose state
was lost or replayed across a move writes a wrong sum.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import DUNIX, dunix, require_root, running_cluster, shared_folder, wait_for

pytestmark = pytest.mark.e2e

WORK = Path("/var/tmp/dunix-e2e-balancer")  # seen by every host (a host's /tmp is its own)
N2 = "/run/dunix/hosts/n2/control.sock"
NAMES = ("n1", "n2", "n3")
LOOPS = 6

LOOP = """
import os, sys
stop, n, s = sys.argv[1], 0, 0
while not os.path.exists(stop):
    for i in range(n, n + 200_000):
        s += i
    n += 200_000
with open(f"{stop}.{sys.argv[2]}", "w") as f:
    f.write(f"{n} {s}\\n")
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[Any]]:
    require_root()
    from dunix import cluster as sim

    shared_folder(WORK)
    fast = WORK / "balancer.toml"  # a shorter residency than the default 5 s: a faster test
    fast.write_text("[balancer]\nmin_residency = 3.0\n")
    old_cpu = WORK / "old-cpu.toml"
    old_cpu.write_text(
        '[agent]\ncpu_flags = ["fpu", "sse", "sse2"]\n[balancer]\nmin_residency = 3.0\n'
    )

    def argv(host: Any) -> list[str]:
        config = old_cpu if host.name == "n3" else fast
        return [*sim.default_agent_argv(host), "--config", str(config)]

    with running_cluster(3, agent_argv=argv, alive_from="n2") as hosts:
        yield hosts


def loops() -> dict[int, dict[str, Any]]:
    """The loops, cluster-wide, by gpid: where each runs and how often it moved (a loop
    caught mid-move may be listed by both hosts: either record will do)."""
    procs = json.loads(dunix("ps", "--json", "--control", N2).stdout)
    return {
        p["gpid"]: p
        for p in procs
        if p["state"] == "guest" and p["cmd"].startswith("/usr/bin/python3 -c")
    }


def test_cpu_bound_loops_spread_from_a_hot_host_by_themselves(cluster: list[Any]) -> None:
    stop = WORK / f"stop-{os.getpid()}"
    for old in WORK.glob(f"{stop.name}*"):
        old.unlink()
    script = " ".join(f"/usr/bin/python3 -c '{LOOP}' {stop} {i} &" for i in range(LOOPS))
    run = subprocess.Popen(
        [*DUNIX, "run", "--control", N2, "--placement", "remote", "--", "/bin/sh", "-c",
         f"{script} wait"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=WORK,
        text=True,
    )  # fmt: skip
    seen: dict[int, set[str]] = {}
    try:
        exec_host: dict[int, str] = {}  # where each loop ran before any move

        def started() -> str | None:
            # The balancer may move a loop before the last one has started: wait until
            # each of them has been seen, not for all six at once on one host.
            for p in loops().values():
                seen.setdefault(p["gpid"], set()).add(p["node"])
                if p["moves"] == 0:
                    exec_host.setdefault(p["gpid"], p["node"])
            if len(seen) < LOOPS:
                return None
            hosts = set(exec_host.values())
            assert len(hosts) == 1, exec_host  # the loops exec'd on the shell's one peer
            return hosts.pop()

        hot = wait_for(started, 30, f"{LOOPS} loops exec'd on one host")
        t0 = time.monotonic()

        def spread() -> set[str] | None:
            procs = loops()
            for p in procs.values():
                seen.setdefault(p["gpid"], set()).add(p["node"])
            nodes = {p["node"] for p in procs.values()}
            moved = [p for p in procs.values() if p["moves"] > 0]
            return nodes if len(nodes) >= 2 and moved else None

        nodes = wait_for(spread, 60, f"the balancer moving loops off {hot}", interval=0.5)
        assert "n3" not in nodes  # it lacks n2's CPU features
        print(f"\nloops spread from {hot} to {sorted(nodes)} {time.monotonic() - t0:.1f} s "
              "after all had started")  # fmt: skip
    finally:
        stop.touch()
        try:
            _out, err = run.communicate(timeout=90)
        finally:
            if run.poll() is None:
                run.kill()
                run.communicate()
    assert run.returncode == 0, err
    for i in range(LOOPS):
        n, s = (int(x) for x in Path(f"{stop}.{i}").read_text().split())
        assert n > 0 and s == n * (n - 1) // 2, f"loop {i}'s state broke across a move"
    assert all("n3" not in nodes for nodes in seen.values()), seen
    logs = "".join(Path(f"/run/dunix/hosts/{n}/agent.log").read_text() for n in NAMES)
    assert f"moved {hot} → " in logs and "balancer: moving gpid" in logs
