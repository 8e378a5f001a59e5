"""`dunix migrate` of a process of a job with its own /tmp (a cwd in storagefs).

Every process of such a job runs in a mount namespace of its own with the job's storagefs
folder bound over /tmp (dunix/agent/storage.py). A counter started from n1 in /dunix/fs
(forced remote) opens a file in /tmp and keeps it open, and prints to the pipe this test
reads; it is moved home, to another peer and home again with `dunix migrate`. Its output
must hold every number once and in order, and at the end it reads its /tmp file through
the fd it kept and by name again.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import dunix, reap, shared_folder, wait_for
from tests.e2e.test_storagefs_cluster import FS, _dunix_cmd, sh
from tests.e2e.test_storagefs_cluster import hosts as hosts  # the module's cluster fixture

pytestmark = pytest.mark.e2e

N1 = "/run/dunix/hosts/n1/control.sock"
WORK = Path("/var/tmp/dunix-e2e-migrate-jobtmp")  # seen by every host, quick to stat

PROGRAM = """
import os, sys, time
stop, i = sys.argv[1], 0
f = open("/tmp/kept", "w+")
f.write("kept-" + os.environ.get("DUNIX_JOB_TMP", "/none/x").rsplit("/", 2)[-2]); f.flush()
while not os.path.exists(stop):
    i += 1
    print(i, flush=True)
    time.sleep(0.01)
f.seek(0)
print("fd", f.read())
print("name", open("/tmp/kept").read(), flush=True)
"""


def where(gpid: int) -> tuple[str, int]:
    procs = json.loads(dunix("ps", "--json", "--control", N1).stdout)
    home = [p for p in procs if p["gpid"] == gpid and p["home"] == "n1" and p["state"] == "deputy"]
    assert home, procs
    return home[0]["node"], home[0]["moves"]


def test_a_job_with_its_own_tmp_moves_home_away_and_home(hosts: list[str]) -> None:
    from dunix import cluster

    shared_folder(WORK)
    stop = WORK / f"stop-{os.getpid()}"
    stop.unlink(missing_ok=True)
    sh("n1", "mkdir -p jobtmp-move")
    cmd = (f"{_dunix_cmd()} run --control {N1} --placement remote -- "
           f"/usr/bin/python3 -c {shlex.quote(PROGRAM)} {stop}")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "DUNIX_JOB_TMP"}
    run = cluster.exec_in(
        "n1", ["sh", "-c", cmd], cwd=f"{FS}/jobtmp-move", env=env,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    outs = []
    try:

        def deputy() -> dict[str, Any] | None:
            procs = json.loads(dunix("ps", "--json", "--control", N1).stdout)
            found = [p for p in procs if p["state"] == "deputy" and p["home"] == "n1"]
            return found[0] if found and found[0]["node"] else None

        gpid = wait_for(deputy, 30, "the counter running on a peer")["gpid"]
        node, _ = where(gpid)
        away = "n3" if node == "n2" else "n2"
        for to, expect in (("home", "n1"), (away, away), ("home", "n1")):
            time.sleep(0.3)
            out = dunix("migrate", str(gpid), to, "--control", N1, check=False, timeout=90)
            assert out.returncode == 0, out.stderr
            outs.append(out.stdout)
            assert f"moved {node} -> {expect}" in out.stdout, out.stdout
            node, moves = where(gpid)
            assert node == expect and moves == len(outs)
        time.sleep(0.3)
        stop.touch()
        out_b, err_b = run.communicate(timeout=60)
    finally:
        reap(run)
        stop.unlink(missing_ok=True)
    for text in outs:
        print(text)
    err = err_b.decode()
    lines = out_b.decode().splitlines()
    assert len(lines) > 30, err
    assert lines[-2].startswith("fd kept-") and lines[-1].startswith("name kept-"), lines[-3:]
    assert lines[-2][3:] == lines[-1][5:] != "kept-none", lines[-2:]
    numbers = [int(x) for x in lines[:-2]]
    assert numbers == list(range(1, len(numbers) + 1)), err
    assert run.returncode == 0, err
