"""A process holding a TCP or unix stream connection moves; the connection carries on.

The client (a child of a shell in a `dunix run --node n1 --placement local` job) connects
to a server this test runs outside the job: TCP on the bridge's address (the machine's
side, 10.213.0.254), or a unix socket in a folder every host sees. It answers each line
the server sends with the line in upper case and the host it runs on. It is moved n1 → n2
(a move from home: the connection stays in n1, relayed to a socketpair in n2): the server
keeps talking to it over the same connection, both ways, sees it answer from n2, and sees
EOF when it closes. Before that, a move whose restore fails on the target (injected)
leaves it running in n1 with its connection; after it, it moves on n2 → n3 (the
connection still relayed through n1) while 300 lines it has not read yet are on their
way: every answer comes once, in order. Back home is refused, with the reason.
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import DUNIX, dunix, ps_json, reap, running_cluster, shared_folder, wait_for

pytestmark = pytest.mark.e2e

WORK = Path("/var/tmp/dunix-e2e-migrate-sockets")  # seen by every host (/tmp is per host)
N1 = "/run/dunix/hosts/n1/control.sock"
BRIDGE = "10.213.0.254"  # the machine's address on the cluster's bridge
CLONE_NEWNET = 0x40000000
LINES = 1000  # written while it moves n2 → n3 (about 2 s)
KNOB = "migrate-fail-restore"  # dunix/agent/migration.py FAIL_RESTORE_KNOB

CLIENT = """
import socket, sys
kind, where = sys.argv[1], sys.argv[2]
if kind == "tcp":
    host, port = where.rsplit(":", 1)
    s = socket.create_connection((host, int(port)))
else:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(where)
f = s.makefile("rwb")
for line in f:
    if line.strip() == b"bye":
        break
    f.write(line.strip().upper() + b" " + socket.gethostname().encode() + b"\\n")
    f.flush()
f.write(b"done\\n")
f.flush()
s.shutdown(socket.SHUT_WR)
print("client ends", flush=True)
sys.exit(3)
"""
JOB = '/usr/bin/python3 -c "$1" "$2" "$3" & c=$!; wait $c; echo status=$?'


@pytest.fixture(scope="module")
def hosts() -> Iterator[list[Any]]:
    shared_folder(WORK)
    with running_cluster(3, alive_from="n1") as up:
        yield up


def ps() -> list[dict[str, Any]]:
    return ps_json(N1)


def listener(kind: str, host: Any) -> tuple[socket.socket, str]:
    """The server's listening socket: TCP on the bridge, or a unix socket made in the
    client's host's network namespace (CRIU looks a unix socket's peer up with sock_diag,
    which sees one namespace: a peer in another one fails the dump)."""
    if kind == "tcp":
        srv = socket.socket()
        srv.bind((BRIDGE, 0))
        return srv, f"{BRIDGE}:{srv.getsockname()[1]}"
    path = WORK / f"srv-{os.getpid()}.sock"
    path.unlink(missing_ok=True)
    made: list[socket.socket] = []

    def make() -> None:  # setns(CLONE_NEWNET) changes the calling thread only
        with open(f"/proc/{host.init_pid}/ns/net") as ns:  # os.setns is 3.12+
            if ctypes.CDLL(None, use_errno=True).setns(ns.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        made.append(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))

    thread = threading.Thread(target=make)
    thread.start()
    thread.join()
    srv = made[0]
    srv.bind(str(path))
    os.chmod(path, 0o777)
    return srv, str(path)


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_a_connection_carries_on_across_a_move(hosts: list[Any], kind: str) -> None:
    srv, where = listener(kind, next(h for h in hosts if h.name == "n1"))
    srv.listen(1)
    srv.settimeout(30)
    run = subprocess.Popen(
        [*DUNIX, "run", "--node", "n1", "--control", N1, "--placement", "local", "--",
         "sh", "-c", JOB, "sh", CLIENT, kind, where],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=WORK,
    )  # fmt: skip
    conn: socket.socket | None = None
    try:
        conn, _ = srv.accept()
        conn.settimeout(30)
        f = conn.makefile("rwb")

        def ask(word: str) -> bytes:
            f.write(word.encode() + b"\n")
            f.flush()
            return f.readline()

        assert ask("before") == b"BEFORE n1\n"

        def client() -> dict[str, Any] | None:
            found = [p for p in ps() if p["cmd"].startswith("/usr/bin/python3 -c")]
            return found[0] if found else None

        gpid = wait_for(client, 20, "the client in ps")["gpid"]
        # an injected restore failure on the target: it runs on at home, connection and all
        knob = Path(f"/run/dunix/hosts/n2/{KNOB}")
        knob.touch()
        try:
            failed = dunix("migrate", str(gpid), "n2", "--control", N1, check=False, timeout=90)
        finally:
            knob.unlink()
        assert failed.returncode == 1 and "restore" in failed.stderr, failed.stderr
        assert ask("home") == b"HOME n1\n"
        # bytes the server sent while it was frozen arrive once, after the move
        f.write(b"during\n")
        f.flush()
        moved = dunix("migrate", str(gpid), "n2", "--control", N1, timeout=90)
        print(moved.stdout)
        now = [p for p in ps() if p["gpid"] == gpid]
        assert now and now[0]["node"] == "n2" and now[0]["state"] == "deputy", now
        assert f.readline() in (b"DURING n1\n", b"DURING n2\n")  # before or after the freeze
        assert ask("after") == b"AFTER n2\n"
        assert ask("x" * 1_000_000) == b"X" * 1_000_000 + b" n2\n"  # several relay chunks

        # on to n3 (its connection still relayed through n1) while the server writes: lines
        # it had not read yet in n2 (its socket's queue, the relay's) are answered once,
        # in order, from n3
        def lines() -> None:
            for i in range(LINES):
                f.write(b"w%d\n" % i)
                f.flush()
                time.sleep(0.002)

        writer = threading.Thread(target=lines)
        writer.start()
        dunix("migrate", str(gpid), "n3", "--control", N1, timeout=90)
        writer.join()
        answers = [f.readline().split() for _ in range(LINES)]
        assert [a[0] for a in answers] == [b"W%d" % i for i in range(LINES)]
        assert {a[1] for a in answers} <= {b"n2", b"n3"}
        assert ask("third") == b"THIRD n3\n"
        now = [p for p in ps() if p["gpid"] == gpid]
        assert now and now[0]["node"] == "n3" and now[0]["moves"] == 2, now
        # not back home: what was relayed to it unread cannot go back into the connection
        again = dunix("migrate", str(gpid), "home", "--control", N1, check=False, timeout=90)
        assert again.returncode == 1 and "cannot move home" in again.stderr, again
        assert ask("still") == b"STILL n3\n"
        assert ask("bye") == b"done\n"
        assert f.readline() == b""  # its shutdown(SHUT_WR) reached the server: EOF
        out, err = run.communicate(timeout=60)
    finally:
        if conn is not None:
            conn.close()
        srv.close()
        reap(run)
    assert out.decode().split("\n")[-3:] == ["client ends", "status=3", ""], err.decode()
    assert run.returncode == 0, err.decode()


def test_a_guest_holding_a_socket_is_refused_before_freezing(hosts: list[Any]) -> None:
    """A process execed on a peer that then connects: its connection is on the peer, not
    at home, so nothing relays it; the move is refused with the reason and it runs on."""
    srv, where = listener("tcp", None)
    srv.listen(1)
    srv.settimeout(30)
    run = subprocess.Popen(
        [*DUNIX, "run", "--control", N1, "--placement", "remote", "--",
         "/usr/bin/python3", "-c", CLIENT, "tcp", where],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=WORK,
    )  # fmt: skip
    conn: socket.socket | None = None
    try:
        conn, _ = srv.accept()
        conn.settimeout(30)
        f = conn.makefile("rwb")
        f.write(b"there\n")
        f.flush()
        assert f.readline() == b"THERE n2\n"
        gpid = next(p["gpid"] for p in ps() if p["state"] == "deputy")
        refused = dunix("migrate", str(gpid), "home", "--control", N1, check=False, timeout=90)
        assert refused.returncode == 1, refused.stdout
        assert "holds a socket away from home" in refused.stderr, refused.stderr
        f.write(b"bye\n")
        f.flush()
        assert f.readline() == b"done\n"
        _, err = run.communicate(timeout=60)
    finally:
        if conn is not None:
            conn.close()
        srv.close()
        reap(run)
    assert run.returncode == 3, err.decode()
