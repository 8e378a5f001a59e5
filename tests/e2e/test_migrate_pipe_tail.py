"""A slow reader of a pipe fed at home moves home -> n2 -> n3: nothing it had not read
is lost (issue 4, part 5).

After the first move (a home move) the home relays the pipe into a new pipe on n2,
eagerly: n2's pipe and its relay then hold lines the reader has not read. The second
move (guest to guest) restores it on n3 with another new pipe; what n2 held must follow
it (``MigrateTail``, read back from a duplicate of its read end on n2, as for a relayed
socket) and come before what the home sends n3 from then on. Every line arrives once,
in order, then EOF.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import DUNIX, dunix, ps_json, reap, running_cluster, shared_folder, wait_for

pytestmark = pytest.mark.e2e

WORK = Path("/var/tmp/dunix-e2e-migrate-pipe-tail")  # seen by every host
N1 = "/run/dunix/hosts/n1/control.sock"

# ~20 lines/s: when it moves on, n2's pipe holds lines it has not read
READER = """
import sys, time
for line in sys.stdin:
    print("got", line.split()[0], flush=True)
    time.sleep(0.01)
print("eof", flush=True)
"""
PAD = b"x" * 190


def lines(first: int, last: int) -> bytes:
    return b"".join(b"%d %s\n" % (i, PAD) for i in range(first, last))


@pytest.fixture(scope="module")
def hosts() -> Iterator[list[Any]]:
    shared_folder(WORK)
    with running_cluster(3, alive_from="n1") as up:
        yield up


def test_a_slow_reader_moves_home_n2_n3_and_reads_every_line_once(hosts: list[Any]) -> None:
    run = subprocess.Popen(
        [*DUNIX, "run", "--node", "n1", "--control", N1, "--placement", "local", "--",
         "/usr/bin/python3", "-c", READER],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=WORK,
    )  # fmt: skip
    assert run.stdin is not None
    try:

        def reader() -> dict[str, Any] | None:
            found = [p for p in ps_json(N1) if p["cmd"].startswith("/usr/bin/python3 -c")]
            return found[0] if found else None

        gpid = wait_for(reader, 20, "the reader running in n1")["gpid"]
        run.stdin.write(lines(0, 300))  # 60 KB: within the home pipe's 64 KiB
        run.stdin.flush()
        dunix("migrate", str(gpid), "n2", "--control", N1, timeout=90)
        run.stdin.write(lines(300, 800))  # relayed into n2's pipe at once
        run.stdin.flush()
        time.sleep(0.5)
        out = dunix("migrate", str(gpid), "n3", "--control", N1, timeout=90)
        print(out.stdout)
        now = [p for p in ps_json(N1) if p["gpid"] == gpid]
        assert now and now[0]["node"] == "n3" and now[0]["moves"] == 2, now
        run.stdin.write(lines(800, 900))
        run.stdin.close()
        run.stdin = None  # closed: communicate only reads
        got, err = run.communicate(timeout=60)
    finally:
        reap(run)
    text = got.decode().splitlines()
    seen = [int(x.split()[1]) for x in text if x.startswith("got ")]
    missing = sorted(set(range(900)) - set(seen))
    assert seen == list(range(900)), (
        f"{len(seen)} lines, {len(missing)} missing (first {missing[:5]}): {err.decode()}"
    )
    assert text[-1] == "eof", err.decode()
    assert run.returncode == 0, err.decode()
