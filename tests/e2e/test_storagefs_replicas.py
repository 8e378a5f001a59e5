"""Replicated storagefs files on a real 3-host cluster (issue 5, part 4).

A folder with `dunix fs replicas 2` keeps a second copy of every file created in it; when
the owner's agent is killed, a replica takes the file over and the other hosts read it
byte-identical. A file of an unreplicated folder on the dead host is EIO until its agent is
back, then its contents again.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys

import pytest

from tests.e2e.conftest import nodes_json, wait_for
from tests.e2e.test_storagefs_cluster import (  # the same cluster helpers
    FS,
    LOCAL_BITS,
    _dunix_cmd,
    hosts,  # noqa: F401 (a fixture)
    sh,
)

pytestmark = pytest.mark.e2e

FACTOR = "user.dunix.replicas"  # dunix.storagefs.replicas.FACTOR_XATTR
DUNIX = _dunix_cmd()


#: opens a file, reads 1 MiB, says "ready", waits for a line, reads the rest: sha256 of all
HOLD_OPEN = """
import hashlib, sys
with open(sys.argv[1], "rb") as f:
    h = hashlib.sha256(f.read(1 << 20))
    print("ready", flush=True)
    sys.stdin.readline()
    h.update(f.read())
print(h.hexdigest())
"""


def _agent(name: str) -> int:
    from dunix import cluster

    host = next(h for h in cluster.status() if h.name == name)
    assert host.agent_pid is not None
    return int(host.agent_pid)


def digest(host: str, path: str) -> str:
    """sha256 of a file read on ``host`` ('' when the read fails)."""
    out = sh(host, f"sha256sum {path} 2>/dev/null || true")
    return out.split()[0] if out.strip() else ""


def test_a_replica_takes_over_and_an_unreplicated_file_waits_for_its_owner(
    hosts: list[str],  # noqa: F811 (the fixture imported above)
) -> None:
    from dunix import cluster

    ids = {n["name"]: n["node_id"] for n in nodes_json("n1")}
    sh("n1", f"mkdir -p rep plain && {DUNIX} fs replicas 2 rep")
    # n1's folders show in the root's listing everywhere (a peer's root listing was refused)
    for name in hosts:
        assert {"rep", "plain"} <= set(sh(name, "ls").split())
    # the factor reached every host, and a file created on n1 gets a replica
    factor = f'{sys.executable} -c \'import os; print(os.getxattr("rep", "{FACTOR}").decode())\''
    for name in hosts:
        assert sh(name, factor).strip() == "2"
    sh("n1", "head -c 3145728 /dev/urandom > rep/data && echo one > rep/log && echo two >> rep/log")
    sh("n1", "echo alone > plain/single")
    want = digest("n1", "rep/data")
    where = json.loads(sh("n3", f"{DUNIX} fs where --json rep/data plain/single"))
    assert where[0]["node_id"] == ids["n1"] and len(where[0]["replicas"]) == 1, where
    assert where[1]["node_id"] == ids["n1"] and where[1]["replicas"] == [], where
    heir = where[0]["replicas"][0]["node_id"]
    assert heir in (ids["n2"], ids["n3"])
    assert "replica" in sh("n2", f"{DUNIX} fs where rep/data")

    # a reader in n3 holds the file open across the owner's death
    reader = cluster.exec_in(
        "n3", [sys.executable, "-c", HOLD_OPEN, f"{FS}/rep/data"], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert reader.stdout is not None and reader.stdout.readline() == "ready\n"

    os.kill(_agent("n1"), signal.SIGKILL)
    # once n1 is declared dead, its replica owns the file and serves it
    wait_for(lambda: digest("n3", "rep/data") == want, 40, "n3 reads rep/data from the replica")
    out, err = reader.communicate("go\n", timeout=30)
    assert out.strip() == want, err
    assert digest("n2", "rep/data") == want
    assert sh("n3", "cat rep/log") == "one\ntwo\n"
    owner = int(sh("n3", "stat -c %i rep/data").strip()) >> LOCAL_BITS
    assert owner == heir
    # the replica is a full owner now: writes work
    sh("n2", "echo three >> rep/log")
    assert sh("n3", "cat rep/log") == "one\ntwo\nthree\n"
    out = sh("n3", "cat plain/single 2>&1 || true")
    assert os.strerror(errno.EIO) in out, out

    # the heir copies the file whole to the host left, so there are two copies again
    def copies() -> list[int]:
        got = json.loads(sh("n3", f"{DUNIX} fs where --json rep/data"))
        return [r["node_id"] for r in got["replicas"]]

    wait_for(lambda: copies() == [({ids["n2"], ids["n3"]} - {heir}).pop()], 20,
             "a new replica of rep/data")  # fmt: skip

    cluster.start_agent("n1")
    wait_for(lambda: FS in sh("n1", "cat /proc/self/mountinfo", cwd="/"), 10, "n1 mounted again")
    wait_for(lambda: sh("n3", "cat plain/single 2>/dev/null || true") == "alone\n", 40,
             "n1's unreplicated file back on n3")  # fmt: skip
    # n1 drops its stale copy of the file the replica took over, and reads the new owner's
    wait_for(lambda: sh("n1", "cat rep/log 2>/dev/null || true") == "one\ntwo\nthree\n", 30,
             "n1 reads the taken-over file from its new owner")  # fmt: skip
    assert digest("n1", "rep/data") == want
    assert int(sh("n1", "stat -c %i rep/data").strip()) >> LOCAL_BITS == heir


def test_files_already_in_a_folder_get_replicas_when_it_gets_a_factor(
    hosts: list[str],  # noqa: F811 (the fixture imported above)
) -> None:
    sh("n2", "mkdir -p before/deep && echo early > before/deep/note"
             " && head -c 1048577 /dev/urandom > before/blob")  # fmt: skip
    where = json.loads(sh("n1", f"{DUNIX} fs where --json before/blob before/deep/note"))
    assert [row["replicas"] for row in where] == [[], []], where
    want = digest("n2", "before/blob")
    sh("n1", f"{DUNIX} fs replicas 2 before")  # set on another host than the files' owner

    def replicated() -> bool:
        rows = json.loads(sh("n3", f"{DUNIX} fs where --json before/blob before/deep/note"))
        return all(len(row["replicas"]) == 1 for row in rows)

    wait_for(replicated, 30, "replicas of the files that were there before")
    from dunix import cluster

    os.kill(_agent("n2"), signal.SIGKILL)  # the owner dies: its replicas serve both files
    wait_for(lambda: digest("n3", "before/blob") == want, 40, "n3 reads before/blob")
    assert sh("n1", "cat before/deep/note") == "early\n"
    cluster.start_agent("n2")
    wait_for(lambda: FS in sh("n2", "cat /proc/self/mountinfo", cwd="/"), 10, "n2 mounted again")
