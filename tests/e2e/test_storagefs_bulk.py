"""Peers' file contents over the bulk lane (dunix/storagefs/bulk.py) on a real 3-host
cluster: what n2 and n3 read and write of n1's file moves over their own TLS connections to
n1's lane, and stays coherent with what the owner and the other hosts see."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from dunix import cluster
from tests.e2e.test_storagefs_cluster import FS, hosts, sh  # noqa: F401 (hosts: a fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("hosts")]

MiB = 1 << 20


def agent_log(host: str) -> str:
    return Path(f"/run/dunix/hosts/{host}/agent.log").read_text(errors="replace")


def write_in(host: str, path: str, data: bytes) -> None:
    done = cluster.run_in(host, ["sh", "-ec", f"cat > {path}"], input=data,
                          capture_output=True, timeout=60, cwd=FS)  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_peers_read_and_write_an_owners_file_over_the_lane() -> None:
    sh("n1", "mkdir -p lane && head -c 24000000 /dev/urandom > lane/big")
    want = sh("n1", "sha256sum < lane/big")
    assert sh("n2", "sha256sum < lane/big") == want  # 4 MiB fetches, read ahead
    assert sh("n3", "sha256sum < lane/big") == want
    # n2 overwrites 5 MiB in the middle; n1's kernel drops its cached pages of the file
    sh("n2", "head -c 5242880 /dev/zero | tr '\\0' q | dd of=lane/big bs=1M seek=3"
             " conv=notrunc status=none")  # fmt: skip
    middle = "dd if=lane/big bs=1M skip=3 count=5 status=none | tr -d q | wc -c"
    assert sh("n1", middle).strip() == "0" and sh("n3", middle).strip() == "0"
    assert sh("n3", "sha256sum < lane/big") == sh("n1", "sha256sum < lane/big") != want
    log = agent_log("n1")
    assert "bulk lane from n2" in log and "bulk lane from n3" in log


def test_appends_from_two_hosts_lose_nothing_over_the_lane() -> None:
    sh("n1", "mkdir -p lane && : > lane/log")
    script = "for i in $(seq 200); do echo {h}-$i >> lane/log; done"
    procs = [cluster.exec_in(h, ["sh", "-ec", script.format(h=h)], cwd=FS) for h in ("n2", "n3")]
    for p in procs:
        assert p.wait(timeout=60) == 0
    lines = sh("n1", "cat lane/log").splitlines()
    assert len(lines) == 400 and len(set(lines)) == 400


def test_a_reader_on_another_host_sees_each_write_after_close() -> None:
    sh("n1", "mkdir -p lane && head -c 9000000 /dev/zero > lane/cohere")
    for extra in range(3):
        blob = os.urandom(3 * MiB + extra)
        write_in("n2", "lane/cohere", blob)  # O_TRUNC, then 1 MiB writes over the lane
        digest = hashlib.sha256(blob).hexdigest()
        assert sh("n3", "sha256sum < lane/cohere").split()[0] == digest
        assert sh("n1", "sha256sum < lane/cohere").split()[0] == digest


WRITER = """
import fcntl, hashlib, os, sys, time
folder = sys.argv[1]

def wait_for(name):
    deadline = time.monotonic() + 30
    while not os.path.exists(folder + "/" + name) and time.monotonic() < deadline:
        time.sleep(0.05)

fd = os.open(folder + "/gather", os.O_WRONLY)
data = os.urandom(3 * (1 << 20) + 100)
for off in range(0, len(data), 65536):  # small writes: gathered on this host
    os.write(fd, data[off : off + 65536])
assert os.fstat(fd).st_size == len(data), os.fstat(fd).st_size  # a stat here includes them
os.fsync(fd)
print(hashlib.sha256(data).hexdigest(), flush=True)
wait_for("go")
fcntl.lockf(fd, fcntl.LOCK_EX)
more = os.urandom(300000)
os.write(fd, more)
fcntl.lockf(fd, fcntl.LOCK_UN)  # the next holder of the lock reads them at the owner
print(hashlib.sha256(data + more).hexdigest(), flush=True)
open(folder + "/unlocked", "w").close()
wait_for("checked")
os.close(fd)
"""

READER = """
import fcntl, hashlib, os, sys, time
folder = sys.argv[1]
deadline = time.monotonic() + 30
while not os.path.exists(folder + "/unlocked") and time.monotonic() < deadline:
    time.sleep(0.05)
fd = os.open(folder + "/gather", os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX)
data = b""
while chunk := os.read(fd, 1 << 20):
    data += chunk
print(hashlib.sha256(data).hexdigest(), flush=True)
os.close(fd)
open(folder + "/checked", "w").close()
"""


def test_gathered_writes_are_at_the_owner_after_fsync_and_before_an_unlock() -> None:
    """A writer on n2 keeps its file of n1 open: what it wrote in small pieces (gathered
    on n2, see remote_nodes.RemoteFile.write) is seen by n3 after its fsync, and by a
    locker on n3 after n2 unlocked, without a close."""
    sh("n1", "mkdir -p lane/wb && cd lane/wb && rm -f go unlocked checked && : > gather")
    writer = cluster.exec_in("n2", ["python3", "-c", WRITER, f"{FS}/lane/wb"], cwd=FS,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert writer.stdout is not None
    synced = writer.stdout.readline().strip()
    assert sh("n3", "sha256sum < lane/wb/gather").split()[0] == synced
    sh("n3", "touch lane/wb/go")
    unlocked = writer.stdout.readline().strip()
    reader = cluster.run_in("n3", ["python3", "-c", READER, f"{FS}/lane/wb"], cwd=FS,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert reader.returncode == 0, reader.stderr
    assert reader.stdout.strip() == unlocked
    assert writer.wait(timeout=60) == 0
    assert sh("n1", "sha256sum < lane/wb/gather").split()[0] == unlocked


def test_a_line_written_on_one_host_is_read_on_another_while_the_file_stays_open() -> None:
    """A log that n2 keeps open, with no fsync: n3 sees each line soon (``tail -f`` across
    hosts), as on one machine; the writer's gathered writes go to the owner within
    remote_nodes.WRITE_LINGER."""
    from tests.e2e.conftest import wait_for

    sh("n1", "mkdir -p lane && : > lane/tail")
    writer = cluster.exec_in(
        "n2", ["python3", "-uc", "import sys\nf = open(sys.argv[1], 'w')\n"
               "for line in sys.stdin:\n    f.write(line); f.flush()\n", "lane/tail"],
        cwd=FS, stdin=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert writer.stdin is not None
    try:
        for n in range(3):
            writer.stdin.write(f"line {n}\n")
            writer.stdin.flush()
            want = "".join(f"line {i}\n" for i in range(n + 1))
            wait_for(lambda want=want: sh("n3", "cat lane/tail") == want, 10,
                     f"n3 to read line {n} while n2 keeps the file open")  # fmt: skip
    finally:
        writer.stdin.close()
        assert writer.wait(timeout=30) == 0
