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
from collections.abc import Callable, Iterator
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


@contextlib.contextmanager
def exclusive_cluster() -> Iterator[None]:
    """There is one simulated cluster per machine: test runs that use it take turns."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="module")
def cluster3() -> Iterator[list[Any]]:
    """A real 3-host cluster with 0.5-CPU quotas, torn down afterwards."""
    require_root()
    from dunix import cluster

    with exclusive_cluster():
        cluster.down()  # leftovers of an earlier crashed run
        try:
            hosts = cluster.up(3, 0.5)
            yield hosts
        finally:
            keep_logs()
            cluster.down()


def keep_logs() -> None:
    """The agents' logs outlive the cluster, for whoever reads a failure."""
    LOGS.mkdir(parents=True, exist_ok=True)
    for log in Path("/run/dunix/hosts").glob("*/agent.log"):
        shutil.copy(log, LOGS / f"{log.parent.name}.log")
