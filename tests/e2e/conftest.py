"""Fixtures for end-to-end tests on a real simulated cluster (root only)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DUNIX = [sys.executable, "-m", "dunix"]
LOCK = Path("/run/dunix-tests.lock")
LOGS = Path("/var/tmp/dunix-e2e-logs")


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: simulated hosts are namespaces, veths and cgroups")
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        pytest.fail("util-linux unshare/nsenter missing: scripts/setup.sh installs them")


def dunix(*args: str, check: bool = True, timeout: float = 30, **kw: Any) -> Any:
    """Run the CLI as a user would; returns the CompletedProcess."""
    kw.setdefault("cwd", REPO)
    proc = subprocess.run([*DUNIX, *args], capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"dunix {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc


def nodes_json(host: str) -> list[dict[str, Any]]:
    out = dunix("nodes", "--json", "--control", f"/run/dunix/hosts/{host}/control.sock")
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def reap(run: subprocess.Popen[Any]) -> None:
    """End a job's client that is still running (the test failed before it ended)."""
    if run.poll() is None:
        run.kill()
        run.wait()


def shared_folder(path: Path) -> Path:
    """``path`` made, writable by every job user: a folder under /var/tmp, which every
    simulated host sees (a host's /tmp is its own)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o777)
    return path


def ps_json(control: str) -> list[dict[str, Any]]:
    """`dunix ps --json` through one host's control socket."""
    return json.loads(dunix("ps", "--json", "--control", control).stdout)  # type: ignore[no-any-return]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll until ``predicate`` is truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (AssertionError, json.JSONDecodeError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def cli_as(
    uid: int, gid: int, args: list[str], *, cwd: str = "/", timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``dunix ARGS`` as another user, as a ``CompletedProcess`` with text output.

    The client runs in a forked copy of this process that drops to ``uid``/``gid`` after
    dunix is imported: a checkout in a private folder (``mktemp -d`` makes it 0700) is
    unreadable to that user, so ``python -m dunix`` under ``setpriv`` could not start.
    The job it starts runs as ``uid`` all the same: the agent takes it from SO_PEERCRED."""
    import importlib
    import select
    import traceback

    from dunix import cli

    # the user may not read this Python's own library either (under /root, say): load
    # what the CLI imports lazily while still root
    for name in ("dunix.client", "dunix.pid", "dunix.pid.devino", "pwd", "grp", "termios"):
        importlib.import_module(name)

    # pipes, as a shell gives: a job may not reopen a file of this machine's private /tmp
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 70
        try:
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            for fd in (out_r, out_w, err_r, err_w):
                os.close(fd)
            # pytest swapped sys.stdout/stderr for its capture: write to the fds again
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            os.chdir(cwd)
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            code = cli.main(args)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(out_w)
    os.close(err_w)
    got: dict[int, bytes] = {out_r: b"", err_r: b""}
    open_fds = [out_r, err_r]
    deadline = time.monotonic() + timeout
    try:
        while open_fds:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, 9)
                raise AssertionError(f"dunix {args} as uid {uid}: no end in {timeout}s")
            ready, _, _ = select.select(open_fds, [], [], left)
            for fd in ready:
                data = os.read(fd, 65536)
                if data:
                    got[fd] += data
                else:
                    open_fds.remove(fd)
    finally:
        os.close(out_r)
        os.close(err_r)
        _, status = os.waitpid(pid, 0)
    return subprocess.CompletedProcess(
        args, os.waitstatus_to_exitcode(status), got[out_r].decode(), got[err_r].decode()
    )


@contextlib.contextmanager
def exclusive_cluster() -> Iterator[None]:
    """There is one simulated cluster per machine: test runs that use it take turns."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


#: a migration test's process: prints 1, 2, 3 ... until the file argv[1] exists, then
#: "end" and exit status 7 (a move that lost or repeated work shows in its output)
#: the start of a program holding memory for a move: MIB MiB touched (random bytes when
#: FILL is 1, else one byte a page) from argv 1 and 2, then their checksum printed
MEMORY_HOLDER = """\
import hashlib, os, random, sys, time
mib, fill = int(sys.argv[1]), sys.argv[2] == "1"
if fill:
    data = bytearray(random.Random(7).randbytes(mib << 20))
else:
    data = bytearray(mib << 20)
    for i in range(0, len(data), 4096):
        data[i] = 1
print("sum", hashlib.sha256(data).hexdigest(), flush=True)
"""

COUNTER = """
import os, sys, time
stop, i = sys.argv[1], 0
while not os.path.exists(stop):
    i += 1
    print(i, flush=True)
    time.sleep(0.01)
print("end", flush=True)
sys.exit(7)
"""


@contextlib.contextmanager
def running_cluster(
    n: int, quota: float | None = 0.5, agent_argv: Any = None, *, alive_from: str = ""
) -> Iterator[list[Any]]:
    """A real n-host cluster, held under the machine's lock and torn down afterwards
    (agent logs kept); with ``alive_from``, once that host (and then every other) lists
    every host alive with its load."""
    require_root()
    from dunix import cluster

    with exclusive_cluster():
        cluster.down()  # leftovers of an earlier crashed run
        try:
            hosts = cluster.up(n, quota, agent_argv=agent_argv)
            if alive_from:
                names = {h.name for h in hosts}

                def all_alive(host: str) -> bool:
                    control = f"/run/dunix/hosts/{host}/control.sock"
                    view = json.loads(dunix("nodes", "--json", "--control", control).stdout)
                    states = {v["name"]: v["state"] for v in view}
                    return states == dict.fromkeys(names, "alive") and all(
                        v["mem_free"] > 0
                        for v in view  # a load report (CPU features) heard
                    )

                # every host's view: a move's source may be any of them (a peer that had not
                # heard n3's load yet refused to move there: "n3 lacks CPU features ...")
                order = [alive_from, *sorted(names - {alive_from})]
                wait_for(lambda: all(all_alive(h) for h in order), 20, f"{n} alive agents")
            yield hosts
        finally:
            keep_logs()
            cluster.down()


@pytest.fixture(scope="module")
def cluster3() -> Iterator[list[Any]]:
    """A real 3-host cluster with 0.5-CPU quotas, torn down afterwards."""
    with running_cluster(3) as hosts:
        yield hosts


def keep_logs() -> None:
    """The agents' logs outlive the cluster, for whoever reads a failure."""
    LOGS.mkdir(parents=True, exist_ok=True)
    for log in Path("/run/dunix/hosts").glob("*/agent.log"):
        shutil.copy(log, LOGS / f"{log.parent.name}.log")


LOG_TAIL = 40  # lines of each agent's log shown under a failed test


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    """A failed e2e test shows the tail of every agent's log (the cluster is still up while
    the test's call phase is reported): a failure seen once in CI can be read afterwards."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    for log in sorted(Path("/run/dunix/hosts").glob("*/agent.log")):
        with contextlib.suppress(OSError):
            lines = log.read_text(errors="replace").splitlines()[-LOG_TAIL:]
            report.sections.append((f"agent log {log.parent.name} (tail)", "\n".join(lines)))
