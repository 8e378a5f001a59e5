"""Post-copy `dunix migrate` (issue 4, part 3): a guest with ~200 MiB of touched memory
moves between peers with lazy pages; its memory (a checksum over all of it) and its
pipes (stdin and stdout through its home's deputy) come through whole; a target that
refuses lazy pages gets it by the plain streamed dump instead. Then its page
server is killed in the middle of a second post-copy move: the process is lost, and
`dunix run` reports it killed by SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from tests.e2e.conftest import (
    DUNIX,
    MEMORY_HOLDER,
    dunix,
    reap,
    running_cluster,
    shared_folder,
    wait_for,
)

pytestmark = pytest.mark.e2e

WORK = Path("/var/tmp/dunix-e2e-migrate-lazy")
N1 = "/run/dunix/hosts/n1/control.sock"
LAZY_KNOB = "migrate-fail-lazy"  # dunix/agent/migration.py FAIL_LAZY_KNOB

# MEMORY_HOLDER, then it answers lines on stdin: "check" prints the checksum again (every
# page read), anything else is echoed; EOF ends it with 5.
HOLDER = MEMORY_HOLDER + textwrap.dedent(
    """\
    for line in sys.stdin:
        if line.strip() == "check":
            print("sum", hashlib.sha256(data).hexdigest(), flush=True)
        else:
            print("echo", line.strip(), flush=True)
    sys.exit(5)
    """
)


@pytest.fixture(scope="module")
def cluster3() -> Iterator[list[Any]]:
    if int(Path("/proc/sys/fs/pipe-max-size").read_text()) < 4 << 20:
        pytest.fail("post-copy needs fs.pipe-max-size >= 4 MiB: scripts/setup.sh raises it")
    shared_folder(WORK)
    with running_cluster(3, quota=None, alive_from="n1") as hosts:
        yield hosts


def deputy() -> dict[str, Any] | None:
    procs = json.loads(dunix("ps", "--json", "--control", N1).stdout)
    found = [p for p in procs if p["home"] == "n1" and p["node"] not in ("", "n1")]
    return found[0] if found else None


def line(out: IO[bytes]) -> str:
    got = b""
    while not got.endswith(b"\n"):
        byte = os.read(out.fileno(), 1)
        if not byte:
            break
        got += byte
    return got.decode().strip()


def start(mib: int, fill: bool) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*DUNIX, "run", "--control", N1, "--placement", "remote", "--",
         "/usr/bin/python3", "-c", HOLDER, str(mib), "1" if fill else "0"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=WORK,
    )  # fmt: skip


def ask(run: subprocess.Popen[bytes], text: str) -> str:
    assert run.stdin is not None and run.stdout is not None
    run.stdin.write(text.encode() + b"\n")
    run.stdin.flush()
    return line(run.stdout)


def test_post_copy_keeps_memory_and_pipes(cluster3: list[Any]) -> None:
    run = start(200, fill=True)
    try:
        assert run.stdout is not None
        first = line(run.stdout)
        assert first.startswith("sum "), first
        proc = wait_for(deputy, 30, "the holder running on a peer")
        gpid, node = proc["gpid"], proc["node"]
        assert ask(run, "before") == "echo before"
        to = "n3" if node == "n2" else "n2"
        out = dunix("migrate", str(gpid), to, "--control", N1, timeout=90)
        assert f"moved {node} -> {to}" in out.stdout, out.stdout
        assert "post-copy" in out.stdout, out.stdout  # not the plain dump
        assert ask(run, "check") == first  # every page came, unchanged
        assert ask(run, "after") == "echo after"
        moved = wait_for(deputy, 10, "the holder seen on its new node")
        assert moved["node"] == to and moved["moves"] == 1
        # lazy pages refused by the next target (as without userfaultfd): the move
        # falls back to the plain streamed dump
        knob = Path(f"/run/dunix/hosts/{node}/{LAZY_KNOB}")
        knob.touch()
        try:
            out = dunix("migrate", str(gpid), node, "--control", N1, timeout=90)
        finally:
            knob.unlink()
        assert f"moved {to} -> {node}" in out.stdout and "source killed" in out.stdout, out.stdout
        assert ask(run, "check") == first
        assert ask(run, "back") == "echo back"
        run.stdin.close()  # type: ignore[union-attr]
        assert run.wait(timeout=30) == 5
    finally:
        reap(run)


def test_an_exit_during_post_copy_keeps_its_status(cluster3: list[Any]) -> None:
    """The guest ends while its pages still arrive: its parent sees its own exit code,
    not the SIGKILL of a lost process (the daemon waits for the answers in flight)."""
    run = start(1024, fill=False)
    try:
        assert run.stdout is not None and run.stdin is not None
        assert line(run.stdout).startswith("sum ")
        proc = wait_for(deputy, 30, "the holder running on a peer")
        gpid, node = proc["gpid"], proc["node"]
        to = "n3" if node == "n2" else "n2"
        out = dunix("migrate", str(gpid), to, "--control", N1, timeout=90)
        assert "post-copy" in out.stdout, out.stdout
        run.stdin.close()  # 1 GiB takes about a second to follow: it ends before
        assert run.wait(timeout=60) == 5
    finally:
        reap(run)


def page_servers(host: Any) -> list[int]:
    """Pids (as the machine sees them) of criu dumps running in ``host``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            same_ns = os.readlink(entry / "ns/pid") == os.readlink(f"/proc/{host.init_pid}/ns/pid")
        except OSError:
            continue
        if same_ns and argv[0].startswith(b"criu: dump"):  # criu sets its proctitle
            found.append(int(entry.name))
    return found


def test_a_dead_page_server_loses_the_process(cluster3: list[Any]) -> None:
    run = start(2048, fill=False)  # pages take ~2 s to follow: the kill lands first
    try:
        assert run.stdout is not None
        assert line(run.stdout).startswith("sum ")
        proc = wait_for(deputy, 30, "the holder running on a peer")
        gpid, node = proc["gpid"], proc["node"]
        source = next(h for h in cluster3 if h.name == node)
        to = "n3" if node == "n2" else "n2"
        mover = subprocess.Popen(
            [*DUNIX, "migrate", str(gpid), to, "--control", N1],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        # the source's criu serves pages after the restore: kill it once the move
        # reported, before 2 GiB could have been pulled (~0.9 GB/s, bench/migrate_bench.py)
        out, err = mover.communicate(timeout=90)
        pids = page_servers(source)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        assert mover.returncode == 0, f"the move failed before its page server was killed: {err}"
        assert "post-copy" in out, out
        assert pids, "no criu dump serving pages on the source after the move"
        assert run.wait(timeout=60) == 128 + signal.SIGKILL or run.returncode == -signal.SIGKILL
    finally:
        reap(run)
