"""Peers' file contents over the bulk lane (dunix/storagefs/bulk.py) on a real 3-host
cluster: what n2 and n3 read and write of n1's file moves over their own TLS connections to
n1's lane, and stays coherent with what the owner and the other hosts see."""

from __future__ import annotations

import hashlib
import os
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
