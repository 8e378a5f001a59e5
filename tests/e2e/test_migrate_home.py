"""`dunix migrate` of a process that runs at home: it leaves a deputy there (issue 4).

A counter started with `dunix run --node n1 --placement local` (the child of a shell that
waits for it) runs in n1 and prints to a pipe read by this test. It is moved n1 → n2 (a
home move: release, CRIU dump with leave_running, restore in n2, deputize in n1), then
n2 → n3 (a guest move). Its output must hold every number once and in order, the shell's
`wait` must see its exit code, and `dunix ps` must show where it runs and its moves. A
move whose restore fails on the target (injected) leaves it running at home first.
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

from tests.e2e.conftest import (
    COUNTER,
    DUNIX,
    dunix,
    ps_json,
    reap,
    running_cluster,
    shared_folder,
    wait_for,
)

pytestmark = pytest.mark.e2e

WORK = Path("/var/tmp/dunix-e2e-migrate-home")  # seen by every host (/tmp is per host)
N1 = "/run/dunix/hosts/n1/control.sock"
KNOB = "migrate-fail-restore"  # dunix/agent/migration.py FAIL_RESTORE_KNOB


# the counter in the background of a shell whose `wait` must see its real exit code
JOB = '/usr/bin/python3 -c "$1" "$2" & c=$!; wait $c; echo status=$?'


@pytest.fixture(scope="module")
def hosts() -> Iterator[list[Any]]:
    shared_folder(WORK)
    with running_cluster(3, alive_from="n1") as up:
        yield up


def ps() -> list[dict[str, Any]]:
    return ps_json(N1)


def counter() -> dict[str, Any] | None:
    """The counter's row in `dunix ps`, once it runs."""
    found = [p for p in ps() if p["cmd"].startswith("/usr/bin/python3 -c")]
    return found[0] if found else None


def test_a_counter_moves_from_home_and_on(hosts: list[Any]) -> None:
    stop = WORK / f"stop-{os.getpid()}"
    stop.unlink(missing_ok=True)
    run = subprocess.Popen(
        [*DUNIX, "run", "--node", "n1", "--control", N1, "--placement", "local", "--",
         "sh", "-c", JOB, "sh", COUNTER, str(stop)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=WORK,
    )  # fmt: skip
    try:
        proc = wait_for(counter, 20, "the counter running in n1")
        gpid = proc["gpid"]
        assert proc["node"] == "n1" and proc["state"] == "running", proc
        time.sleep(0.3)
        # an injected restore failure on the target: it runs on at home, nothing lost
        knob = Path(f"/run/dunix/hosts/n2/{KNOB}")
        knob.touch()
        try:
            failed = dunix("migrate", str(gpid), "n2", "--control", N1, check=False, timeout=90)
        finally:
            knob.unlink()
        assert failed.returncode == 1 and "restore" in failed.stderr, failed.stderr
        now = [p for p in ps() if p["gpid"] == gpid]
        assert now and now[0]["node"] == "n1" and now[0]["state"] == "running", now
        assert now[0]["moves"] == 0, now
        time.sleep(0.3)
        outs = []
        for to, moves in (("n2", 1), ("n3", 2)):
            out = dunix("migrate", str(gpid), to, "--control", N1, timeout=90)
            outs.append(out.stdout)
            now = [p for p in ps() if p["gpid"] == gpid]
            assert now and now[0]["node"] == to and now[0]["state"] == "deputy", now
            assert now[0]["moves"] == moves, now
            assert all(p["cmd"].startswith("/usr/bin/python3 -c") for p in now), now
            time.sleep(0.3)
        # not yet: its deputy holds its pid at home, and CRIU restores a process with its
        # own pid; refused before freezing, it runs on in n3
        back = dunix("migrate", str(gpid), "home", "--control", N1, check=False, timeout=90)
        assert back.returncode == 1 and "in use on n1" in back.stderr, back.stderr
        assert {p["node"] for p in ps() if p["gpid"] == gpid} == {"n3"}
        time.sleep(0.3)
        stop.touch()
        out, err = run.communicate(timeout=60)
    finally:
        reap(run)
        stop.unlink(missing_ok=True)
    for text in outs:
        print(text)
    lines = out.decode().split()
    assert lines[-2:] == ["end", "status=7"], err.decode()
    numbers = [int(x) for x in lines[:-2]]
    assert numbers == list(range(1, len(numbers) + 1)), err.decode()
    assert len(numbers) > 30
    assert run.returncode == 0, err.decode()


# 8 workers forked without exec, each computing a result and writing it, with the host it
# ran on, to its own pipe back to the parent; the parent checks its children's statuses
WORKERS = """
import json, os, socket, sys
pipes, kids = [], []
for k in range(8):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        total = sum(i * i for i in range(200000 + k))
        os.write(w, json.dumps([k, total, socket.gethostname()]).encode())
        os._exit(10 + k)
    os.close(w)
    pipes.append(r)
    kids.append(pid)
results = []
for r in pipes:
    data = b""
    while chunk := os.read(r, 4096):
        data += chunk
    results.append(json.loads(data))
codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in kids]
print(json.dumps({"results": results, "codes": codes}))
"""


def test_workers_forked_without_exec_spread_at_fork(hosts: list[Any]) -> None:
    env = dict(os.environ, DUNIX_FORK_PLACEMENT="remote")
    out = subprocess.run(
        [*DUNIX, "run", "--node", "n1", "--control", N1, "--placement", "local", "--",
         "/usr/bin/python3", "-c", WORKERS],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=WORK, env=env,
        timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    expected = [sum(i * i for i in range(200000 + k)) for k in range(8)]
    assert [r[:2] for r in got["results"]] == [[k, expected[k]] for k in range(8)]
    assert got["codes"] == [10 + k for k in range(8)]
    hosts_used = {r[2] for r in got["results"]}
    print("workers ran on", sorted(hosts_used))
    assert len(hosts_used) >= 2, got


def test_signals_reach_a_process_moved_from_home(hosts: list[Any]) -> None:
    """`dunix kill` of the gpid reaches its deputy at home, which forwards it to the
    process in n3; the shell's `wait` sees that it died of SIGTERM."""
    stop = WORK / f"stop-sig-{os.getpid()}"
    run = subprocess.Popen(
        [*DUNIX, "run", "--node", "n1", "--control", N1, "--placement", "local", "--",
         "sh", "-c", JOB, "sh", COUNTER, str(stop)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=WORK,
    )  # fmt: skip
    try:
        gpid = wait_for(counter, 20, "the counter running in n1")["gpid"]
        dunix("migrate", str(gpid), "n3", "--control", N1, timeout=90)
        time.sleep(0.3)
        dunix("kill", "-s", "TERM", str(gpid), "--control", N1)
        out, err = run.communicate(timeout=30)
    finally:
        reap(run)
    lines = out.decode().split()
    assert lines[-1] == "status=143", err.decode()  # 128 + SIGTERM, seen by the shell
    numbers = [int(x) for x in lines[:-1]]
    assert numbers == list(range(1, len(numbers) + 1)), err.decode()


def test_a_process_writing_the_jobs_output_file_moves(hosts: list[Any]) -> None:
    """Its stdout is a file this test opened (a mount n1's jobs do not see), shared with
    the shell that runs it: the file comes home as a relayed pipe, so the shell's last
    line lands after every number the counter wrote in n2, none over them."""
    stop, out = WORK / f"stop-file-{os.getpid()}", WORK / f"out-file-{os.getpid()}"
    with out.open("wb") as sink:
        run = subprocess.Popen(
            [*DUNIX, "run", "--node", "n1", "--control", N1, "--placement", "local", "--",
             "sh", "-c", f"echo start; {JOB}", "sh", COUNTER, str(stop)],
            stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.PIPE, cwd=WORK,
        )  # fmt: skip
    try:
        gpid = wait_for(counter, 20, "the counter running in n1")["gpid"]
        time.sleep(0.3)
        dunix("migrate", str(gpid), "n2", "--control", N1, timeout=90)
        assert {p["node"] for p in ps() if p["gpid"] == gpid} == {"n2"}
        time.sleep(0.5)
        stop.touch()
        _, err = run.communicate(timeout=60)
    finally:
        reap(run)
        stop.unlink(missing_ok=True)
    lines = out.read_text().split()
    out.unlink()
    assert lines[0] == "start" and lines[-2:] == ["end", "status=7"], err.decode()
    numbers = [int(x) for x in lines[1:-2]]
    assert numbers == list(range(1, len(numbers) + 1)), err.decode()
    assert run.returncode == 0, err.decode()


ECHO = """
import sys, time
time.sleep(1.5)  # moved while its first lines wait unread in the pipe at home
for line in sys.stdin:
    print("got", line.strip(), flush=True)
print("eof", flush=True)
"""


def test_a_process_reading_a_pipe_moves_with_its_input(hosts: list[Any]) -> None:
    """Its stdin, a pipe from this test, is relayed from home after the move: what it had
    not read yet and what comes later arrive once, in order, then EOF."""
    run = subprocess.Popen(
        [*DUNIX, "run", "--node", "n1", "--control", N1, "--placement", "local", "--",
         "/usr/bin/python3", "-c", ECHO],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=WORK,
    )  # fmt: skip
    assert run.stdin is not None
    try:

        def echo() -> dict[str, Any] | None:
            found = [p for p in ps() if p["cmd"].startswith("/usr/bin/python3 -c")]
            return found[0] if found else None

        gpid = wait_for(echo, 20, "the echo running in n1")["gpid"]
        run.stdin.write(b"".join(b"%d\n" % i for i in range(100)))
        run.stdin.flush()
        dunix("migrate", str(gpid), "n2", "--control", N1, timeout=90)
        run.stdin.write(b"".join(b"%d\n" % i for i in range(100, 200)))
        run.stdin.close()
        run.stdin = None  # closed: communicate only reads
        out, err = run.communicate(timeout=30)
    finally:
        reap(run)
    lines = out.decode().splitlines()
    assert lines == [f"got {i}" for i in range(200)] + ["eof"], err.decode()
    assert run.returncode == 0, err.decode()
