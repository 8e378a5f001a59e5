"""CRIU as installed by scripts/setup.sh: `criu check`, pycriu, and a TCP dump/restore.

The dump/restore runs in the machine's own namespaces: the restored process keeps its PID,
so the dumped original must be gone (and reaped) first. ``rst_sibling`` makes criu swrk
restore the tree as a sibling of itself, i.e. as a child of this test process, so the test
can ``waitpid`` it and kill it at the end.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.criu_helpers import criu_check, images_dir_fd, log_tail, new_criu, require_root

pytestmark = pytest.mark.e2e

# Connects to the test's listener and echoes until EOF. stdio is /dev/null or a log file,
# which CRIU restores by path; setsid makes it a session leader, so no shell_job is needed.
ECHO_CHILD = textwrap.dedent(
    """
    import socket, sys
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    while True:
        data = s.recv(65536)
        if not data:
            break
        s.sendall(data)
    """
)


def test_criu_check_passes() -> None:
    proc = criu_check()
    assert proc.returncode == 0, f"criu check failed:\n{proc.stdout}{proc.stderr}"


def test_pycriu_imports() -> None:
    import pycriu

    opts = pycriu.rpc.criu_opts(images_dir_fd=-1, tcp_established=True)
    assert opts.tcp_established


def echo(conn: socket.socket, payload: bytes) -> bytes:
    conn.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = conn.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


@contextlib.contextmanager
def restored_child(pid: int) -> Iterator[int]:
    """Kill and reap a restored process (our child thanks to rst_sibling) at the end."""
    try:
        yield pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def test_tcp_connection_survives_dump_and_restore(tmp_path: Path) -> None:
    require_root()
    images = tmp_path / "images"
    child_log = tmp_path / "child.log"

    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
        port = listener.getsockname()[1]
        out = stack.enter_context(child_log.open("wb"))
        child = subprocess.Popen(
            [sys.executable, "-c", ECHO_CHILD, str(port)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
        stack.callback(child.kill)  # no-op once the dump has killed it
        listener.settimeout(10)
        conn, _ = listener.accept()
        stack.enter_context(conn)
        conn.settimeout(10)
        assert echo(conn, b"before dump") == b"before dump", log_tail(child_log)

        fd = stack.enter_context(images_dir_fd(images))
        dumper = new_criu(fd, "dump.log")
        dumper.opts.pid = child.pid
        dumper.opts.tcp_established = True
        try:
            dumper.dump()
        except Exception as exc:
            pytest.fail(f"criu dump failed: {exc}\n{log_tail(images / 'dump.log')}")

        # The dump kills the original; reap it so its PID is free for the restore.
        assert child.wait(timeout=10) == -signal.SIGKILL
        started = time.monotonic()
        restorer = new_criu(fd, "restore.log")
        restorer.opts.tcp_established = True
        restorer.opts.rst_sibling = True
        try:
            resp = restorer.restore()
        except Exception as exc:
            pytest.fail(f"criu restore failed: {exc}\n{log_tail(images / 'restore.log')}")
        pid = stack.enter_context(restored_child(resp.pid))
        assert pid == child.pid, "a restored process keeps its PID"
        restore_s = time.monotonic() - started

        payload = b"after restore " * 1000
        assert echo(conn, payload) == payload, log_tail(child_log)

        # Closing our end makes the restored child see EOF and exit 0: it is our child.
        conn.shutdown(socket.SHUT_WR)
        waited, status = os.waitpid(pid, 0)
        assert waited == pid
        assert os.waitstatus_to_exitcode(status) == 0, log_tail(child_log)
        assert restore_s < 10
