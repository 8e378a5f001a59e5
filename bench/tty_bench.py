"""Keystroke echo through `dunix run` on a terminal: local job vs every exec remote.

A job `cat` runs on a real pty (as tests/e2e/test_run_tty.py drives it); each key written
to the master is timed until its echo comes back. Local: caller terminal → agent → the
job's pty (its line discipline echoes) → back. Remote: the same, plus the hops to the
guest's pty, which echoes (docs/run.md, "Terminal").

    python -m bench.tty_bench [--keys 300] [--no-lock]
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m bench.tty_bench")
    p.add_argument("--keys", type=int, default=300)
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
        finally:
            if not args.no_lock:
                cluster.down()
    print(f"{'placement':<10} {'echo p50 ms':>12} {'echo p99 ms':>12}")
    for placement, r in results.items():
        print(f"{placement:<10} {r['p50_ms']:>12.2f} {r['p99_ms']:>12.2f}")
    return results


if __name__ == "__main__":
    main()
