"""Per-host CPU quota cgroups, for cgroup v1 and v2.

The mode is chosen once, here: v2 when ``/sys/fs/cgroup`` is itself a cgroup2 mount
(``cgroup.controllers`` exists there), otherwise v1 with the ``cpu`` hierarchy and, when it
is mounted separately, the ``cpuacct`` one (so the host's usage is accounted on its own).
Every host gets ``<hierarchy>/dunix/NAME``.

v1: ``cpu.cfs_period_us`` / ``cpu.cfs_quota_us`` (-1 = no limit);
v2: ``cpu.max`` = "QUOTA PERIOD" or "max PERIOD", with ``+cpu`` enabled in the parents'
``cgroup.subtree_control`` (Documentation/admin-guide/cgroup-v2.rst, "CPU").
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import signal
import time
import zlib
from pathlib import Path

from dunix.errors import ClusterError

CGROUP_ROOT = Path("/sys/fs/cgroup")
GROUP = "dunix"
#: The CFS period. A host over its quota runs the quota's worth of each period, then
#: nothing until the next: with the kernel's default 100 ms, a 0.5-CPU host froze for up
#: to 50 ms, which a slower CPU (what the quota stands for) never does: the p99 of a
#: remote /bin/true was 34 ms and of a plain local fork+exec 51. Measured side by side
#: (bench/run_bench.py, 3 hosts x 0.5 CPU, 2 runs each, interleaved): 100 ms p50 6.1/5.7,
#: p99 34.7/33.9; 50 ms p50 6.8/7.5, p99 24.5/21.4; 25 ms p50 7.0/5.6, p99 17.7/16.2
#: (local fork+exec p99 15/14), the fork-heavy script 1.32-1.38x plain bash at all three;
#: an earlier 10 ms gave p50 7.4 and fork-heavy 1.53x (throttling that often costs).
#: So 25 ms: stalls of at most 12.5 ms, the medians within the runs' spread.
PERIOD_US = 25_000
#: overrides PERIOD_US (for measuring other periods); read when a host is created
PERIOD_ENV = "DUNIX_CFS_PERIOD_US"
#: the kernel's lower bound for cfs_quota_us (kernel/sched/core.c, min_cfs_quota_period)
MIN_QUOTA_US = 1_000


def detect_mode() -> str:
    """ "v2" or "v1"; raises ClusterError when no usable cpu controller is mounted."""
    controllers = CGROUP_ROOT / "cgroup.controllers"
    if controllers.exists():
        if "cpu" not in controllers.read_text().split():
            raise ClusterError(f"the cgroup v2 cpu controller is not available in {controllers}")
        return "v2"
    if (CGROUP_ROOT / "cpu" / "cpu.cfs_quota_us").exists():
        return "v1"
    raise ClusterError("no cgroup cpu controller found under /sys/fs/cgroup (v1 cpu or v2)")


def hierarchies(mode: str) -> list[Path]:
    """The roots a host cgroup is created under, in creation order."""
    if mode == "v2":
        return [CGROUP_ROOT]
    roots = [CGROUP_ROOT / "cpu"]
    acct = CGROUP_ROOT / "cpuacct"
    # "cpu,cpuacct" co-mounted shows up as symlinks to one directory: count it once.
    if acct.is_dir() and acct.resolve() != roots[0].resolve():
        roots.append(acct)
    return roots


def host_paths(mode: str, name: str) -> list[Path]:
    return [root / GROUP / name for root in hierarchies(mode)]


def period_us() -> int:
    """The CFS period of every host: PERIOD_US unless the environment says otherwise."""
    raw = os.environ.get(PERIOD_ENV)
    if not raw:
        return PERIOD_US
    try:
        period = int(raw)
    except ValueError:
        raise ClusterError(f"{PERIOD_ENV} must be microseconds, got {raw!r}") from None
    if not 1_000 <= period <= 1_000_000:  # the kernel's bounds for cfs_period_us
        raise ClusterError(f"{PERIOD_ENV} must be within 1000..1000000, got {period}")
    return period


def quota_us(cpu_quota: float | None) -> int | None:
    """The quota in microseconds per period_us(), or None for no limit."""
    if cpu_quota is None:
        return None
    if cpu_quota <= 0:
        raise ClusterError(f"cpu quota must be positive, got {cpu_quota}")
    return max(MIN_QUOTA_US, round(cpu_quota * period_us()))


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as e:
        raise ClusterError(f"cannot write {value!r} to {path}: {e}") from e


def create(mode: str, name: str, cpu_quota: float | None) -> list[Path]:
    """Make the host's cgroup(s) and set the quota; returns their paths."""
    paths = host_paths(mode, name)
    quota, period = quota_us(cpu_quota), period_us()
    for path in paths:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ClusterError(f"cannot create cgroup {path}: {e}") from e
        if mode == "v2":
            _enable_cpu_v2(path)
            _write(path / "cpu.max", f"{quota if quota is not None else 'max'} {period}")
        elif (path / "cpu.cfs_quota_us").exists():
            _write(path / "cpu.cfs_period_us", str(period))
            _write(path / "cpu.cfs_quota_us", str(quota if quota is not None else -1))
    return paths


def _enable_cpu_v2(path: Path) -> None:
    """Enable the cpu controller from the root down to ``path``'s parent."""
    parent = path.parent
    chain: list[Path] = []
    while parent != CGROUP_ROOT.parent and CGROUP_ROOT in (parent, *parent.parents):
        chain.append(parent)
        parent = parent.parent
    for cg in reversed(chain):
        control = cg / "cgroup.subtree_control"
        if "cpu" in control.read_text().split():
            continue
        _write(control, "+cpu")


def procs_file(path: Path) -> Path:
    return path / "cgroup.procs"


def pids(paths: list[Path]) -> set[int]:
    """Every process in the host's cgroup(s), seen from the machine."""
    found: set[int] = set()
    for path in paths:
        try:
            text = procs_file(path).read_text()
        except FileNotFoundError:
            continue
        except OSError as e:
            raise ClusterError(f"cannot read {procs_file(path)}: {e}") from e
        found.update(int(line) for line in text.split())
    return found


def join_self(paths: list[str]) -> None:
    """Move the calling process into the cgroups, on the host's CPUs (``host_cpus``);
    safe to run in a ``preexec_fn``.

    Uses only ``os`` calls so it is fine between fork and exec; children forked
    afterwards (the init, the agent and everything they start) inherit both.
    """
    pid = str(os.getpid()).encode()
    for path in paths:
        fd = os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY)
        try:
            os.write(fd, pid)
        finally:
            os.close(fd)
    cpus = host_cpus(paths[0]) if paths else None
    if cpus:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, cpus)


def _read(path: str) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 256).decode()
    finally:
        os.close(fd)


def host_cpus(path: str) -> set[int] | None:
    """The CPUs a host with a quota runs on: as many as the quota needs, rounded up (a
    0.5-CPU host gets one), hosts spread over the machine's CPUs by their number; None
    when it needs them all or has no quota. A small host is a host with fewer cores, not
    one whose processes hop between all of the machine's: on two CPUs a traced fork-heavy
    script cost 1.29x plain bash (1.18 s of CPU against 0.91), each ptrace stop waking the
    tracer on the other CPU, and 1.04x with the tracer and its job on one (same host, same
    quota, best of 3)."""
    try:
        if os.path.exists(os.path.join(path, "cpu.max")):  # v2
            quota_s, period_s = _read(os.path.join(path, "cpu.max")).split()
        else:
            quota_s = _read(os.path.join(path, "cpu.cfs_quota_us")).strip()
            period_s = _read(os.path.join(path, "cpu.cfs_period_us")).strip()
        if quota_s in ("max", "-1"):
            return None
        need = math.ceil(int(quota_s) / int(period_s))
        allowed = sorted(os.sched_getaffinity(0))
    except (OSError, ValueError):
        return None
    if need >= len(allowed):
        return None
    name = os.path.basename(os.path.normpath(path))
    number = re.search(r"(\d+)$", name)
    index = int(number.group(1)) - 1 if number else zlib.crc32(name.encode())
    start = index * need
    return {allowed[(start + k) % len(allowed)] for k in range(need)}


def kill_all(paths: list[Path], timeout: float = 5.0) -> None:
    """SIGKILL everything in the cgroups until they are empty."""
    deadline = time.monotonic() + timeout
    for path in paths:
        kill_file = path / "cgroup.kill"  # v2, kernel >= 5.14
        if kill_file.exists():
            with contextlib.suppress(OSError):
                kill_file.write_text("1")
    while True:
        left = pids(paths)
        if not left:
            return
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise ClusterError(f"processes {sorted(left)} survive SIGKILL in {paths}")
        time.sleep(0.02)


def remove(paths: list[Path], timeout: float = 5.0) -> None:
    """Kill what is left in the cgroups and delete them (and an empty ``dunix`` parent).

    rmdir fails with EBUSY while a dying task is still attached; retry until it is gone.
    """
    kill_all([p for p in paths if p.exists()], timeout)
    for path in paths:
        deadline = time.monotonic() + timeout
        while True:
            try:
                path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise ClusterError(f"cannot remove cgroup {path}: {e}") from e
                time.sleep(0.02)
        remove_parent_if_empty(path.parent)


def remove_parent_if_empty(parent: Path) -> None:
    if parent.name != GROUP:
        return
    try:
        parent.rmdir()
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.EBUSY, errno.ENOTEMPTY):
            raise ClusterError(f"cannot remove cgroup {parent}: {e}") from e


def leftovers(mode: str) -> list[Path]:
    """Host cgroups that exist under ``dunix/`` (for cleaning up without a state file)."""
    found: list[Path] = []
    for root in hierarchies(mode):
        group = root / GROUP
        if group.is_dir():
            found.extend(p for p in group.iterdir() if p.is_dir())
    return found
