"""`dunix run` on a real simulated cluster (issue 3's benchmark), side by side in one run:

* remote exec latency of ``/bin/true``, p50 and p99, timed inside one job so the client's
  start-up is not counted: bash's ``$EPOCHREALTIME`` (a builtin variable, no exec) before
  and after each ``/bin/true``, so every sample is one full remote exec (tracer stop,
  deputy, RemoteExec over TLS, spawn on the peer, stdio relay, exit status back). Peers:
  ``ssh`` with a ControlMaster from host n1 into an ``sshd`` on host n2 (the traffic
  crosses the same veths), and a plain local fork+exec in n1;
* a fork-heavy script kept local (1,000 short commands, pipelines and command
  substitutions included) under ``dunix run --placement local`` and ``auto`` against plain
  ``bash`` in the same host, best of 3: the time bash itself sees (the tracer's cost),
  the wall time around the command (``dunix run``'s client and job set-up included), and
  the CPU time of everything in the home host (job, tracer, agent: its cgroup).

Jobs' stdio are pipes and their files live under /var/tmp: a simulated host has its own
/tmp, so it could not see this machine's. ``openssh-server`` is installed with apt when
missing; its keys are throwaway ones under /var/tmp/dunix-bench-ssh/.

Run (root): ``python -m bench.run_bench [--runs 1000] [--hosts 3] [--cpu-quota C]``;
quick: ``--quick`` (200 runs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import trio

from bench._cluster import (
    LOCK,
    SshPeer,
    ensure_packages,
    exclusive_cluster,
    keep_logs,
    log_sizes,
    remote_execs_logged,
    say,
    up_when_free,
    wait_alive,
)
from dunix import cluster

RESULTS = Path(__file__).parent / "results"
WORK = Path("/var/tmp/dunix-bench-run")  # seen by every host (a host's /tmp is its own)
DUNIX = [sys.executable, "-m", "dunix"]
HOME_NODE = "n1"
SSH_NODE = "n2"
CONTROL = f"/run/dunix/hosts/{HOME_NODE}/control.sock"
WARMUP = 20  # untimed commands first: TLS links, page cache, the ssh master
FORKY_ROUNDS = 3  # best of

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


def host_cpu_s(node: str | None = None) -> float:
    """CPU seconds used so far by everything in host ``node`` (its cgroup), or in every
    host when None: the job, its tracer and the agent all count against the host's quota,
    so this is the cost that noise on a shared machine hides least. Every host, because
    an ``auto`` job's first process may start on a peer (then the home's figure is ~0)."""
    total = 0.0
    for host in cluster.status():
        if node is not None and host.name != node:
            continue
        total += _cgroup_cpu_s(host.cgroup)
    return total


def _cgroup_cpu_s(cgroups: Any) -> float:
    for cg in cgroups:
        with contextlib.suppress(OSError, ValueError):
            if (cg / "cpuacct.usage").exists():  # v1
                return int((cg / "cpuacct.usage").read_text()) / 1e9
            for line in (cg / "cpu.stat").read_text().splitlines():  # v2
                if line.startswith("usage_usec "):
                    return int(line.split()[1]) / 1e6
    return float("nan")


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
    cpu: dict[str, list[float]] = {k: [] for k in kinds}
    for rnd in range(FORKY_ROUNDS):
        for kind, fn in kinds.items():  # interleaved, so a slow spell hits all alike
            say(f"fork-heavy script, round {rnd + 1}/{FORKY_ROUNDS}: {kind}")
            before = host_cpu_s()
            seconds, proc = _timed(fn)
            cpu[kind].append(host_cpu_s() - before)
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
        "host_cpu_s": cpu,
        "best_host_cpu_s": {k: min(v) for k, v in cpu.items()},
    }


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
        if "best_host_cpu_s" in fk:  # everything in the home host: job, tracer, agent
            bc = fk["best_host_cpu_s"]
            rows.append(
                (f"fork-heavy, --placement {kind}, all hosts' CPU (s)", f"{bc[kind]:.3f}",
                 f"{bc['plain']:.3f} (plain bash)", f"{_x(bc[kind], bc['plain'])}", "-")
            )  # fmt: skip
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
        help="CPUs per host (default: none; a CFS quota's throttling, up to half its 25 ms "
        "period, shows in p99)",
    )  # fmt: skip
    ap.add_argument(
        "--no-lock", action="store_true",
        help=f"the caller holds {LOCK} already (as `flock {LOCK} python -m ... --no-lock`)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    runs = 200 if args.quick else args.runs
    ensure_packages("openssh-server", "openssh-client")
    WORK.mkdir(parents=True, exist_ok=True)
    ssh = SshPeer(SSH_NODE, HOME_NODE)
    ssh.prepare()
    if not args.no_lock:
        say(f"taking {LOCK} (one simulated cluster per machine)")
    with contextlib.nullcontext() if args.no_lock else exclusive_cluster():
        say(f"cluster up: {args.hosts} hosts, cpu quota {args.cpu_quota or 'none'}")
        up_when_free(args.hosts, args.cpu_quota)
        try:
            trio.run(wait_alive, Path(CONTROL), args.hosts)
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
            keep_logs(WORK / "logs")
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
