"""Big cross-host pipes go to the native relay (dunix/fdmove/bulk.py) on a real cluster:
whole, in order, both ways, and `yes | head -1` still ends after the hand-over.

One hop only here. Two hops work in the benchmark (`dunix run --placement remote sh -c
'dd | dd'`, bench/relay_bench.py --cluster), but a hand test of the client's pipe into
`dunix run --placement remote sh -c cat` (cat placed back on the home) gave empty output,
with DUNIX_BULK_RELAY=0 as well: not investigated yet."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from dunix.fdmove.bulk import RELAY
from tests.e2e.conftest import DUNIX, wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not os.access(RELAY, os.X_OK), reason="dunix-relay not built"),
]

WORK = Path("/var/tmp/dunix-e2e-bulk")  # seen by every host (a host's /tmp is its own)
N1 = "/run/dunix/hosts/n1/control.sock"
MiB = 1024 * 1024
LOGS = Path("/run/dunix/hosts")


@pytest.fixture(scope="module")
def work(cluster3: list[Any]) -> Path:
    WORK.mkdir(parents=True, exist_ok=True)
    from tests.e2e.test_agents import all_alive

    wait_for(lambda: all_alive("n1"), 15, "all alive")
    return WORK


def handovers() -> int:
    """Streams handed to the native relay so far, on every host."""
    return sum(
        (LOGS / f"n{i}" / "agent.log").read_text(errors="replace").count("native relay")
        for i in (1, 2, 3)
    )


def remote(argv: list[str], work: Path, **kw: Any) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*DUNIX, "run", "--control", N1, "--placement", "remote", "--", *argv],
        capture_output=True, cwd=work, timeout=120, **kw,
    )  # fmt: skip


def test_a_big_pipe_crosses_whole_both_ways(work: Path) -> None:
    data = os.urandom(48 * MiB)
    digest = hashlib.sha256(data).hexdigest()
    (work / "blob").write_bytes(data)
    before = handovers()
    # in: a home pipe pulled by the remote reader
    proc = remote(["sha256sum"], work, input=data)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0].decode() == digest
    assert handovers() > before
    # out: the remote cat's output pushed home into a pipe
    before = handovers()
    proc = remote(["cat", str(work / "blob")], work)
    assert proc.returncode == 0, proc.stderr
    assert hashlib.sha256(proc.stdout).hexdigest() == digest
    assert handovers() > before


#: reads 16 MiB steadily (the stream is handed over), stops reading, then exits
READ_THEN_QUIT = (
    "import sys, time; n = len(sys.stdin.buffer.read(16 << 20)); time.sleep(0.5); print(n)"
)


def test_yes_into_a_remote_reader_that_quits_after_the_hand_over(work: Path) -> None:
    """A pulled stream moves only for a reader that reads (docs/run.md): this one reads
    enough for the hand-over, then quits; yes must still die of SIGPIPE at home."""
    before = handovers()
    proc = subprocess.run(
        ["bash", "-c", f"yes | {' '.join(DUNIX)} run --control {N1} --placement remote -- "
         f"/usr/bin/python3 -c '{READ_THEN_QUIT}'; echo \"${{PIPESTATUS[@]}}\""],
        capture_output=True, cwd=work, timeout=60,
    )  # fmt: skip
    assert proc.stdout.decode().splitlines() == [str(16 << 20), "141 0"], proc.stderr
    assert handovers() > before
