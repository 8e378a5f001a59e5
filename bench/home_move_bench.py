"""`dunix migrate` of a process at its home, plain dump against post-copy (issue 4).

A holder that touched SIZE MiB (one byte a page) runs in n1 as the background child of
a shell started by `dunix run --node n1 --placement local`; `dunix migrate GPID n2` moves
it away from home (dunix/agent/homemove.py: a deputy stays in n1). The same moves run
in two clusters one after the other, real agents in 3 hosts: one whose agents have
``DUNIX_MIGRATE_LAZY=never`` (the plain streamed dump every home move made before
post-copy), one with the default (post-copy at ``lazy.LAZY_MIN_RSS`` and above).
Reported (median of the rounds): downtime (frozen to running on n2, `dunix migrate`'s
"frozen for"), every page (plain: restored, all pages came with the images; post-copy:
the home's criu returned after serving the last page), the whole move as the client
waited for it (it ends with the deputize, after the last page), and the holder's
checksum-free check that it ends with its own status through the deputy.

Before each move the bench touches and frees fresh memory as bench/migrate_bench.py does
(the VM hands free memory back to the hypervisor). Run (root):
``python -m bench.home_move_bench [--sizes 256,1024] [--rounds 3] [--cpu-quota Q]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from bench._cluster import LOCK, exclusive_cluster, say
from bench.migrate_bench import warm_free_memory
from dunix import cluster
from dunix.cluster import HostInfo

RESULTS = Path(__file__).parent / "results"
WORK = Path("/var/tmp/dunix-bench-home-move")  # every host sees it (cwd of the job)
N1 = "/run/dunix/hosts/n1/control.sock"
DUNIX = [sys.executable, "-m", "dunix"]
HOLDER = textwrap.dedent(
    """\
    import os, sys, time
    size, stop = int(sys.argv[1]) << 20, sys.argv[2]
    block = bytearray(size)
    for i in range(0, size, 4096):
        block[i] = 1
    print("ready", flush=True)
    while not os.path.exists(stop):
        time.sleep(0.01)
    sys.exit(7)
    """
)
JOB = '/usr/bin/python3 -c "$1" "$2" "$3" & c=$!; wait $c; echo status=$?'
PHASE = re.compile(r"^\s+(\S.*?)\s+([0-9.]+) ms$")
DOWNTIME = re.compile(r"frozen for ([0-9.]+) ms")


def dunix(*args: str, timeout: float = 120) -> str:
    out = subprocess.run([*DUNIX, *args], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"dunix {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


def holder_gpid() -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        procs = json.loads(dunix("ps", "--json", "--control", N1))
        found = [p for p in procs if p["cmd"].startswith("/usr/bin/python3 -c")]
        if found:
            return int(found[0]["gpid"])
        time.sleep(0.1)
    raise RuntimeError("the holder did not show in ps")


def move_once(mib: int) -> dict[str, float]:
    stop = WORK / f"stop-{os.getpid()}"
    stop.unlink(missing_ok=True)
    run = subprocess.Popen(
        [*DUNIX, "run", "--node", "n1", "--control", N1, "--placement", "local", "--",
         "sh", "-c", JOB, "sh", HOLDER, str(mib), str(stop)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=WORK,
        text=True,
    )  # fmt: skip
    try:
        assert run.stdout is not None
        if run.stdout.readline().strip() != "ready":
            raise RuntimeError(
                f"the holder did not start: {run.stderr.read() if run.stderr else ''}"
            )
        gpid = holder_gpid()
        warm_free_memory(mib)
        t0 = time.monotonic()
        out = dunix("migrate", str(gpid), "n2", "--control", N1)
        client = time.monotonic() - t0
        stop.touch()
        if run.stdout.readline().strip() != "status=7":
            raise RuntimeError("the holder's status did not reach its shell")
        run.wait(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        stop.unlink(missing_ok=True)
    phases = {m[1]: float(m[2]) for m in map(PHASE.match, out.splitlines()) if m}
    down = DOWNTIME.search(out)
    lazy = "post-copy: every page served" in phases
    every = phases["post-copy: every page served"] if lazy else phases["restored"]
    return {
        "lazy": float(lazy),
        "frozen_ms": phases["frozen"],
        "downtime_ms": float(down[1]) if down else -1.0,
        "every_page_ms": every,
        "deputized_ms": phases["deputized"],
        "client_ms": client * 1000,
    }


def measure(sizes: list[int], rounds: int, quota: float | None) -> list[dict[str, Any]]:
    WORK.mkdir(parents=True, exist_ok=True)
    os.chmod(WORK, 0o777)
    rows: dict[int, dict[str, Any]] = {m: {"mib": m, "cpu_quota": quota} for m in sizes}
    for kind, env in (("plain", ["env", "DUNIX_MIGRATE_LAZY=never"]), ("lazy", [])):

        def argv(host: HostInfo, env: list[str] = env) -> list[str]:
            return [*env, *cluster.default_agent_argv(host)]

        with exclusive_cluster():
            cluster.down()
            cluster.up(3, quota, agent_argv=argv)
            try:
                time.sleep(2.0)  # membership settles (n2 alive at n1)
                for mib in sizes:
                    say(f"{kind}: {mib} MiB, {rounds} rounds, load {os.getloadavg()[0]:.2f}")
                    runs = [move_once(mib) for _ in range(rounds)]
                    rows[mib][kind] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                    rows[mib][kind + "_runs"] = runs
            finally:
                cluster.down()
    return list(rows.values())


def table(rows: list[dict[str, Any]]) -> str:
    head = ("size", "plain downtime", "plain every page", "post-copy downtime",
            "post-copy every page", "post-copy whole move", "downtime plain/post-copy")  # fmt: skip
    out = [head]
    for r in rows:
        p, lz = r.get("plain"), r.get("lazy")
        ms = "{:.0f} ms".format
        out.append(
            (
                f"{r['mib']} MiB",
                ms(p["downtime_ms"]) if p else "-",
                ms(p["every_page_ms"]) if p else "-",
                ms(lz["downtime_ms"]) if lz else "-",
                ms(lz["every_page_ms"]) if lz else "-",
                ms(lz["client_ms"]) if lz else "-",
                f"{p['downtime_ms'] / lz['downtime_ms']:.1f}x" if p and lz else "-",
            )
        )
    widths = [max(len(row[i]) for row in out) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in out)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="256,1024", help="MiB touched, comma-separated")
    ap.add_argument("--rounds", type=int, default=3, help="moves per size (median reported)")
    ap.add_argument("--cpu-quota", type=float, default=None, help="hosts' CPU quota")
    ap.add_argument("--out", default="home_move.json", help="file name in bench/results")
    args = ap.parse_args(argv)
    say(f"taking {LOCK} (one simulated cluster per machine); load {os.getloadavg()}")
    rows = measure([int(s) for s in args.sizes.split(",")], args.rounds, args.cpu_quota)
    print(table(rows))
    print(f"load average at the end: {os.getloadavg()}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
