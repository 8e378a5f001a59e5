"""The live balancer on a real simulated cluster: 12 CPU-bound workers started on 1 of 4 hosts.

Issue 4 (Benchmark, "Balancer"): a Python parent under `dunix run --node n1` forks 12
workers without exec (so they all start on n1: fork-time placement is off by default),
each doing the same fixed CPU work (``--work`` CPU-seconds at this machine's full speed,
counted in loop iterations, so a move does not reset it). 4 hosts with 0.5-CPU quotas.
Two runs side by side, each on a fresh cluster: the agents' balancer on (the default
config) and off (``balancer = false``). Reported per run: the wall time from the start to
the last worker's end, the time until the load is even (the workers running on each host
differ by at most one while at least half of them still run, read from `dunix ps --json`
every 0.5 s), the moves made, and the hosts the workers ended on; the lower bound is the
total CPU work over the 4 hosts' 2 CPUs. bench/balance_sim.py is the same scenario as a
simulation of the sans-IO core.

    sudo .venv/bin/python -m bench.balance_bench [--work S] [--workers N]

Prints a table and writes bench/results/balance.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

from bench._cluster import HOSTS as HOSTS_DIR
from bench._cluster import LOCK, control, exclusive_cluster, say, up_when_free, wait_alive
from dunix import cluster

RESULTS = Path(__file__).parent / "results"
WORK = Path("/var/tmp/dunix-bench-balance")  # seen by every host (a host's /tmp is its own)
HOSTS = ("n1", "n2", "n3", "n4")
QUOTA = 0.5

# argv: workers, iterations each. Prints its pid, then per worker "host seconds" at its end.
PARENT = r"""
import os, socket, sys, time
workers, n = int(sys.argv[1]), int(sys.argv[2])
print(os.getpid(), flush=True)
r, w = os.pipe()
t0 = time.time()
for _ in range(workers):
    if os.fork() == 0:
        os.close(r)
        s = 0
        for i in range(n):
            s += i
        os.write(w, b"%s %.3f\n" % (socket.gethostname().encode(), time.time() - t0))
        os._exit(0 if s else 1)
os.close(w)
with os.fdopen(r) as ends:
    for line in ends:
        print(line, end="", flush=True)
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
"""


def iterations_per_cpu_second() -> int:
    """The loop's speed on this machine, alone and without a quota."""
    probe = (
        "import time\nn = 2_000_000\nt = time.process_time()\ns = 0\n"
        "for i in range(n):\n    s += i\nprint(n / (time.process_time() - t))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return int(float(out.stdout))


def agent_argv(balancer: bool) -> cluster.AgentArgv:
    config = WORK / f"agent-balancer-{'on' if balancer else 'off'}.toml"
    config.write_text(f"[agent]\nbalancer = {'true' if balancer else 'false'}\n")

    def argv(host: cluster.HostInfo) -> list[str]:
        return [*cluster.default_agent_argv(host), "--config", str(config)]

    return argv


def ps_workers(parent_pid: int) -> list[dict[str, Any]]:
    """The job's workers as `dunix ps --json` on n1 lists them (the parent left out), one
    row per gpid: the host that runs it, not its deputy at home."""
    out = subprocess.run(
        [sys.executable, "-m", "dunix", "ps", "--json", "--control", str(control("n1"))],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    if out.returncode != 0:
        return []
    rows: dict[int, dict[str, Any]] = {}  # a moved worker is listed by its home and its host
    for p in json.loads(out.stdout):
        ours = "python3" in p.get("cmd", "") and p.get("home") == "n1" and p["pid"] != parent_pid
        if ours and rows.get(p["gpid"], {}).get("state", "deputy") == "deputy":
            rows[p["gpid"]] = p
    return list(rows.values())


def one_run(balancer: bool, workers: int, iterations: int) -> dict[str, Any]:
    say(f"4 hosts ({QUOTA} CPU each), balancer {'on' if balancer else 'off'}")
    up_when_free(len(HOSTS), QUOTA, agent_argv(balancer))
    try:
        trio.run(wait_alive, control("n1"), len(HOSTS))
        start = time.monotonic()
        job = subprocess.Popen(
            [sys.executable, "-m", "dunix", "run", "--node", "n1", "--control",
             str(control("n1")), "--", "/usr/bin/python3", "-c", PARENT, str(workers),
             str(iterations)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=WORK,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert job.stdout is not None
        parent_pid = int(job.stdout.readline())
        even_at: float | None = None
        moves: dict[int, int] = {}
        samples = []
        while job.poll() is None:
            listed = ps_workers(parent_pid)  # one row per worker, ``node`` where it runs
            per_host = {h: sum(1 for p in listed if p.get("node") == h) for h in HOSTS}
            for p in listed:
                moves[p["gpid"]] = max(moves.get(p["gpid"], 0), int(p.get("moves", 0)))
            now = round(time.monotonic() - start, 2)
            samples.append({"t": now, "per_host": per_host})
            if (
                even_at is None and 2 * len(listed) >= workers
                and max(per_host.values()) - min(per_host.values()) <= 1
            ):  # fmt: skip
                even_at = now  # (with at least half of them still running: not the end)
            time.sleep(0.5)
        wall = time.monotonic() - start
        rest, err = job.communicate()
        if job.returncode != 0:
            raise SystemExit(f"the job failed ({job.returncode}): {err[-2000:]}")
        ends = [line.split() for line in rest.splitlines() if line.strip()]
        if len(ends) != workers:
            raise SystemExit(f"{len(ends)} of {workers} workers reported: {rest[-500:]}")
        return {
            "balancer": balancer,
            "wall_s": round(wall, 2),
            "even_after_s": even_at,
            "moves": sum(moves.values()),
            "ended_on": {h: sum(1 for host, _ in ends if host == h) for h in HOSTS},
            "last_end_s": max(float(t) for _, t in ends),
            "samples": samples,
            "decisions": balancer_log(),
        }
    finally:
        cluster.down()


def balancer_log() -> list[str]:
    """Every host's balancer lines (decisions with the loads they saw, outcomes)."""
    lines = []
    for host in HOSTS:
        log = HOSTS_DIR / host / "agent.log"
        if log.exists():
            lines += [f"{host}: {line.strip()}" for line in log.read_text().splitlines()
                      if "balancer:" in line]  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=float, default=2.0,
                    help="CPU-seconds of work per worker at full speed")  # fmt: skip
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--no-lock", action="store_true",
                    help=f"the caller holds {LOCK} already")  # fmt: skip
    args = ap.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    os.chmod(WORK, 0o777)
    iterations = int(iterations_per_cpu_second() * args.work)
    total_cpu = args.work * args.workers
    results: dict[str, Any] = {
        "workers": args.workers, "work_cpu_s": args.work, "iterations": iterations,
        "hosts": len(HOSTS), "cpu_quota": QUOTA,
        "lower_bound_s": round(total_cpu / (QUOTA * len(HOSTS)), 2),
        "one_host_s": round(total_cpu / QUOTA, 2),
    }  # fmt: skip

    def measure() -> None:
        for balancer in (True, False):
            results["on" if balancer else "off"] = one_run(balancer, args.workers, iterations)

    if args.no_lock:
        measure()
    else:
        with exclusive_cluster():
            measure()
    on, off = results["on"], results["off"]
    results["speedup"] = round(off["wall_s"] / on["wall_s"], 2)
    print(f"\n{args.workers} workers x {args.work} CPU-s started on n1; 4 hosts x {QUOTA} CPU")
    print(f"{'':<16}{'wall s':>8}{'even after s':>14}{'moves':>7}  ended on (n1..n4)")
    for name, row in (("balancer on", on), ("balancer off", off)):
        even = "never" if row["even_after_s"] is None else f"{row['even_after_s']:.1f}"
        ended = " ".join(str(row["ended_on"][h]) for h in HOSTS)
        print(f"{name:<16}{row['wall_s']:>8.1f}{even:>14}{row['moves']:>7}  {ended}")
    print(f"lower bound (all 4 hosts busy from the start): {results['lower_bound_s']} s; "
          f"one host: {results['one_host_s']} s")  # fmt: skip
    print(f"balancer off / on: {results['speedup']}x")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "balance.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
