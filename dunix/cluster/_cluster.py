"""``up``, ``down``, ``status``, ``start_agent`` and ``exec_in`` for the local cluster.

One cluster per machine: the bridge, netns, veth and cgroup names are fixed (see
``_state``). ``up`` records its whole plan in the state file before it creates anything,
so ``down`` removes exactly what exists after a crash at any point; ``down`` also sweeps
anything named ``dunix-*``/``dunix0``/cgroup ``dunix/`` so it works without a state file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dunix.cluster import _cgroup, _host, _net, _state
from dunix.cluster._state import (
    AGENT_PORT,
    BRIDGE,
    DEFAULT_STATE_DIR,
    DISK_ROOT,
    LOCAL_DISK,
    MAX_HOSTS,
    NETNS_PREFIX,
    RUN_ROOT,
    SUBNET,
    ClusterState,
    HostRecord,
)
from dunix.errors import ClusterError, DunixError


@dataclass(frozen=True)
class HostInfo:
    """One simulated host. Pids are as seen from the machine; None when not running."""

    name: str
    index: int
    address: str
    netns: str
    init_pid: int | None
    agent_pid: int | None
    cgroup: tuple[Path, ...]
    runtime_dir: Path
    control_socket: Path
    disk: Path
    cpu_quota: float | None
    tls_dir: Path

    @property
    def init_alive(self) -> bool:
        return self.init_pid is not None

    @property
    def agent_alive(self) -> bool:
        return self.agent_pid is not None

    @property
    def agent_log(self) -> Path:
        return self.runtime_dir / "agent.log"


AgentArgv = Callable[[HostInfo], list[str]]


def default_agent_argv(host: HostInfo) -> list[str]:
    argv = [sys.executable, "-m", "dunix", "agent", "--name", host.name]
    argv += ["--listen", f"{host.address}:{AGENT_PORT}"]
    if host.index != 1:
        argv += ["--join", f"{SUBNET}.1:{AGENT_PORT}"]
    argv += ["--control", str(host.control_socket), "--tls-dir", str(host.tls_dir)]
    argv += ["--state-dir", str(host.runtime_dir)]
    argv += ["--storagefs"]  # /dunix/fs in every host (dunix/agent/storage.py)
    return argv


def _info(rec: HostRecord, state_dir: Path) -> HostInfo:
    runtime = Path(rec.runtime_dir)
    return HostInfo(
        name=rec.name,
        index=rec.index,
        address=rec.address,
        netns=rec.netns,
        init_pid=rec.init_pid if _host.alive(rec.init_pid, rec.init_start) else None,
        agent_pid=rec.agent_pid if _host.alive(rec.agent_pid, rec.agent_start) else None,
        cgroup=tuple(Path(p) for p in rec.cgroups),
        runtime_dir=runtime,
        control_socket=runtime / "control.sock",
        disk=Path(rec.disk),
        cpu_quota=rec.cpu_quota,
        tls_dir=state_dir / "tls",
    )


def _plan(n: int, cpu_quota: float | None, mode: str) -> ClusterState:
    hosts = []
    for i in range(1, n + 1):
        name = f"n{i}"
        hosts.append(
            HostRecord(
                name=name,
                index=i,
                address=f"{SUBNET}.{i}",
                netns=f"{NETNS_PREFIX}{name}",
                veth=f"{NETNS_PREFIX}{name}",
                cgroups=[str(p) for p in _cgroup.host_paths(mode, name)],
                runtime_dir=str(RUN_ROOT / name),
                disk=str(DISK_ROOT / name / "disk"),
                cpu_quota=cpu_quota,
            )
        )
    return ClusterState(cgroup_mode=mode, hosts=hosts)


def _refuse_leftovers(mode: str) -> None:
    """Fail before claiming anything if another cluster's pieces exist."""
    found = _net.leftover_links() + _net.leftover_netns()
    found += [str(p) for p in _cgroup.leftovers(mode)]
    if found:
        raise ClusterError(
            f"pieces of another simulated cluster exist ({', '.join(found)}); "
            "run `dunix cluster down` first"
        )


def _keygen(state_dir: Path, names: list[str]) -> None:
    """The cluster CA plus node and ``admin`` client certificates, in ``state_dir/tls``."""
    try:
        from dunix.wire import keygen
    except ImportError:
        return  # a tree without the TLS layer: the agents run without it
    try:
        keygen(state_dir / "tls", nodes=names, clients=["admin"])
    except DunixError as e:
        raise ClusterError(f"cannot make the cluster's TLS material: {e}") from e


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ClusterError(f"cannot create {path}: {e}") from e


def up(
    n: int,
    cpu_quota: float | None = None,
    *,
    agent_argv: AgentArgv | None = None,
    state_dir: Path = DEFAULT_STATE_DIR,
    _after_host: Callable[[HostInfo], None] | None = None,
) -> list[HostInfo]:
    """Build hosts n1..nN, start their agents, and return them.

    On an error everything built so far is removed again. ``_after_host`` is a test hook
    called after each host's init is ready (to simulate a crash mid-way).
    """
    if not 1 <= n <= MAX_HOSTS:
        raise ClusterError(f"a simulated cluster has 1 to {MAX_HOSTS} hosts, not {n}")
    _cgroup.quota_us(cpu_quota)  # validates
    if os.geteuid() != 0:
        raise ClusterError("building a simulated cluster needs root")
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        raise ClusterError("unshare and nsenter (util-linux) are needed")
    mode = _cgroup.detect_mode()
    fresh = not state_dir.exists()
    with _state.locked(state_dir, create=True):
        try:
            if _state.load(state_dir) is not None:
                raise ClusterError(f"a cluster is already up (state in {state_dir})")
            _refuse_leftovers(mode)
            state = _plan(n, cpu_quota, mode)
            _state.claim(state_dir, state)
        except ClusterError:
            if fresh:
                _rmdir_empty(state_dir)
            raise
        try:
            return _build(state, state_dir, agent_argv or default_agent_argv, _after_host)
        except BaseException as exc:
            try:
                _down(state_dir)
            except ClusterError as cleanup:
                exc.add_note(f"cleaning up after that failed too: {cleanup}")
            raise


def _build(
    state: ClusterState,
    state_dir: Path,
    agent_argv: AgentArgv,
    after_host: Callable[[HostInfo], None] | None,
) -> list[HostInfo]:
    state.sysctls = _net.bridge_netfilter_values()
    state.own_netns_dir = not _net.netns_dir_mounted()
    _state.save(state_dir, state)
    _net.disable_bridge_netfilter()
    _mkdir(LOCAL_DISK)
    _net.create_bridge(str(state_dir.absolute()))
    _keygen(state_dir, [h.name for h in state.hosts])
    for rec in state.hosts:
        _mkdir(Path(rec.runtime_dir))
        _mkdir(Path(rec.disk))
        _net.create_netns(rec.netns)
        _net.attach_host(rec.netns, rec.veth, rec.address)
        _cgroup.create(state.cgroup_mode, rec.name, rec.cpu_quota)

        def spawned(pid: int, rec: HostRecord = rec) -> None:
            rec.unshare_pid = pid
            _state.save(state_dir, state)

        _, rec.init_pid = _host.start_init(rec, spawned)
        rec.init_start = _host.start_time(rec.init_pid)
        _state.save(state_dir, state)
        if after_host is not None:
            after_host(_info(rec, state_dir))
    for rec in state.hosts:
        rec.agent_argv = agent_argv(_info(rec, state_dir))
        _state.save(state_dir, state)
        _start_agent(rec, state, state_dir)
    state.complete = True
    _state.save(state_dir, state)
    return [_info(rec, state_dir) for rec in state.hosts]


def _start_agent(rec: HostRecord, state: ClusterState, state_dir: Path) -> None:
    rec.nsenter_pid, rec.agent_pid = _host.start_agent(rec, rec.agent_argv)
    rec.agent_start = _host.start_time(rec.agent_pid)
    _state.save(state_dir, state)


def _require(state_dir: Path) -> ClusterState:
    state = _state.load(state_dir)
    if state is None:
        raise ClusterError(f"no simulated cluster is up (no state in {state_dir})")
    return state


def status(state_dir: Path = DEFAULT_STATE_DIR) -> list[HostInfo]:
    """The hosts of the cluster, with pids of processes that still run (reads only)."""
    state = _state.load(state_dir)
    return [] if state is None else [_info(rec, state_dir) for rec in state.hosts]


def start_agent(
    name: str,
    state_dir: Path = DEFAULT_STATE_DIR,
    *,
    agent_argv: list[str] | None = None,
) -> HostInfo:
    """(Re)start host NAME's agent if it does not run; ``agent_argv`` overrides the argv
    recorded at ``up`` time (and is recorded in turn)."""
    with _state.locked(state_dir):
        return _start_agent_locked(name, state_dir, agent_argv)


def _start_agent_locked(name: str, state_dir: Path, agent_argv: list[str] | None) -> HostInfo:
    state = _require(state_dir)
    rec = state.host(name)
    if not _host.alive(rec.init_pid, rec.init_start):
        raise ClusterError(f"host {name} is down (its init is gone); rebuild the cluster")
    if agent_argv is not None:
        rec.agent_argv = list(agent_argv)
    if not _host.alive(rec.agent_pid, rec.agent_start):
        _host.reap(rec.nsenter_pid)
        if not rec.agent_argv:
            raise ClusterError(f"no agent command recorded for host {name}")
        _start_agent(rec, state, state_dir)
    return _info(rec, state_dir)


def _exec_argv(name: str, argv: list[str], state_dir: Path, kwargs: dict[str, Any]) -> list[str]:
    rec = _require(state_dir).host(name)
    if rec.init_pid is None or not _host.alive(rec.init_pid, rec.init_start):
        raise ClusterError(f"host {name} is down")
    wd = kwargs.pop("cwd", None) or "/"
    then = kwargs.pop("preexec_fn", None)
    kwargs["preexec_fn"] = _host._joiner(rec.cgroups, then)
    return _host.nsenter_argv(rec.init_pid, [str(a) for a in argv], str(wd), pdeathsig="KILL")


def exec_in(
    name: str, argv: list[str], *, state_dir: Path = DEFAULT_STATE_DIR, **kwargs: Any
) -> subprocess.Popen[Any]:
    """Start ``argv`` inside host NAME (its namespaces and cgroup); ``subprocess.Popen``
    keyword arguments apply. ``cwd`` is taken inside the host's mount namespace.

    The Popen is the ``nsenter`` parent (outside the host's PID namespace); killing it
    SIGKILLs the command too, and its exit status is the command's.
    """
    full = _exec_argv(name, argv, state_dir, kwargs)
    try:
        return subprocess.Popen(full, **kwargs)
    except OSError as e:
        raise ClusterError(f"cannot run {argv!r} in {name}: {e}") from e


def run_in(
    name: str, argv: list[str], *, state_dir: Path = DEFAULT_STATE_DIR, **kwargs: Any
) -> subprocess.CompletedProcess[Any]:
    """``subprocess.run(argv, **kwargs)`` inside host NAME, as ``exec_in`` starts it."""
    full = _exec_argv(name, argv, state_dir, kwargs)
    try:
        return subprocess.run(full, **kwargs)
    except OSError as e:
        raise ClusterError(f"cannot run {argv!r} in {name}: {e}") from e


# --- teardown -------------------------------------------------------------------------


def _sweep_records(state: ClusterState | None) -> list[HostRecord]:
    """Records for the state's hosts plus any ``dunix-*`` leftovers it does not name."""
    mode = state.cgroup_mode if state else _cgroup.detect_mode()
    recs = list(state.hosts) if state else []
    known = {r.name for r in recs}
    names: set[str] = set()
    for ns in _net.leftover_netns() + _net.leftover_links():
        if ns.startswith(NETNS_PREFIX):
            names.add(ns[len(NETNS_PREFIX) :])
    names.update(p.name for p in _cgroup.leftovers(mode))
    for root in (RUN_ROOT, DISK_ROOT):
        with contextlib.suppress(FileNotFoundError):
            names.update(p.name for p in root.iterdir())
    for name in sorted(names - known):
        recs.append(
            HostRecord(
                name=name,
                index=0,
                address="",
                netns=f"{NETNS_PREFIX}{name}",
                veth=f"{NETNS_PREFIX}{name}",
                cgroups=[str(p) for p in _cgroup.host_paths(mode, name)],
                runtime_dir=str(RUN_ROOT / name),
                disk=str(DISK_ROOT / name / "disk"),
                cpu_quota=None,
            )
        )
    return recs


def _mounts_under(roots: Iterable[Path]) -> list[str]:
    prefixes = [str(r).rstrip("/") + "/" for r in roots]
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if any((point + "/").startswith(p) for p in prefixes):
                found.append(point)
    return found


def _unmount_all(roots: Iterable[Path]) -> None:
    for point in reversed(_mounts_under(roots)):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


def _rmtree(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise ClusterError(f"cannot remove {path}: {e}") from e


def _rmdir_empty(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError, OSError):
        path.rmdir()


def down(state_dir: Path = DEFAULT_STATE_DIR) -> None:
    """Remove the cluster completely; idempotent, and fine on a half-built cluster.

    Keeps going past failures and raises one ClusterError naming them at the end; the
    state file is kept in that case so a second ``down`` can finish the job.
    """
    with _state.locked(state_dir):
        _down(state_dir)


def _refuse_foreign(state_dir: Path) -> None:
    """Without a state file ``down`` sweeps every ``dunix-*`` piece; refuse when those
    belong to a live cluster recorded in another state folder (the bridge names it)."""
    owner = _net.bridge_owner()
    if owner and Path(owner) != state_dir.absolute() and _state.state_path(Path(owner)).exists():
        raise ClusterError(
            f"the simulated cluster on this machine is recorded in {owner}, not {state_dir}; "
            "bring it down with that state folder"
        )


def _down(state_dir: Path) -> None:
    errors: list[str] = []

    def attempt(what: str, fn: Callable[..., object], *args: Any) -> None:
        try:
            fn(*args)
        except (ClusterError, OSError) as e:
            errors.append(f"{what}: {e}")

    state = _state.load(state_dir)
    if state is None:
        _refuse_foreign(state_dir)
    recs = _sweep_records(state)
    # Every host dies first, so no mount namespace still pins a netns or the disk.
    for rec in recs:
        attempt(f"stopping {rec.name}", _host.kill_host, rec)
    for rec in recs:
        attempt(f"veth {rec.veth}", _net.delete_link, rec.veth)
        attempt(f"netns {rec.netns}", _net.delete_netns, rec.netns)
        attempt(f"cgroup of {rec.name}", _cgroup.remove, [Path(p) for p in rec.cgroups])
    attempt("bridge", _net.delete_link, state.bridge if state else BRIDGE)
    if state is not None:
        attempt("sysctls", _net.restore_sysctls, state.sysctls)
        if state.own_netns_dir:
            attempt("/run/netns", _net.release_netns_dir)
    attempt("mounts", _unmount_all, [RUN_ROOT, DISK_ROOT, LOCAL_DISK])
    for rec in recs:
        attempt(f"runtime dir of {rec.name}", _rmtree, Path(rec.runtime_dir))
        attempt(f"disk of {rec.name}", _rmtree, Path(rec.disk).parent)
    attempt("the agents' deputy copy", _rmtree, RUN_ROOT.parent / "bin")  # agent/tracer.py
    for path in (RUN_ROOT, DISK_ROOT, LOCAL_DISK, RUN_ROOT.parent, DISK_ROOT.parent):
        _rmdir_empty(path)
    if errors:
        raise ClusterError("cluster down left pieces behind: " + "; ".join(errors))
    attempt("tls", _rmtree, state_dir / "tls")
    attempt("state", _state.remove, state_dir)
    _rmdir_empty(state_dir)
    _rmdir_empty(RUN_ROOT.parent)
    if errors:
        raise ClusterError("cluster down left pieces behind: " + "; ".join(errors))
