"""Keystroke echo through `dunix run` on a terminal: local job vs every exec remote.

A job `cat` runs on a real pty (as tests/e2e/test_run_tty.py drives it); each key written
to the master is timed until its echo comes back. Local: caller terminal → agent → the
job's pty (its line discipline echoes) → back. Remote: the same, plus the hops to the
guest's pty, which echoes (docs/run.md, "Terminal").

Also: how long a raw-mode job takes to end after it read its key (the remote-tty end once
hung there), through one exec and through a chain of three remote execs; and how fast a
program's output (`seq 1 200000`, 1.3 MB) reaches the caller, checked whole.

    python -m bench.tty_bench [--keys 300] [--ends 10] [--no-lock]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from typing import Any

import trio

from bench._cluster import control, exclusive_cluster, say, up_when_free, wait_alive
from dunix import cluster

WORK = Path("/var/tmp/dunix-e2e")  # a folder every host sees


def echo_latency(placement: str, keys: int) -> dict[str, float]:
    from tests.e2e.test_run_tty import Terminal, run_line

    WORK.mkdir(parents=True, exist_ok=True)
    t = Terminal(run_line(placement, "sh", "-c", "echo ready; exec cat") + "\nexit", WORK)
    try:
        t.expect("ready")
        times = []
        for _ in range(keys):
            t.out = b""
            start = time.perf_counter()
            t.write(b"x")
            t.expect("x", timeout=10)
            times.append((time.perf_counter() - start) * 1000)
        t.write(b"\x04")
    finally:
        t.close()
    times.sort()
    return {"p50_ms": times[len(times) // 2], "p99_ms": times[int(len(times) * 0.99) - 1]}


def end_latency(placement: str, runs: int, hops: int = 1) -> dict[str, float]:
    """Key written → the caller's shell runs its next line, for a raw-mode reader."""
    import shlex

    from tests.e2e.test_run_tty import RAW_READ, Terminal, run_line

    command = "exec /usr/bin/python3 -c " + shlex.quote(RAW_READ)
    for _ in range(hops - 1):
        command = "exec sh -c " + shlex.quote(command)
    times = []
    for _ in range(runs):
        t = Terminal(run_line(placement, "sh", "-c", command) + '\necho "rc=$?"', WORK)
        try:
            t.expect("ready")
            start = time.perf_counter()
            t.write(b"x")
            t.expect("rc=0", timeout=30)
            times.append((time.perf_counter() - start) * 1000)
        finally:
            t.close()
    times.sort()
    return {"p50_ms": times[len(times) // 2], "max_ms": times[-1]}


def output_rate(placement: str, count: int = 200000) -> dict[str, float]:
    from tests.e2e.test_run_tty import Terminal, run_line

    t = Terminal(run_line(placement, "seq", "1", str(count)) + '\necho "rc=$?"', WORK)
    try:
        start = time.perf_counter()
        t.expect("rc=0", timeout=120)
        took = time.perf_counter() - start  # includes the job's start (~0.1-0.3 s)
    finally:
        t.close()
    lines = [x for x in t.out.decode().split("\r\n") if x.isdigit()]
    whole = lines == [str(n) for n in range(1, count + 1)]
    return {"mb_per_s": len(t.out) / took / 1e6, "seconds": took, "whole": float(whole)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m bench.tty_bench")
    p.add_argument("--keys", type=int, default=300)
    p.add_argument("--ends", type=int, default=10, help="raw-mode jobs timed to their end")
    p.add_argument("--no-lock", action="store_true", help="a cluster is up and ours already")
    args = p.parse_args(argv)
    results: dict[str, Any] = {}
    with contextlib.nullcontext() if args.no_lock else exclusive_cluster():
        if not args.no_lock:
            up_when_free(3, 0.5)
        try:
            trio.run(wait_alive, control("n1"), 3)
            for placement in ("local", "remote"):
                results[placement] = echo_latency(placement, args.keys)
                say(f"{placement}: {results[placement]}")
            for placement, hops in (("local", 1), ("remote", 1), ("remote", 3)):
                name = f"end {placement} x{hops}"
                results[name] = end_latency(placement, args.ends, hops)
                say(f"{name}: {results[name]}")
            for placement in ("local", "remote"):
                results[f"output {placement}"] = output_rate(placement)
                say(f"output {placement}: {results[f'output {placement}']}")
        finally:
            if not args.no_lock:
                cluster.down()
    print(f"{'placement':<10} {'echo p50 ms':>12} {'echo p99 ms':>12}")
    for placement in ("local", "remote"):
        r = results[placement]
        print(f"{placement:<10} {r['p50_ms']:>12.2f} {r['p99_ms']:>12.2f}")
    print(f"{'raw job end':<16} {'p50 ms':>8} {'max ms':>8}")
    for name, r in results.items():
        if name.startswith("end "):
            print(f"{name[4:]:<16} {r['p50_ms']:>8.1f} {r['max_ms']:>8.1f}")
    for name, r in results.items():
        if name.startswith("output "):
            whole = bool(r["whole"])
            print(f"{name}: {r['mb_per_s']:.2f} MB/s ({r['seconds']:.2f} s), whole: {whole}")
    return results


if __name__ == "__main__":
    main()
