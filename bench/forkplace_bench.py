"""Fork-time placement vs exec-time placement vs a local fork, on a 3-host simulated cluster.

Issue 4 part 2: a child that forks without exec can be moved to a peer at its fork stop
(the tracer holds it, the home dumps it with CRIU, the peer restores it, a deputy stays:
dunix/agent/homemove.py). This measures, for children started one at a time by a Python
parent under `dunix run` (0.5-CPU hosts):

* ``local fork``: fork, the child runs at home (``--placement local``);
* ``fork-time``: the same with ``DUNIX_FORK_PLACEMENT=remote``: each child moves at fork;
* ``local exec``: fork + exec of ``python3 -S -c ...`` at home;
* ``exec-time``: the same with ``--placement remote``: the exec starts on a peer.

The time is from just before ``fork()`` in the parent to the child's (or its program's)
first Python line, both read from CLOCK_REALTIME, which the simulated hosts share.
Prints a table and writes bench/results/forkplace.json.

    sudo .venv/bin/python -m bench.forkplace_bench [--children N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from bench._cluster import LOCK, control, exclusive_cluster, say, up_when_free, wait_alive
from dunix import cluster

RESULTS = Path(__file__).parent / "results"
WORK = Path("/var/tmp/dunix-bench-forkplace")  # seen by every host

# argv: N, exec (0/1). Each child reports "start-time hostname" on its own pipe.
PARENT = r"""
import os, socket, sys, time
n, do_exec = int(sys.argv[1]), sys.argv[2] == "1"
CHILD = ("import os, socket, time; t = time.time(); "
         "os.write(1, b'%.6f %s' % (t, socket.gethostname().encode()))")
for k in range(n):
    r, w = os.pipe()
    t0 = time.time()
    pid = os.fork()
    if pid == 0:
        if do_exec:
            os.dup2(w, 1)
            os.execv("/usr/bin/python3", ["python3", "-S", "-c", CHILD])
        t = time.time()
        os.write(w, b"%.6f %s" % (t, socket.gethostname().encode()))
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 4096):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    start, host = data.decode().split()
    print("%.3f %s %s" % ((float(start) - t0) * 1000.0, host, socket.gethostname()), flush=True)
"""

ROWS = (
    ("local fork", "local", "", False),
    ("fork-time", "local", "remote", False),
    ("local exec", "local", "", True),
    ("exec-time", "remote", "", True),
)


def run_row(mode: str, fork_env: str, do_exec: bool, children: int) -> dict[str, Any]:
    env = dict(os.environ)
    if fork_env:
        env["DUNIX_FORK_PLACEMENT"] = fork_env
    out = subprocess.run(
        [sys.executable, "-m", "dunix", "run", "--node", "n1", "--control", str(control("n1")),
         "--placement", mode, "--", "/usr/bin/python3", "-c", PARENT, str(children),
         "1" if do_exec else "0"],
        capture_output=True, text=True, env=env, cwd=WORK, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"dunix run failed ({out.returncode}): {out.stderr[-2000:]}")
    ms, hosts, parents = [], [], []
    for line in out.stdout.split("\n"):
        if line.strip():
            value, host, parent = line.split()
            ms.append(float(value))
            hosts.append(host)
            parents.append(parent)
    return {
        "ms": ms,
        "median_ms": round(statistics.median(ms), 1),
        "min_ms": round(min(ms), 1),
        "max_ms": round(max(ms), 1),
        "hosts": sorted(set(hosts)),
        "parent_on": sorted(set(parents)),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--children", type=int, default=10, help="children per row (one at a time)")
    ap.add_argument("--no-lock", action="store_true",
                    help=f"the caller holds {LOCK} already")  # fmt: skip
    args = ap.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    os.chmod(WORK, 0o777)
    results: dict[str, Any] = {"children": args.children, "hosts": 3, "cpu_quota": 0.5}

    def measure() -> None:
        say("bringing up 3 hosts (0.5 CPU each)")
        up_when_free(3, 0.5)
        try:
            trio.run(wait_alive, control("n1"), 3)
            run_row("local", "", False, 2)  # warm caches (python, the tracer)
            for name, mode, fork_env, do_exec in ROWS:
                say(f"{name}: {args.children} children")
                results[name] = run_row(mode, fork_env, do_exec, args.children)
        finally:
            cluster.down()

    if args.no_lock:
        measure()
    else:
        with exclusive_cluster():
            measure()
    print(f"\n{'fork → child running':<22}{'median ms':>10}{'min':>8}{'max':>8}  "
          "children on (parent on)")  # fmt: skip
    for name, *_ in ROWS:
        row = results[name]
        print(f"{name:<22}{row['median_ms']:>10}{row['min_ms']:>8}{row['max_ms']:>8}  "
              f"{','.join(row['hosts'])} ({','.join(row['parent_on'])})")  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "forkplace.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
