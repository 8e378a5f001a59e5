"""Processes of a simulated host: its PID-1 init, its agent, commands run inside it.

Layout, as seen from the machine::

    nsenter --net=/run/netns/dunix-n1 unshare ... (the "unshare parent", outside the PID ns)
      └─ python dunix/cluster/init.py            (PID 1 of the host = HostInfo.init_pid)
    nsenter -t INIT -p -m -u -n ... (outside the PID ns; waits for the agent)
      └─ agent argv                              (HostInfo.agent_pid)

Entering a PID namespace only affects children (setns(2), CLONE_NEWPID), which is why
both ``unshare --fork`` and ``nsenter -p`` leave a parent outside; the host processes are
their children. Every process is put into the host's cgroup(s) in a ``preexec_fn``
before exec, so everything forked afterwards is accounted there.

A process is identified by (pid, start time), never by a bare pid that may be reused.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from dunix.cluster import _cgroup
from dunix.cluster._net import netns_path
from dunix.cluster._state import LOCAL_DISK, HostRecord
from dunix.errors import ClusterError

READY_TIMEOUT = 15.0
#: the package root, so ``python -m dunix...`` works inside a host whatever its cwd
_SOURCE_ROOT = str(Path(__file__).resolve().parents[2])
_INIT_SCRIPT = str(Path(__file__).resolve().with_name("init.py"))


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot), or None if no such process.

    Zombies count as gone: they no longer run and only wait to be reaped.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError as e:
        raise ClusterError(f"cannot read /proc/{pid}/stat: {e}") from e
    # comm may hold spaces and parentheses: split after the last ')'
    fields = stat[stat.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def alive(pid: int | None, start: int | None) -> bool:
    return pid is not None and start is not None and start_time(pid) == start


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return []
    except OSError as e:
        raise ClusterError(f"cannot read children of {pid}: {e}") from e
    return [int(x) for x in text.split()]


def reap(pid: int | None) -> None:
    """Collect ``pid`` if it is our own dead child (a no-op otherwise)."""
    if pid is None:
        return
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [_SOURCE_ROOT, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def _joiner(cgroups: list[str], then: Callable[[], object] | None = None) -> Callable[[], None]:
    def preexec() -> None:
        _cgroup.join_self(cgroups)
        if then is not None:
            then()

    return preexec


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:].strip()
    except OSError:
        return ""


def _wait_for_child(parent: subprocess.Popen[bytes], what: str, log: Path) -> int:
    """The pid of ``parent``'s only child, once it has forked it."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        kids = children(parent.pid)
        if kids:
            return kids[0]
        code = parent.poll()
        if code is not None:
            raise ClusterError(f"{what} exited with status {code}: {_tail(log) or 'no output'}")
        if time.monotonic() > deadline:
            raise ClusterError(f"{what} did not start within {READY_TIMEOUT}s")
        time.sleep(0.005)


def install_paths_under_tmp() -> list[str]:
    """The parts of this installation that live under /tmp (a checkout made there, its venv).

    Every host mounts a private /tmp, which would hide them from the agent started inside;
    the host's init binds them back at the same paths (DESIGN.md: hosts share installed
    software, not /tmp).
    """
    repo = Path(__file__).resolve().parents[2]
    found = []
    for path in (repo, Path(sys.prefix).resolve()):
        if path.is_relative_to("/tmp") and str(path) not in found:
            found.append(str(path))
    return found


def start_init(rec: HostRecord, on_spawn: Callable[[int], None]) -> tuple[int, int]:
    """Start the host's PID 1 and wait until it is ready; returns (unshare pid, init pid).

    ``on_spawn`` gets the unshare parent's pid as soon as it exists, so the caller can
    record it before waiting (a crash while waiting must not leak it).
    """
    runtime = Path(rec.runtime_dir)
    log = runtime / "init.log"
    argv = [
        "nsenter",
        f"--net={netns_path(rec.netns)}",
        "unshare",
        "--pid",
        "--mount",
        "--uts",
        "--fork",
        "--mount-proc",
        "--propagation",
        "private",
        # By path, not ``-m dunix.cluster.init``: importing the package would pull in
        # pyroute2 and cost ~0.3 s per host; init.py needs only the standard library.
        sys.executable,
        "-I",
        "-S",
        _INIT_SCRIPT,
        "--name",
        rec.name,
        "--disk",
        rec.disk,
        "--local-disk",
        str(LOCAL_DISK),
        "--runtime-dir",
        rec.runtime_dir,
    ]
    for path in install_paths_under_tmp():
        argv += ["--keep", path]
    rfd, wfd = os.pipe()
    try:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [*argv, "--ready-fd", str(wfd)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                pass_fds=(wfd,),
                cwd="/",
                env=child_env(),
                start_new_session=True,
                preexec_fn=_joiner(rec.cgroups),
            )
    except OSError as e:
        os.close(rfd)
        raise ClusterError(f"cannot start the init of {rec.name}: {e}") from e
    finally:
        os.close(wfd)
    try:
        on_spawn(proc.pid)
        # The unshare parent keeps a copy of the write end, so EOF would only come when
        # the whole host dies; the init writes one byte instead.
        ready, _, _ = select.select([rfd], [], [], READY_TIMEOUT)
        byte = os.read(rfd, 1) if ready else b""
    finally:
        os.close(rfd)
    if byte != b"R":
        code = proc.poll()
        state = f"exited with status {code}" if code is not None else "did not get ready"
        raise ClusterError(f"the init of {rec.name} {state}: {_tail(log) or 'no output'}")
    return proc.pid, _wait_for_child(proc, f"the init of {rec.name}", log)


def nsenter_argv(
    init_pid: int, argv: list[str], wd: str = "/", *, pdeathsig: str | None = None
) -> list[str]:
    """argv that runs ``argv`` inside the host whose PID 1 is ``init_pid``.

    nsenter stays outside as the parent and forwards no signals, so killing it would
    orphan the command; with ``pdeathsig`` (e.g. "KILL") ``setpriv`` arranges that the
    command gets that signal when nsenter dies (prctl PR_SET_PDEATHSIG survives exec).
    """
    inner = ["setpriv", f"--pdeathsig={pdeathsig}", "--", *argv] if pdeathsig else argv
    return ["nsenter", "-t", str(init_pid), "-p", "-m", "-u", "-n", f"--wdns={wd}", "--", *inner]


def start_agent(rec: HostRecord, argv: list[str]) -> tuple[int, int]:
    """Start the agent inside the host, detached; returns (nsenter pid, agent pid)."""
    if rec.init_pid is None:
        raise ClusterError(f"host {rec.name} has no init")
    log = Path(rec.runtime_dir) / "agent.log"
    try:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                nsenter_argv(rec.init_pid, argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd="/",
                env=child_env(),
                start_new_session=True,
                preexec_fn=_joiner(rec.cgroups),
            )
    except OSError as e:
        raise ClusterError(f"cannot start the agent of {rec.name}: {e}") from e
    return proc.pid, _wait_for_child(proc, f"the agent of {rec.name}", log)


def kill_host(rec: HostRecord, timeout: float = 5.0) -> None:
    """SIGKILL the host's init (so its PID namespace dies), then its cgroup's rest.

    The init goes first, while the nsenter/unshare parents still live to reap their
    children: the namespace is only gone once every zombie in it is reaped, and an
    orphan would be left to the machine's PID 1, which may reap late.
    """
    if rec.init_pid is not None and alive(rec.init_pid, rec.init_start):
        with contextlib.suppress(ProcessLookupError):
            os.kill(rec.init_pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while alive(rec.init_pid, rec.init_start) and time.monotonic() < deadline:
            time.sleep(0.01)
    _cgroup.kill_all([Path(p) for p in rec.cgroups if os.path.isdir(p)], timeout)
    for pid in (rec.unshare_pid, rec.nsenter_pid):
        reap(pid)
