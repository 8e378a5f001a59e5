"""What the benchmarks on a real simulated cluster share: the machine-wide lock, bringing a
cluster up once the machine is free, waiting until its members see each other, Debian
packages installed on demand, ``sshd`` inside a host (the peer that dunix is compared
with), and counting in the agents' logs where execs went.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import trio

from dunix import cluster
from dunix.client import Client
from dunix.errors import ClusterError, PeerUnreachable

LOCK = Path("/run/dunix-tests.lock")  # the e2e tests' lock (tests/e2e/conftest.py)
HOSTS = Path("/run/dunix/hosts")  # agent.log and control.sock per host
SSH_DIR = Path("/var/tmp/dunix-bench-ssh")  # seen by every host (a host's /tmp is its own)
SSH_PORT = 2222
FREE_TIMEOUT = 600.0  # waiting for another test run's cluster to go away


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def address(node: str) -> str:
    """Host ``nI``'s address on the bridge (dunix/cluster: 10.213.0.I)."""
    return f"10.213.0.{int(node[1:])}"


def control(node: str) -> Path:
    return HOSTS / node / "control.sock"


@contextlib.contextmanager
def exclusive_cluster() -> Iterator[None]:
    """There is one simulated cluster per machine: the e2e tests and this take turns."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_packages(*packages: str) -> None:
    """Install Debian packages with apt when dpkg does not list them."""
    missing = []
    for pkg in packages:
        q = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True
        )
        if "install ok installed" not in q.stdout:
            missing.append(pkg)
    if missing:
        say(f"apt-get install {' '.join(missing)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, capture_output=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
            check=True, env=env, capture_output=True,
        )  # fmt: skip


def up_when_free(
    hosts: int, cpu_quota: float | None, agent_argv: cluster.AgentArgv | None = None
) -> None:
    """``cluster.up``, after removing leftovers of an earlier crashed run of ours.

    tests/e2e/test_cluster.py builds clusters in state folders of its own without the lock
    and waits for the machine to be free: so only our own state is brought down here (a
    stateless sweep could tear down such a cluster half-built), and ``up`` is retried
    while another cluster is up.
    """
    if (cluster.DEFAULT_STATE_DIR / "state.json").exists():
        cluster.down()
    deadline = time.monotonic() + FREE_TIMEOUT
    while True:
        try:
            cluster.up(hosts, cpu_quota, agent_argv=agent_argv)
            return
        except ClusterError as exc:
            if time.monotonic() > deadline or not any(
                s in str(exc) for s in ("another simulated cluster", "already up")
            ):
                raise
            time.sleep(1.0)


async def wait_alive(control_sock: Path, hosts: int, timeout: float = 30.0) -> None:
    """Until the agent behind ``control_sock`` sees every host alive (its control socket
    comes a bit after ``up`` returns)."""
    deadline = trio.current_time() + timeout
    while True:
        try:
            async with await Client.connect(control_sock) as client:
                await client.wait_alive(hosts, max(0.1, deadline - trio.current_time()))
                return
        except PeerUnreachable:
            if trio.current_time() > deadline:
                raise
            await trio.sleep(0.2)


# --- sshd inside a host ------------------------------------------------------------------


class SshPeer:
    """``sshd`` on host ``node`` with throwaway keys (shared by every SshPeer in
    ``ssh_dir``, so one ``ssh`` command line reaches them all); clients run in
    ``client_node``."""

    def __init__(
        self, node: str, client_node: str, ssh_dir: Path = SSH_DIR, port: int = SSH_PORT
    ) -> None:
        self.node = node
        self.client_node = client_node
        self.address = address(node)
        self.dir = ssh_dir
        self.port = port
        self.key = ssh_dir / "id_ed25519"
        self.config = ssh_dir / f"sshd_config-{node}"
        self.log_path = ssh_dir / f"sshd-{node}.log"
        self.control_path = ssh_dir / "cm-%r@%h:%p"
        self.sshd: subprocess.Popen[bytes] | None = None

    def prepare(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for stale in self.dir.glob("cm-*"):  # a crashed run's ControlMaster sockets
            stale.unlink(missing_ok=True)
        host_key = self.dir / "host_ed25519"
        for path in (host_key, self.key):
            if not path.exists():
                subprocess.run(
                    ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dunix-bench",
                     "-f", str(path)],
                    check=True, stdin=subprocess.DEVNULL,
                )  # fmt: skip
        authorized = self.dir / "authorized_keys"
        shutil.copy(self.key.with_suffix(".pub"), authorized)
        self.config.write_text(
            f"ListenAddress {self.address}\n"
            f"HostKey {host_key}\n"
            f"PidFile {self.dir / f'sshd-{self.node}.pid'}\n"
            f"AuthorizedKeysFile {authorized}\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"  # /var/tmp is world-writable
            "UseDNS no\n"
            "PrintMotd no\n"
            "PrintLastLog no\n"
            "MaxSessions 100\n"
            "MaxStartups 100:30:200\n"
            "LogLevel ERROR\n"
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation; /run is shared

    def start(self) -> None:
        # sshd runs commands through root's bash, which reads ~/.bashrc when SSH_CLIENT is
        # set (Debian builds bash with SSH_SOURCE_BASHRC); this machine's runs `pyenv init`,
        # ~90 ms per command. Hide it (and its siblings) in a mount namespace of sshd's own:
        # we measure ssh, not a profile.
        hide = "; ".join(
            f"[ -e /root/{f} ] && mount --bind /dev/null /root/{f}"
            for f in (".bashrc", ".bash_profile", ".profile")
        )
        sshd = f"/usr/sbin/sshd -D -e -f {self.config} -p {self.port}"
        self.sshd = cluster.exec_in(
            self.node,
            ["unshare", "--mount", "--propagation", "private", "--",
             "sh", "-c", f"{hide}; exec {sshd}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.log_path.open("wb"),
        )  # fmt: skip
        deadline = time.monotonic() + 10
        probe_argv = ["bash", "-c", f"exec 3<>/dev/tcp/{self.address}/{self.port}"]
        while time.monotonic() < deadline:
            probe = cluster.run_in(
                self.client_node, probe_argv, stdin=subprocess.DEVNULL, capture_output=True,
                timeout=5,
            )  # fmt: skip
            if probe.returncode == 0:
                return
            if self.sshd.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"sshd in {self.node} does not listen: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:]

    def options(self, control_master: bool = True) -> list[str]:
        """ssh options (no host): our key and port, no host-key checks, and with
        ``control_master`` a persistent master per host."""
        opts = [
            "-F", "/dev/null", "-i", str(self.key), "-p", str(self.port),
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR",
        ]  # fmt: skip
        if control_master:
            opts += [
                "-o", "ControlMaster=auto", "-o", f"ControlPath={self.control_path}",
                "-o", "ControlPersist=60",
            ]  # fmt: skip
        return opts

    def command(self, *extra: str) -> str:
        return " ".join(["ssh", *self.options(), *extra, f"root@{self.address}"])

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            cluster.run_in(
                self.client_node, ["bash", "-c", self.command("-O", "exit") + " 2>/dev/null"],
                stdin=subprocess.DEVNULL, capture_output=True, timeout=10,
            )  # fmt: skip
        if self.sshd is not None and self.sshd.poll() is None:
            self.sshd.kill()
            self.sshd.wait()


# --- the agents' logs --------------------------------------------------------------------


def log_sizes() -> dict[str, int]:
    return {p.parent.name: p.stat().st_size for p in HOSTS.glob("*/agent.log")}


def log_since(node: str, since: dict[str, int]) -> list[bytes]:
    """Lines of ``node``'s agent log written after the offsets in ``since``."""
    path = HOSTS / node / "agent.log"
    if not path.exists():
        return []
    with path.open("rb") as f:
        f.seek(since.get(node, 0))
        return f.read().splitlines()


def remote_execs_logged(since: dict[str, int]) -> dict[str, dict[str, int]]:
    """Per agent log, since the offsets in ``since``: execs a home agent sent to a peer
    (``... runs on PEER as pid N``) and those that fell back to local (``could not run``)."""
    counts = {}
    for log in sorted(HOSTS.glob("*/agent.log")):
        lines = log_since(log.parent.name, since)
        counts[log.parent.name] = {
            "went_remote": sum(b" runs on " in line for line in lines),
            "fell_back_local": sum(b" could not run on " in line for line in lines),
        }
    return counts


def keep_logs(dest: Path) -> None:
    """The agents' logs outlive the cluster (in ``dest``), for whoever reads the timings."""
    dest.mkdir(parents=True, exist_ok=True)
    for log in HOSTS.glob("*/agent.log"):
        shutil.copy(log, dest / f"{log.parent.name}.log")
