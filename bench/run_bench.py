"""`dunix run` on a real simulated cluster (issue 3's benchmark), side by side in one run:

* remote exec latency of ``/bin/true``, p50 and p99, timed inside one job so the client's
  start-up is not counted: bash's ``$EPOCHREALTIME`` (a builtin variable, no exec) before
  and after each ``/bin/true``, so every sample is one full remote exec (tracer stop,
  deputy, RemoteExec over TLS, spawn on the peer, stdio relay, exit status back). Peers:
  ``ssh`` with a ControlMaster from host n1 into an ``sshd`` on host n2 (the traffic
  crosses the same veths), and a plain local fork+exec in n1;
* a fork-heavy script kept local (1,000 short commands, pipelines and command
  substitutions included) under ``dunix run --placement local`` and ``auto`` against plain
  ``bash`` in the same host, best of 3: the time bash itself sees (the tracer's cost) and
  the wall time around the command (``dunix run``'s client and job set-up included).

Jobs' stdio are pipes and their files live under /var/tmp: a simulated host has its own
/tmp, so it could not see this machine's. ``openssh-server`` is installed with apt when
missing; its keys are throwaway ones under /var/tmp/dunix-bench-ssh/.

Run (root): ``python -m bench.run_bench [--runs 1000] [--hosts 3] [--cpu-quota C]``;
quick: ``--quick`` (200 runs).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import trio

from dunix import cluster
from dunix.client import Client
from dunix.errors import ClusterError, PeerUnreachable

RESULTS = Path(__file__).parent / "results"
LOCK = Path("/run/dunix-tests.lock")  # the e2e tests' lock (tests/e2e/conftest.py)
WORK = Path("/var/tmp/dunix-bench-run")  # seen by every host (a host's /tmp is its own)
SSH_DIR = Path("/var/tmp/dunix-bench-ssh")
SSH_PORT = 2222
DUNIX = [sys.executable, "-m", "dunix"]
HOME_NODE = "n1"
SSH_NODE = "n2"
CONTROL = f"/run/dunix/hosts/{HOME_NODE}/control.sock"
WARMUP = 20  # untimed commands first: TLS links, page cache, the ssh master
FORKY_ROUNDS = 3  # best of
FREE_TIMEOUT = 600.0  # waiting for another test run's cluster to go away

# bash arithmetic on $EPOCHREALTIME without its decimal point: microseconds, no exec
_NOW = "${EPOCHREALTIME/[.,]/}"

FORKY = f"""\
t0={_NOW}
for ((i = 0; i < 900; i++)); do /bin/true; done
for ((i = 0; i < 50; i++)); do echo x | cat > /dev/null; done
for ((i = 0; i < 50; i++)); do v=$(/bin/echo y); done
t1={_NOW}
echo $((t1 - t0))
"""


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def exclusive_cluster() -> Iterator[None]:
    """There is one simulated cluster per machine: the e2e tests and this take turns."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class Samples(NamedTuple):
    us: list[int]  # each command, µs
    per_loop_ms: float  # the whole loop over the number of commands: what runs in between too


def summary_ms(samples: Samples) -> dict[str, float]:
    ms = [s / 1000 for s in samples.us]
    return {
        "per_loop_iteration_ms": samples.per_loop_ms,
        "n": len(ms),
        "p50_ms": pct(ms, 50),
        "p90_ms": pct(ms, 90),
        "p99_ms": pct(ms, 99),
        "max_ms": max(ms),
        "mean_ms": statistics.mean(ms),
    }


def latency_loop(command: str, runs: int, out: Path) -> str:
    """A bash loop timing ``command`` ``runs`` times after WARMUP untimed ones. The samples
    (µs) are kept in an array and written to ``out`` (under /var/tmp, which every host
    sees) at the end, so nothing is relayed meanwhile; stdout only gets ``done``."""
    return (
        f"for ((i = 0; i < {WARMUP}; i++)); do {command}; done\n"
        f"d=(); t0={_NOW}\n"
        f"for ((i = 0; i < {runs}; i++)); do\n"
        f"  s={_NOW}; {command}; e={_NOW}; d+=($((e - s)))\n"
        "done\n"
        f"t1={_NOW}\n"
        f"printf '%s\\n' $((t1 - t0)) \"${{d[@]}}\" > {out}\n"
        "echo done\n"
    )


def _samples(
    proc: subprocess.CompletedProcess[str], what: str, runs: int, out: Path
) -> tuple[Samples, bool]:
    """The samples, and whether the job's stdout (``done``) arrived."""
    if proc.returncode != 0:
        raise RuntimeError(f"{what} exited {proc.returncode}: {proc.stderr[-2000:]}")
    total, *samples = [int(line) for line in out.read_text().split()]
    if len(samples) != runs:
        raise RuntimeError(f"{what}: {len(samples)} samples, not {runs}: {proc.stderr[-2000:]}")
    return Samples(samples, total / runs / 1000), proc.stdout.strip() == "done"


def dunix_run(placement: str, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DUNIX, "run", "--control", CONTROL, "--placement", placement, "--", *argv],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=WORK, timeout=timeout,
    )  # fmt: skip


def in_home(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return cluster.run_in(
        HOME_NODE, argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=WORK,
        timeout=timeout,
    )  # fmt: skip


# --- ssh with a ControlMaster, the peer for remote exec ----------------------------------


def ensure_openssh() -> None:
    """Install openssh-server and -client with apt when dpkg does not list them."""
    missing = []
    for pkg in ("openssh-server", "openssh-client"):
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


class SshPeer:
    """``sshd`` on host SSH_NODE with throwaway keys; the client side runs in HOME_NODE."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.key = SSH_DIR / "id_ed25519"
        self.config = SSH_DIR / "sshd_config"
        self.control_path = SSH_DIR / "cm-%r@%h:%p"
        self.sshd: subprocess.Popen[bytes] | None = None

    def prepare(self) -> None:
        shutil.rmtree(SSH_DIR, ignore_errors=True)
        SSH_DIR.mkdir(mode=0o700, parents=True)
        host_key = SSH_DIR / "host_ed25519"
        for path in (host_key, self.key):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dunix-bench", "-f",
                 str(path)],
                check=True, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        authorized = SSH_DIR / "authorized_keys"
        shutil.copy(self.key.with_suffix(".pub"), authorized)
        self.config.write_text(
            f"ListenAddress {self.address}\n"
            f"HostKey {host_key}\n"
            f"PidFile {SSH_DIR / 'sshd.pid'}\n"
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
        sshd = f"/usr/sbin/sshd -D -e -f {self.config} -p {SSH_PORT}"
        self.sshd = cluster.exec_in(
            SSH_NODE,
            ["unshare", "--mount", "--propagation", "private", "--",
             "sh", "-c", f"{hide}; exec {sshd}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(SSH_DIR / "sshd.log").open("wb"),
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            probe = in_home(["bash", "-c", f"exec 3<>/dev/tcp/{self.address}/{SSH_PORT}"], 5)
            if probe.returncode == 0:
                return
            if self.sshd.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"sshd in {SSH_NODE} does not listen: {self.log()}")

    def log(self) -> str:
        return (SSH_DIR / "sshd.log").read_text(errors="replace")[-2000:]

    def command(self, *extra: str) -> str:
        opts = [
            "-F", "/dev/null", "-i", str(self.key), "-p", str(SSH_PORT),
            "-o", "ControlMaster=auto", "-o", f"ControlPath={self.control_path}",
            "-o", "ControlPersist=60", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
        ]  # fmt: skip
        return " ".join(["ssh", *opts, *extra, f"root@{self.address}"])

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            in_home(["bash", "-c", self.command("-O", "exit") + " 2>/dev/null"], 10)
        if self.sshd is not None and self.sshd.poll() is None:
            self.sshd.kill()
            self.sshd.wait()


# --- measurements ------------------------------------------------------------------------


def measure_latency(runs: int, ssh: SshPeer) -> dict[str, Any]:
    timeout = 60 + runs * 0.5
    say(f"remote exec: {runs} x /bin/true inside one `dunix run --placement remote` job")
    out = WORK / "latency-dunix.txt"
    proc = dunix_run("remote", ["bash", "-c", latency_loop("/bin/true", runs, out)], timeout)
    dunix_us, dunix_stdout_ok = _samples(proc, "dunix run --placement remote", runs, out)
    if not dunix_stdout_ok:
        say(f"dunix run exited 0 but its stdout was lost: {proc.stdout!r} (see agent logs)")
    say(f"remote exec: {runs} x ssh (ControlMaster) {HOME_NODE} -> {SSH_NODE} /bin/true")
    out = WORK / "latency-ssh.txt"
    loop = latency_loop(ssh.command() + " /bin/true", runs, out)
    ssh_us, _ = _samples(in_home(["bash", "-c", loop], timeout), "ssh loop", runs, out)
    say(f"local fork+exec: {runs} x /bin/true in {HOME_NODE}")
    out = WORK / "latency-local.txt"
    loop = latency_loop("/bin/true", runs, out)
    local_us, _ = _samples(in_home(["bash", "-c", loop], timeout), "local loop", runs, out)
    return {
        "runs": runs,
        "dunix_stdout_arrived": dunix_stdout_ok,
        "dunix_remote": summary_ms(dunix_us),
        "ssh_controlmaster": summary_ms(ssh_us),
        "local_fork_exec": summary_ms(local_us),
    }


def _timed(fn: Any, *args: Any) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.perf_counter()
    proc = fn(*args)
    return time.perf_counter() - t0, proc


def measure_forky() -> dict[str, Any]:
    script = WORK / "forky.sh"
    script.write_text(FORKY)
    argv = ["bash", str(script)]
    kinds = {
        "plain": lambda: in_home(argv, 300),
        "local": lambda: dunix_run("local", argv, 300),
        "auto": lambda: dunix_run("auto", argv, 300),
    }
    inner: dict[str, list[float]] = {k: [] for k in kinds}
    wall: dict[str, list[float]] = {k: [] for k in kinds}
    for rnd in range(FORKY_ROUNDS):
        for kind, fn in kinds.items():  # interleaved, so a slow spell hits all alike
            say(f"fork-heavy script, round {rnd + 1}/{FORKY_ROUNDS}: {kind}")
            seconds, proc = _timed(fn)
            if proc.returncode != 0:
                raise RuntimeError(f"fork-heavy ({kind}) exited {proc.returncode}: {proc.stderr}")
            inner[kind].append(int(proc.stdout.split()[-1]) / 1e6)
            wall[kind].append(seconds)
    return {
        "commands": 1000,
        "rounds": FORKY_ROUNDS,
        "inner_s": inner,
        "wall_s": wall,
        "best_inner_s": {k: min(v) for k, v in inner.items()},
        "best_wall_s": {k: min(v) for k, v in wall.items()},
    }


def remote_execs_logged(since: dict[str, int]) -> dict[str, dict[str, int]]:
    """Per agent log, since the offsets in ``since``: execs a home agent sent to a peer
    (``... runs on PEER as pid N``) and those that fell back to local (``could not run``)."""
    counts = {}
    for log in sorted(Path("/run/dunix/hosts").glob("*/agent.log")):
        with log.open("rb") as f:
            f.seek(since.get(log.parent.name, 0))
            lines = f.read().splitlines()
        counts[log.parent.name] = {
            "went_remote": sum(b" runs on " in line for line in lines),
            "fell_back_local": sum(b" could not run on " in line for line in lines),
        }
    return counts


def keep_logs() -> None:
    """The agents' logs outlive the cluster (in WORK/logs), for whoever reads the timings."""
    (WORK / "logs").mkdir(parents=True, exist_ok=True)
    for log in Path("/run/dunix/hosts").glob("*/agent.log"):
        shutil.copy(log, WORK / "logs" / f"{log.parent.name}.log")


def log_sizes() -> dict[str, int]:
    return {p.parent.name: p.stat().st_size for p in Path("/run/dunix/hosts").glob("*/agent.log")}


def up_when_free(hosts: int, cpu_quota: float | None) -> None:
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
            cluster.up(hosts, cpu_quota)
            return
        except ClusterError as exc:
            if time.monotonic() > deadline or not any(
                s in str(exc) for s in ("another simulated cluster", "already up")
            ):
                raise
            time.sleep(1.0)


async def _wait_alive(hosts: int, timeout: float = 30.0) -> None:
    """Until the home agent sees every host alive (its control socket comes a bit after
    ``up`` returns)."""
    deadline = trio.current_time() + timeout
    while True:
        try:
            async with await Client.connect(Path(CONTROL)) as client:
                await client.wait_alive(hosts, max(0.1, deadline - trio.current_time()))
                return
        except PeerUnreachable:
            if trio.current_time() > deadline:
                raise
            await trio.sleep(0.2)


# --- report ------------------------------------------------------------------------------


def _x(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def table(r: dict[str, Any]) -> str:
    lat, fk = r["latency"], r["forky"]
    d, s, loc = lat["dunix_remote"], lat["ssh_controlmaster"], lat["local_fork_exec"]
    bi, bw = fk["best_inner_s"], fk["best_wall_s"]
    rows = [
        ("metric", "dunix", "peer", "ratio", "goal"),
        (f"remote exec /bin/true p50 (ms, n={lat['runs']})", f"{d['p50_ms']:.2f}",
         f"{s['p50_ms']:.2f} (ssh ControlMaster)", f"ssh/dunix {_x(s['p50_ms'], d['p50_ms'])}",
         "<= 5 ms, ssh/dunix >= 3x"),
        (f"remote exec /bin/true p99 (ms, n={lat['runs']})", f"{d['p99_ms']:.2f}",
         f"{s['p99_ms']:.2f} (ssh ControlMaster)", f"ssh/dunix {_x(s['p99_ms'], d['p99_ms'])}",
         "<= 20 ms"),
        ("remote exec /bin/true max (ms)", f"{d['max_ms']:.2f}",
         f"{s['max_ms']:.2f} (ssh ControlMaster)", f"ssh/dunix {_x(s['max_ms'], d['max_ms'])}",
         "-"),
        ("sequential loop, wall per /bin/true (ms)", f"{d['per_loop_iteration_ms']:.2f}",
         f"{s['per_loop_iteration_ms']:.2f} (ssh ControlMaster)",
         f"ssh/dunix {_x(s['per_loop_iteration_ms'], d['per_loop_iteration_ms'])}", "-"),
        ("remote exec vs local fork+exec, p50 (ms)", f"{d['p50_ms']:.2f}",
         f"{loc['p50_ms']:.2f} (local, no dunix)", f"dunix/local {_x(d['p50_ms'], loc['p50_ms'])}",
         "-"),
        ("remote exec vs local fork+exec, p99 (ms)", f"{d['p99_ms']:.2f}",
         f"{loc['p99_ms']:.2f} (local, no dunix)", f"dunix/local {_x(d['p99_ms'], loc['p99_ms'])}",
         "-"),
    ]  # fmt: skip
    for kind in ("local", "auto"):
        rows += [
            (f"fork-heavy, --placement {kind}, in-script (s)", f"{bi[kind]:.3f}",
             f"{bi['plain']:.3f} (plain bash)", f"{_x(bi[kind], bi['plain'])}", "<= 1.2x"),
            (f"fork-heavy, --placement {kind}, wall (s)", f"{bw[kind]:.3f}",
             f"{bw['plain']:.3f} (plain bash)", f"{_x(bw[kind], bw['plain'])}", "<= 1.2x"),
        ]  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1000, help="timed /bin/true execs per side")
    ap.add_argument("--quick", action="store_true", help="200 runs")
    ap.add_argument("--hosts", type=int, default=3)
    ap.add_argument(
        "--cpu-quota", type=float, default=None,
        help="CPUs per host (default: none; a CFS quota's 100 ms throttling would own p99)",
    )  # fmt: skip
    ap.add_argument(
        "--no-lock", action="store_true",
        help=f"the caller holds {LOCK} already (as `flock {LOCK} python -m ... --no-lock`)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    runs = 200 if args.quick else args.runs
    ensure_openssh()
    WORK.mkdir(parents=True, exist_ok=True)
    ssh = SshPeer(f"10.213.0.{int(SSH_NODE[1:])}")
    ssh.prepare()
    if not args.no_lock:
        say(f"taking {LOCK} (one simulated cluster per machine)")
    with contextlib.nullcontext() if args.no_lock else exclusive_cluster():
        say(f"cluster up: {args.hosts} hosts, cpu quota {args.cpu_quota or 'none'}")
        up_when_free(args.hosts, args.cpu_quota)
        try:
            trio.run(_wait_alive, args.hosts)
            ssh.start()
            try:
                offsets = log_sizes()
                latency = measure_latency(runs, ssh)
                logged = remote_execs_logged(offsets)
            finally:
                ssh.stop()
            offsets = log_sizes()
            forky = measure_forky()
            forky["remote_exec_log_lines"] = remote_execs_logged(offsets)
            latency["remote_exec_log_lines"] = logged
        finally:
            keep_logs()
            cluster.down()
    result = {
        "hosts": args.hosts,
        "cpu_quota": args.cpu_quota,
        "machine_cpus": os.cpu_count(),
        "latency": latency,
        "forky": forky,
    }
    print(table(result))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "run.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
