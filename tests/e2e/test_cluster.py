"""End-to-end tests of the local simulated cluster (needs root and namespaces).

The agent here is a tiny TCP echo server, so these tests do not depend on ``dunix agent``.
Every test that builds a cluster tears it down in a fixture, whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dunix import cluster
from dunix.cluster import HostInfo, _cgroup, _host, _net
from dunix.errors import ClusterError
from tests.e2e.conftest import exclusive_cluster

pytestmark = pytest.mark.e2e

TOKEN = f"dunix-e2e-{uuid.uuid4().hex[:8]}"
ECHO = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], 7946))
    s.listen()
    while True:
        c, _ = s.accept()
        with c:
            c.sendall(socket.gethostname().encode() + b":" + c.recv(100))
    """
)


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is not installed"
    probe = subprocess.run(
        ["unshare", "--pid", "--mount", "--uts", "--net", "--fork", "--mount-proc", "true"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return f"cannot create namespaces here: {probe.stderr.strip()}"
    try:
        _cgroup.detect_mode()
    except ClusterError as e:
        return str(e)
    return None


_REASON = _skip_reason()
if _REASON is not None:
    pytest.skip(_REASON, allow_module_level=True)


def echo_agent(host: cluster.HostInfo) -> list[str]:
    return [sys.executable, "-c", ECHO, host.address, TOKEN]


def ask(address: str, message: bytes = b"hi", timeout: float = 5.0) -> bytes:
    """Send ``message`` to the echo agent at address:7946, retrying until it listens."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((address, cluster.AGENT_PORT), timeout=1) as s:
                s.sendall(message)
                return s.recv(100)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def run(name: str, argv: list[str], state_dir: Path) -> subprocess.CompletedProcess[str]:
    return cluster.run_in(name, argv, state_dir=state_dir, capture_output=True, text=True)


def sh_in(name: str, script: str, state_dir: Path) -> str:
    done = run(name, ["sh", "-c", script], state_dir)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def assert_nothing_left(state_dir: Path, old_sysctls: dict[str, str]) -> None:
    assert _net.leftover_netns() == []
    assert _net.leftover_links() == []
    assert not list(Path("/sys/fs/cgroup").glob("*/dunix")), "cgroup dirs left"
    assert not Path("/sys/fs/cgroup/dunix").exists()
    mounts = Path("/proc/self/mountinfo").read_text()
    for root in ("/var/lib/dunix", "/run/dunix", "/run/netns/dunix-"):
        assert root not in mounts, f"a mount under {root} is left"
    for path in (Path("/run/dunix/hosts"), Path("/var/lib/dunix/hosts"), state_dir):
        assert not path.exists(), f"{path} is left"
    assert not cluster.LOCAL_DISK.exists()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat[stat.rindex(")") + 2] == "Z":
                continue  # a zombie runs nothing; its reaper may be the machine's PID 1
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            cgroups = Path(f"/proc/{pid}/cgroup").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        assert TOKEN.encode() not in cmdline, f"process {pid} is left: {cmdline!r}"
        assert "/dunix/" not in cgroups, f"process {pid} is left in a dunix cgroup"
    now = {p: Path(p).read_text().strip() for p in old_sysctls if p.startswith("/proc/")}
    now["/run/netns is a mount"] = str(_net.netns_dir_mounted())
    assert now == old_sysctls


#: other people's test runs may hold the machine's one cluster for a while
FREE_TIMEOUT = 180.0


def machine_free() -> bool:
    leftovers = _cgroup.leftovers(_cgroup.detect_mode())
    return not (_net.leftover_links() or _net.leftover_netns() or leftovers)


def wait_free() -> None:
    deadline = time.monotonic() + FREE_TIMEOUT
    while not machine_free():
        if time.monotonic() > deadline:
            pytest.fail(f"another simulated cluster has been up for {FREE_TIMEOUT:.0f}s")
        time.sleep(0.5)


def down_if_ours(state_dir: Path) -> None:
    """down, unless ``up`` never claimed this state dir (then another cluster is not ours)."""
    if (state_dir / "state.json").exists():
        cluster.down(state_dir)


@contextlib.contextmanager
def built(state_dir: Path, n: int, quota: float | None = None) -> Iterator[list[HostInfo]]:
    """A cluster with the echo agent, brought down afterwards whatever happens."""
    while True:
        wait_free()
        try:
            hosts = cluster.up(n, quota, agent_argv=echo_agent, state_dir=state_dir)
            break
        except ClusterError as e:
            if "another simulated cluster" not in str(e):
                raise  # (up has rolled itself back)
    try:
        yield hosts
    finally:
        down_if_ours(state_dir)


@pytest.fixture(scope="module", autouse=True)
def _one_cluster_at_a_time() -> Iterator[None]:
    """The machine's cluster lock for the whole module (its clusters have their own state
    folders, but the bridge, the namespaces and the sysctls are the machine's)."""
    with exclusive_cluster():
        yield


@pytest.fixture
def sysctls() -> dict[str, str]:
    """The machine's settings that ``up`` changes and ``down`` must put back."""
    wait_free()
    found = {str(p): p.read_text().strip() for p in _net.BRIDGE_NF_SYSCTLS if p.exists()}
    found["/run/netns is a mount"] = str(_net.netns_dir_mounted())
    return found


@pytest.fixture(scope="class")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A 3-host cluster for one test class; yields its state dir."""
    state_dir = tmp_path_factory.mktemp("cluster") / "state"
    with built(state_dir, 3, 0.5):
        yield state_dir


class TestRunningCluster:
    """Checks against one 3-host cluster, built once for the class."""

    @pytest.fixture
    def state_dir(self, running: Path) -> Path:
        return running

    @pytest.fixture
    def hosts(self, state_dir: Path) -> list[cluster.HostInfo]:
        return cluster.status(state_dir)

    def test_status(self, hosts: list[cluster.HostInfo]) -> None:
        assert [h.name for h in hosts] == ["n1", "n2", "n3"]
        assert [h.address for h in hosts] == ["10.213.0.1", "10.213.0.2", "10.213.0.3"]
        for h in hosts:
            assert h.init_alive and h.agent_alive
            assert h.netns == f"dunix-{h.name}"
            assert h.control_socket == Path(f"/run/dunix/hosts/{h.name}/control.sock")
            assert h.disk == Path(f"/var/lib/dunix/hosts/{h.name}/disk")
            assert h.cpu_quota == 0.5

    def test_up_refuses_second_cluster(self, state_dir: Path, tmp_path: Path) -> None:
        with pytest.raises(ClusterError, match="already up"):
            cluster.up(1, state_dir=state_dir)
        with pytest.raises(ClusterError, match="another simulated cluster"):
            cluster.up(1, state_dir=tmp_path / "other")
        assert not (tmp_path / "other").exists()
        # down without a state file sweeps dunix-* pieces, but not a live cluster's
        with pytest.raises(ClusterError, match="recorded in"):
            cluster.down(tmp_path / "other")
        assert all(h.agent_alive for h in cluster.status(state_dir))

    def test_hostname(self, hosts: list[cluster.HostInfo], state_dir: Path) -> None:
        for h in hosts:
            out = subprocess.run(
                ["nsenter", "-t", str(h.init_pid), "-u", "hostname"],
                capture_output=True,
                text=True,
                check=True,
            )
            assert out.stdout.strip() == h.name
            assert sh_in(h.name, "hostname", state_dir) == h.name
        assert socket.gethostname() not in {"n1", "n2", "n3"}

    def test_pid_namespace(self, state_dir: Path) -> None:
        # the shell is not PID 1: the init is
        assert sh_in("n1", "cat /proc/1/cmdline | tr '\\0' ' '", state_dir).find("init.py") > 0

    def test_private_tmp(self, state_dir: Path) -> None:
        name = f"/tmp/{TOKEN}"
        sh_in("n1", f"echo one > {name}", state_dir)
        assert sh_in("n1", f"cat {name}", state_dir) == "one"
        assert run("n2", ["test", "-e", name], state_dir).returncode == 1
        assert not Path(name).exists()

    def test_private_disk(self, hosts: list[cluster.HostInfo], state_dir: Path) -> None:
        local = cluster.LOCAL_DISK / "mine"
        sh_in("n1", f"echo n1-data > {local}", state_dir)
        assert (hosts[0].disk / "mine").read_text() == "n1-data\n"
        assert run("n2", ["test", "-e", str(local)], state_dir).returncode == 1
        assert not (hosts[1].disk / "mine").exists()
        assert not local.exists()  # the machine's own folder is untouched

    def test_tcp_between_hosts(self, state_dir: Path) -> None:
        client = (
            "import socket,sys,time\n"
            "for i in range(250):\n"
            "    try: s = socket.create_connection(('10.213.0.2', 7946), timeout=1); break\n"
            "    except OSError: time.sleep(0.02)\n"
            "s.sendall(b'from-n1'); print(s.recv(100).decode())\n"
        )
        assert run("n1", [sys.executable, "-c", client], state_dir).stdout == "n2:from-n1\n"

    def test_machine_reaches_agents_over_bridge(self, hosts: list[cluster.HostInfo]) -> None:
        for h in hosts:
            assert ask(h.address) == f"{h.name}:hi".encode()

    def test_no_route_out(self, state_dir: Path) -> None:
        assert sh_in("n1", "ip route show default", state_dir) == ""
        probe = "import socket; socket.create_connection(('192.0.2.1', 80), timeout=1)"
        done = run("n1", [sys.executable, "-c", probe], state_dir)
        assert done.returncode != 0
        assert "unreachable" in done.stderr.lower()

    def test_cgroup_quota(self, hosts: list[cluster.HostInfo], state_dir: Path) -> None:
        period = str(_cgroup.PERIOD_US)
        half = str(_cgroup.PERIOD_US // 2)  # these hosts have 0.5 CPU
        for h in hosts:
            cpu = h.cgroup[0]
            if (cpu / "cpu.max").exists():
                assert (cpu / "cpu.max").read_text().split() == [half, period]
            else:
                assert (cpu / "cpu.cfs_quota_us").read_text().strip() == half
                assert (cpu / "cpu.cfs_period_us").read_text().strip() == period
            for cg in h.cgroup:
                procs = {int(p) for p in (cg / "cgroup.procs").read_text().split()}
                assert h.agent_pid in procs
                assert h.init_pid in procs
        # commands run with run_in/exec_in are charged to the host as well
        own = sh_in("n2", "cat /proc/self/cgroup", state_dir)
        assert "/dunix/n2" in own

    def test_exec_in_is_a_popen_whose_kill_reaches_the_command(self, state_dir: Path) -> None:
        proc = cluster.exec_in("n3", ["sh", "-c", "exec sleep 1000", TOKEN], state_dir=state_dir)
        try:
            deadline = time.monotonic() + 5
            while not _host.children(proc.pid):
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.01)
            (inner,) = _host.children(proc.pid)
            # setpriv arms the parent-death signal before it execs the command: wait for
            # the command itself (a kill before that would orphan it: a race of the test)
            while Path(f"/proc/{inner}/cmdline").read_bytes().startswith(b"setpriv"):
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.01)
            assert "/dunix/n3" in Path(f"/proc/{inner}/cgroup").read_text()
        finally:
            proc.kill()
            proc.wait()
        deadline = time.monotonic() + 5
        while _host.start_time(inner) is not None:
            assert time.monotonic() < deadline, "the command outlived its nsenter"
            time.sleep(0.01)
        done = cluster.exec_in("n3", ["sh", "-c", "exit 7"], state_dir=state_dir)
        assert done.wait() == 7

    def test_start_agent_restarts_killed_agent(self, state_dir: Path) -> None:
        before = {h.name: h for h in cluster.status(state_dir)}
        assert cluster.start_agent("n2", state_dir) == before["n2"]  # running: no-op
        old = before["n2"].agent_pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while cluster.status(state_dir)[1].agent_alive:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        restarted = cluster.start_agent("n2", state_dir)
        assert restarted.agent_pid not in (None, old)
        assert cluster.status(state_dir)[1].agent_pid == restarted.agent_pid
        assert ask("10.213.0.2") == b"n2:hi"
        procs = (restarted.cgroup[0] / "cgroup.procs").read_text().split()
        assert str(restarted.agent_pid) in procs


def test_down_leaves_nothing(tmp_path: Path, sysctls: dict[str, str]) -> None:
    state_dir = tmp_path / "state"
    with built(state_dir, 2, 0.25) as hosts:
        assert ask(hosts[1].address) == b"n2:hi"
        cluster.run_in("n1", ["sh", "-c", "sleep 1000 &"], state_dir=state_dir)
    assert_nothing_left(state_dir, sysctls)
    cluster.down(state_dir)  # twice is fine
    assert cluster.status(state_dir) == []
    assert_nothing_left(state_dir, sysctls)


def test_down_after_crash_mid_up(tmp_path: Path, sysctls: dict[str, str]) -> None:
    """A process that dies while building host 2 of 3 leaves a half cluster; down clears it."""
    state_dir = tmp_path / "state"
    script = textwrap.dedent(
        f"""
        import os, sys
        from pathlib import Path
        from dunix import cluster
        def crash(host):
            if host.index == 2:
                os._exit(17)
        cluster.up(3, 0.5, agent_argv=lambda h: ["sh", "-c", "exec sleep 1000", {TOKEN!r}],
                   state_dir=Path({str(state_dir)!r}), _after_host=crash)
        """
    )
    try:
        while True:
            wait_free()
            done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
            if "another simulated cluster" not in done.stderr:
                break
        assert done.returncode == 17, done.stderr
        state = json.loads((state_dir / "state.json").read_text())
        assert not state["complete"]
        assert _net.leftover_netns() == ["dunix-n1", "dunix-n2"]
        assert [h["init_pid"] is not None for h in state["hosts"]] == [True, True, False]
    finally:
        down_if_ours(state_dir)
    assert_nothing_left(state_dir, sysctls)


def test_down_without_state_file(tmp_path: Path, sysctls: dict[str, str]) -> None:
    state_dir = tmp_path / "state"
    with built(state_dir, 2):
        (state_dir / "state.json").unlink()
        cluster.down(state_dir)
    # without the state file the old sysctl values are unknown: put them back by hand
    for path, value in sysctls.items():
        if path.startswith("/proc/"):
            Path(path).write_text(value)
    if sysctls["/run/netns is a mount"] == "False":
        _net.release_netns_dir()
    assert_nothing_left(state_dir, sysctls)


def test_failed_up_rolls_back(tmp_path: Path, sysctls: dict[str, str]) -> None:
    state_dir = tmp_path / "state"

    def boom(host: cluster.HostInfo) -> None:
        if host.index == 2:
            raise RuntimeError("injected")

    try:
        with pytest.raises(RuntimeError, match="injected"):
            cluster.up(3, agent_argv=echo_agent, state_dir=state_dir, _after_host=boom)
        assert_nothing_left(state_dir, sysctls)
    finally:
        down_if_ours(state_dir)


def test_cgroup_period_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DUNIX_CFS_PERIOD_US sets another period (to measure it); the quota follows it."""
    monkeypatch.setattr(_cgroup, "CGROUP_ROOT", tmp_path)
    (tmp_path / "dunix").mkdir()
    (tmp_path / "cgroup.subtree_control").write_text("cpu\n")
    (tmp_path / "dunix" / "cgroup.subtree_control").write_text("cpu\n")
    monkeypatch.setenv(_cgroup.PERIOD_ENV, "50000")
    paths = _cgroup.create("v2", "n1", 0.5)
    assert (paths[0] / "cpu.max").read_text() == "25000 50000"
    for bad in ("10ms", "500", "2000000"):
        monkeypatch.setenv(_cgroup.PERIOD_ENV, bad)
        with pytest.raises(ClusterError, match=_cgroup.PERIOD_ENV):
            _cgroup.quota_us(0.5)


def test_cgroup_v2_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The v2 branch, on a fake cgroup2 tree (this machine may only have v1)."""
    monkeypatch.setattr(_cgroup, "CGROUP_ROOT", tmp_path)
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("\n")
    (tmp_path / "dunix").mkdir()  # the kernel would fill a new cgroup dir with these
    (tmp_path / "dunix" / "cgroup.subtree_control").write_text("\n")
    assert _cgroup.detect_mode() == "v2"
    paths = _cgroup.create("v2", "n1", 0.5)
    assert paths == [tmp_path / "dunix" / "n1"]
    assert (paths[0] / "cpu.max").read_text() == "12500 25000"
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+cpu"
    assert (tmp_path / "dunix" / "cgroup.subtree_control").read_text() == "+cpu"
    _cgroup.create("v2", "n2", None)
    assert (tmp_path / "dunix" / "n2" / "cpu.max").read_text() == "max 25000"
    (tmp_path / "cgroup.controllers").write_text("memory pids\n")
    with pytest.raises(ClusterError, match="cpu controller"):
        _cgroup.detect_mode()
