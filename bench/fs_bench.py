"""storagefs against the disk and the network it runs on (issue 5's benchmark), side by side
in one run on simulated hosts with 0.5-CPU quotas:

1. sequential write and read with 1 MiB blocks (fio, ``psync``, one job; the write ends
   with an fsync, the read starts with the file's page cache dropped by fio):
   a file owned by n1 written and read in n1 through ``/dunix/fs`` vs the same size in a
   folder on n1's disk directly (goal: storagefs >= 70 %); a file owned by n1 written and
   read from n2 through ``/dunix/fs`` vs ``iperf3`` from n2 to n1 (goal: >= 50 %);
2. metadata in n1: creates (open O_CREAT + close), stats and unlinks per second of a few
   thousand empty files, in storagefs vs the disk directly;
3. the lookup of a name nobody has, p50/p99 over a few hundred names, with 3 and with 8
   hosts: the first lookup asks every peer, the second is answered by the negative cache
   (goal: p50 <= 5 ms at 8 hosts for the first).

fio runs inside the host (its namespaces and cgroup, the same quota as the agent that serves
it); the storagefs agent also pays for every byte in Python (FUSE request, msgpack, TLS to a
peer). MB/s are 10^6 bytes/s. A side that fails is reported in the table and the JSON, not
raised. ``fio`` and ``iperf3`` are installed with apt when missing (scripts/setup.sh lists
them too).

Run (root): ``python -m bench.fs_bench``, or ``--quick`` (smaller files, fewer names);
``--local N`` runs only 1's local writes, N rounds of A B B A (this VM's disk varies 5x
between two runs of the same write: read every pair), and 2, on one 3-host cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trio

from bench._cluster import (
    LOCK,
    address,
    control,
    ensure_packages,
    exclusive_cluster,
    say,
    up_when_free,
    wait_alive,
)
from dunix import cluster

RESULTS = Path(__file__).parent / "results"
FS = "/dunix/fs"
DIRECT = "/var/lib/dunix/local/fs-bench"  # on the host's disk, beside its storagefs store
TREE = "/var/lib/dunix/local/storagefs/tree"  # the storagefs store's files (agent default)
#: drop a file's clean pages from the page cache, so a read comes from the disk
UNCACHE = "import os,sys; fd=os.open(sys.argv[1],os.O_RDONLY); os.posix_fadvise(fd,0,0,4)"
CPU_QUOTA = 0.5
OWNER, READER = "n1", "n2"
GOALS = {"local": 0.70, "peer": 0.50, "lookup_p50_ms_8": 5.0}
#: block sizes of the peer part's small-write runs (``--peer``)
SMALL_WRITES = ("4k", "64k")

METADATA = """\
import json, os, sys, time
folder, n = sys.argv[1], int(sys.argv[2])
os.makedirs(folder, exist_ok=True)
names = [os.path.join(folder, f"f{i}") for i in range(n)]
out = {}
t = time.perf_counter()
for p in names:
    os.close(os.open(p, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644))
out["creates"] = n / (time.perf_counter() - t)
t = time.perf_counter()
for p in names:
    os.stat(p)
out["stats"] = n / (time.perf_counter() - t)
t = time.perf_counter()
for p in names:
    os.unlink(p)
out["unlinks"] = n / (time.perf_counter() - t)
os.rmdir(folder)
print(json.dumps(out))
"""

PROBE = """\
import os, sys, time
n = int(sys.argv[1])
first, again = [], []
for i in range(n):
    p = f"/dunix/fs/missing-{os.getpid()}-{i}"
    for bucket in (first, again):
        t = time.perf_counter()
        try:
            os.stat(p)
        except FileNotFoundError:
            pass
        bucket.append(time.perf_counter() - t)
print(" ".join(map(str, first)))
print(" ".join(map(str, again)))
"""


@dataclass(frozen=True)
class Sizes:
    file_mib: int
    meta_files: int
    lookups: int
    iperf_s: int


FULL = Sizes(file_mib=512, meta_files=3000, lookups=300, iperf_s=5)
QUICK = Sizes(file_mib=128, meta_files=1000, lookups=150, iperf_s=2)


class Failed(Exception):
    """A side did not give a number: the reason goes in the report."""


def run_in(host: str, argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    try:
        proc = cluster.run_in(host, argv, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise Failed(f"stalled: no end after {exc.timeout:.0f} s") from exc
    if proc.returncode != 0:
        raise Failed(f"{argv[0]} exited {proc.returncode}: {proc.stderr.strip()[-600:]}")
    return proc


def side(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return {"ok": True, **fn()}
    except Failed as exc:
        say(f"  failed: {exc}")
        return {"ok": False, "error": str(exc)}


# --- 1. sequential throughput ------------------------------------------------------------


def fio(host: str, path: str, rw: str, mib: int, bs: str = "1M") -> dict[str, Any]:
    """One fio job of ``rw`` (write or read) over ``mib`` MiB of ``path`` in ``host``."""
    argv = [
        "fio", "--name=seq", f"--filename={path}", f"--rw={rw}", f"--bs={bs}", f"--size={mib}M",
        "--ioengine=psync", "--numjobs=1", "--fallocate=none", "--invalidate=1",
        "--output-format=json",
    ]  # fmt: skip
    if rw == "write":
        argv.append("--end_fsync=1")
    if rw == "read":
        # fio drops the cache of the file it reads; under storagefs that is the FUSE file,
        # so the backing file's pages go too: both sides read from the disk
        backing = path.replace(FS, TREE, 1) if path.startswith(FS) else path
        run_in(OWNER, [sys.executable, "-c", UNCACHE, backing])
    started = time.perf_counter()
    proc = run_in(host, argv)
    wall = time.perf_counter() - started  # fio's start to its exit: its open counts too
    try:
        job = json.loads(proc.stdout[proc.stdout.index("{") :])["jobs"][0]
    except (ValueError, KeyError, IndexError) as exc:
        raise Failed(f"fio output unreadable: {exc}: {proc.stdout[-300:]}") from exc
    part = job["write" if rw == "write" else "read"]
    if part.get("io_bytes", 0) < mib << 20:
        raise Failed(f"fio moved {part.get('io_bytes')} bytes of {mib << 20}")
    return {"mb_per_s": part["bw_bytes"] / 1e6, "seconds": part["runtime"] / 1000,
            "wall_mb_per_s": (mib << 20) / wall / 1e6, "wall_s": wall}  # fmt: skip


def alternated_writes(files: dict[str, str], mib: int) -> dict[str, Any]:
    """fio writes of each of ``files`` ({label: path}) as new files in the order A B B A,
    each label's figure the mean of its two runs (a drift over the four cancels out)."""
    labels = list(files)
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    for label in labels + labels[::-1]:
        say(f"fio {label} ({mib} MiB, {OWNER})")
        run_in(OWNER, ["rm", "-f", files[label]])
        runs[label].append(side(functools.partial(fio, OWNER, files[label], "write", mib)))
    out: dict[str, Any] = {}
    for label, got in runs.items():
        failed = [r for r in got if not r["ok"]]
        if failed:
            out[label] = failed[0]
            continue
        out[label] = {
            "ok": True,
            "mb_per_s": sum(r["mb_per_s"] for r in got) / len(got),
            "seconds": sum(r["seconds"] for r in got) / len(got),
            "runs_mb_per_s": [round(r["mb_per_s"], 1) for r in got],
        }
    return out


def host_cpu(host: str) -> tuple[float, float]:
    """(CPU seconds used, seconds throttled by the quota) of a simulated host's cgroup so
    far (v1 cpuacct and cpu.stat, or v2 cpu.stat); (0, 0) where neither is readable."""
    from dunix.cluster import _cgroup

    root, group = _cgroup.CGROUP_ROOT, _cgroup.GROUP
    for stat_file, usage_key, usage_div, thr_key, thr_div in (
        (root / "cpu" / group / host / "cpu.stat", None, 1e9, "throttled_time", 1e9),
        (root / group / host / "cpu.stat", "usage_usec", 1e6, "throttled_usec", 1e6),
    ):
        try:
            fields = dict(line.split() for line in stat_file.read_text().splitlines())
            if usage_key is None:
                usage = int((root / "cpuacct" / group / host / "cpuacct.usage").read_text())
            else:
                usage = int(fields[usage_key])
            return usage / usage_div, int(fields.get(thr_key, 0)) / thr_div
        except (OSError, KeyError, ValueError):
            continue
    return 0.0, 0.0


def with_cpu(hosts: tuple[str, ...], fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn``'s result plus each host's CPU seconds and quota-throttled seconds meanwhile:
    a peer's file is CPU-bound on a host whose throttled time is high, not network-bound."""
    before = {h: host_cpu(h) for h in hosts}
    out = fn()
    for h in hosts:
        used, throttled = host_cpu(h)
        out.setdefault("cpu_s", {})[h] = round(used - before[h][0], 3)
        out.setdefault("throttled_s", {})[h] = round(throttled - before[h][1], 3)
    return out


def _iperf3_server(server: str) -> subprocess.Popen[bytes]:
    return cluster.exec_in(server, ["iperf3", "-s", "-1", "-B", address(server)],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)  # fmt: skip


def iperf3(client: str, server: str, seconds: int) -> dict[str, Any]:
    proc = _iperf3_server(server)
    try:
        for _ in range(50):  # until the server listens
            try:
                done = run_in(client, ["iperf3", "-c", address(server), "-t", str(seconds),
                                       "-J"], timeout=seconds + 30)  # fmt: skip
                report = json.loads(done.stdout)
                received = report.get("end", {}).get("sum_received")
                if received is None:  # -J reports a refused connection in its JSON
                    raise Failed(f"iperf3: {report.get('error', 'no sum_received')}")
                break
            except Failed as exc:
                if "connect" not in str(exc):
                    raise
                time.sleep(0.1)
                if proc.poll() is not None:  # a one-off server that took a failed try ends
                    proc = _iperf3_server(server)
        else:
            raise Failed("iperf3 server never listened")
        return {"mb_per_s": float(received["bits_per_second"]) / 8e6, "seconds": seconds}
    finally:
        proc.kill()
        proc.wait()


def measure_throughput(sizes: Sizes) -> dict[str, Any]:
    mib = sizes.file_mib
    run_in(OWNER, ["mkdir", "-p", DIRECT, f"{FS}/fs-bench/rep2"])
    # `dunix fs replicas 2` (its xattr): every write also goes to one peer before returning
    run_in(OWNER, [sys.executable, "-c", "import os, sys; os.setxattr(sys.argv[1], "
                   "'user.dunix.replicas', b'2')", f"{FS}/fs-bench/rep2"])  # fmt: skip
    local_file, direct_file = f"{FS}/fs-bench/local.bin", f"{DIRECT}/direct.bin"
    peer_file = f"{FS}/fs-bench/peer.bin"
    out: dict[str, Any] = {"file_mib": mib}
    # created on n1 first, so n1 owns it (files live where created), at its full size: fio
    # unlinks a smaller file before writing it (the write would then create it on n2)
    run_in(OWNER, ["truncate", "-s", f"{mib}M", peer_file])
    # the first big write after a quiet spell runs up to 3x faster than the next ones
    # (seen on this VM's disk whichever path wrote first: 467 then 166-176 MB/s for new
    # files, storagefs or not), so the two local writes alternate, A B B A, each a new file
    out.update(alternated_writes(
        {"direct_write": direct_file, "storagefs_local_write": local_file}, mib,
    ))  # fmt: skip
    for label, host, path, rw in (
        ("storagefs_replicated_write", OWNER, f"{FS}/fs-bench/rep2/r.bin", "write"),
        ("direct_read", OWNER, direct_file, "read"),
        ("storagefs_local_read", OWNER, local_file, "read"),
        ("storagefs_peer_write", READER, peer_file, "write"),
        ("storagefs_peer_read", READER, peer_file, "read"),
    ):
        say(f"fio {label} ({mib} MiB, {host})")
        run = functools.partial(fio, host, path, rw, mib)
        if label.startswith("storagefs_peer"):
            run = functools.partial(with_cpu, (OWNER, READER), run)
        out[label] = side(run)
    say(f"iperf3 {READER} -> {OWNER}")
    out["iperf3"] = side(lambda: iperf3(READER, OWNER, sizes.iperf_s))
    with contextlib.suppress(Failed):
        run_in(OWNER, ["rm", "-rf", DIRECT, f"{FS}/fs-bench"])
    return out


def measure_peer(mib: int, iperf_s: int) -> dict[str, Any]:
    """Only the peer part of 1 (``--peer``): a file owned by n1 written then read in n2,
    and iperf3 n2 -> n1 right after, on the same cluster."""
    peer_file = f"{FS}/fs-bench/peer.bin"
    run_in(OWNER, ["mkdir", "-p", f"{FS}/fs-bench"])
    run_in(OWNER, ["truncate", "-s", f"{mib}M", peer_file])  # n1 owns it (see above)
    out: dict[str, Any] = {"file_mib": mib}
    for label, rw in (("storagefs_peer_write", "write"), ("storagefs_peer_read", "read")):
        say(f"fio {label} ({mib} MiB, {READER})")
        out[label] = side(functools.partial(
            with_cpu, (OWNER, READER), functools.partial(fio, READER, peer_file, rw, mib)
        ))  # fmt: skip
    # small writes: each one a FUSE request, and (without write-behind) a round trip
    small = max(mib // 16, 8)
    for bs in SMALL_WRITES:
        say(f"fio storagefs_peer_write bs {bs} ({small} MiB, {READER})")
        run_in(OWNER, ["truncate", "-s", f"{small}M", f"{peer_file}.{bs}"])
        out[f"storagefs_peer_write_{bs}"] = side(
            functools.partial(fio, READER, f"{peer_file}.{bs}", "write", small, bs)
        )
    say(f"iperf3 {READER} -> {OWNER}")
    out["iperf3"] = side(lambda: iperf3(READER, OWNER, iperf_s))
    with contextlib.suppress(Failed):
        run_in(OWNER, ["rm", "-rf", f"{FS}/fs-bench"])
    return out


def peer_table(t: dict[str, Any]) -> str:
    lines = [f"peer-owned file ({CPU_QUOTA} CPU per host, {t['file_mib']} MiB, 1 MiB blocks)"]
    for label in ("write", "read"):
        r = t[f"storagefs_peer_{label}"]
        line = f"  {label}: {_rate(r)} MB/s = {_pct(_ratio(r, t['iperf3']), GOALS['peer'])}"
        if r.get("ok") and "wall_mb_per_s" in r:  # what fio does not count: its open, exit
            line += f" (start to exit {_rate(r, 'wall_mb_per_s')} MB/s)"
        if r.get("ok") and "cpu_s" in r:
            line += "; CPU " + ", ".join(
                f"{h} {r['cpu_s'][h]:.2f} s (throttled {r['throttled_s'][h]:.2f})"
                for h in r["cpu_s"]
            )
        lines.append(line)
    for bs in SMALL_WRITES:
        lines.append(f"  write, {bs} blocks: {_rate(t[f'storagefs_peer_write_{bs}'])} MB/s")
    lines.append(f"  iperf3 {READER} -> {OWNER}: {_rate(t['iperf3'])} MB/s")
    return "\n".join(lines)


def measure_local(sizes: Sizes, rounds: int) -> dict[str, Any]:
    """Only the local part (``--local``): ``rounds`` A B B A rounds of new-file writes in
    n1, storagefs against the disk (this VM's disk is noisy: look at every pair), then the
    metadata rates; the agents' path for local files as their log says it."""
    run_in(OWNER, ["mkdir", "-p", DIRECT, f"{FS}/fs-bench"])
    files = {"direct_write": f"{DIRECT}/direct.bin",
             "storagefs_local_write": f"{FS}/fs-bench/local.bin"}  # fmt: skip
    out: dict[str, Any] = {"file_mib": sizes.file_mib, "rounds": []}
    for _ in range(rounds):
        out["rounds"].append(alternated_writes(files, sizes.file_mib))
    with contextlib.suppress(Failed):
        run_in(OWNER, ["rm", "-rf", DIRECT, f"{FS}/fs-bench"])
    out["metadata"] = measure_metadata(sizes)
    log = Path(f"/run/dunix/hosts/{OWNER}/agent.log")
    out["path"] = [line.split("storagefs: ", 1)[1].strip() for line in log.read_text().splitlines()
                   if "local files " in line][-1:]  # fmt: skip
    return out


def local_table(t: dict[str, Any]) -> str:
    path = ", ".join(t["path"]) or "path not logged"
    lines = [f"local file in {OWNER} ({CPU_QUOTA} CPU, {t['file_mib']} MiB new files, 1 MiB "
             f"blocks, A B B A per round; {path})"]  # fmt: skip
    ratios = []
    for n, r in enumerate(t["rounds"], 1):
        ours, disk = r["storagefs_local_write"], r["direct_write"]
        ratio = _ratio(ours, disk)
        if ratio is not None:
            ratios.append(ratio)
        lines.append(f"  round {n}: storagefs {_rate(ours)} MB/s {ours.get('runs_mb_per_s', '')}, "
                     f"disk {_rate(disk)} MB/s {disk.get('runs_mb_per_s', '')}: "
                     f"{_pct(ratio, GOALS['local'])}")  # fmt: skip
    if ratios:
        lines.append(f"  median of the rounds: {_pct(statistics.median(ratios), GOALS['local'])}")
    m = t["metadata"]
    for op in ("creates", "stats", "unlinks"):
        lines.append(f"  {op}/s: storagefs {_rate(m['storagefs'], op)}, disk "
                     f"{_rate(m['direct'], op)}")  # fmt: skip
    return "\n".join(lines)


# --- 2. metadata -------------------------------------------------------------------------


def measure_metadata(sizes: Sizes) -> dict[str, Any]:
    out: dict[str, Any] = {"files": sizes.meta_files}
    for label, folder in (("direct", f"{DIRECT}-meta"), ("storagefs", f"{FS}/fs-bench-meta")):
        say(f"metadata {label} ({sizes.meta_files} files)")

        def one(folder: str = folder) -> dict[str, Any]:
            proc = run_in(OWNER, [sys.executable, "-c", METADATA, folder, str(sizes.meta_files)])
            rates: dict[str, Any] = json.loads(proc.stdout)
            return rates

        out[label] = side(one)
    return out


# --- 3. lookups of a missing name ----------------------------------------------------------


def measure_lookup(hosts: int, sizes: Sizes) -> dict[str, Any]:
    def one() -> dict[str, Any]:
        proc = run_in(READER, [sys.executable, "-c", PROBE, str(sizes.lookups)])
        first, again = proc.stdout.splitlines()
        res: dict[str, Any] = {"hosts": hosts, "lookups": sizes.lookups}
        for label, raw in (("asks_peers", first), ("negative_cache", again)):
            ms = sorted(float(x) * 1000 for x in raw.split())
            res[label] = {"p50_ms": statistics.median(ms),
                          "p99_ms": ms[max(int(len(ms) * 0.99) - 1, 0)]}  # fmt: skip
        return res

    say(f"lookup of missing names ({hosts} hosts, {sizes.lookups} names)")
    return side(one)


def with_cluster(hosts: int, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    say(f"cluster up: {hosts} hosts, cpu quota {CPU_QUOTA}")
    up_when_free(hosts, CPU_QUOTA)
    try:
        trio.run(wait_alive, control(OWNER), hosts)
        deadline = time.monotonic() + 30
        while not all(FS in run_in(f"n{i}", ["cat", "/proc/self/mountinfo"]).stdout
                      for i in range(1, hosts + 1)):  # fmt: skip
            if time.monotonic() > deadline:
                raise Failed("storagefs is not mounted on every host")
            time.sleep(0.5)
        return fn()
    finally:
        cluster.down()


# --- report ------------------------------------------------------------------------------


def _rate(r: dict[str, Any], key: str = "mb_per_s") -> str:
    return f"{r[key]:,.0f}" if r.get("ok") and key in r else "FAILED"


def _ratio(a: dict[str, Any], b: dict[str, Any], key: str = "mb_per_s") -> float | None:
    if a.get("ok") and b.get("ok") and b.get(key):
        return float(a[key]) / float(b[key])
    return None


def _pct(x: float | None, goal: float | None = None) -> str:
    if x is None:
        return "-"
    mark = "" if goal is None else (" ok" if x >= goal else f" (goal {goal:.0%})")
    return f"{x:.0%}{mark}"


def table(res: dict[str, Any]) -> str:
    t = res["throughput"]
    m = res["metadata"]
    lines = [
        f"storagefs benchmark ({res['cpu_quota']} CPU per host, {res['machine_cpus']}-core "
        f"machine; {t['file_mib']} MiB files, 1 MiB blocks; MB/s = 10^6 B/s)",
        "",
        f"{'sequential':<28}{'storagefs':>12}{'reference':>12}{'ratio':>18}",
    ]
    for label, ours, ref, goal in (
        ("write, owned by n1 (in n1)", "storagefs_local_write", "direct_write", GOALS["local"]),
        ("same, 2 copies (replicas 2)", "storagefs_replicated_write", "direct_write", None),
        ("read, owned by n1 (in n1)", "storagefs_local_read", "direct_read", GOALS["local"]),
        ("write, owned by n1 (in n2)", "storagefs_peer_write", "iperf3", GOALS["peer"]),
        ("read, owned by n1 (in n2)", "storagefs_peer_read", "iperf3", GOALS["peer"]),
    ):
        lines.append(f"{label:<28}{_rate(t[ours]):>12}{_rate(t[ref]):>12}"
                     f"{_pct(_ratio(t[ours], t[ref]), goal):>18}")  # fmt: skip
    lines.append("(reference: the disk directly in n1; iperf3 n2 -> n1 for a peer-owned file)")
    for label in ("write", "read"):
        r = t[f"storagefs_peer_{label}"]
        if r.get("ok") and "cpu_s" in r:
            cpu = ", ".join(f"{h} {r['cpu_s'][h]:.2f} s (throttled {r['throttled_s'][h]:.2f} s)"
                            for h in r["cpu_s"])  # fmt: skip
            lines.append(f"  peer {label}: {r['seconds']:.2f} s; host CPU {cpu}")
    lines += ["", f"{'metadata, per second':<28}{'storagefs':>12}{'disk':>12}{'ratio':>18}"]
    for op in ("creates", "stats", "unlinks"):
        lines.append(f"{op:<28}{_rate(m['storagefs'], op):>12}{_rate(m['direct'], op):>12}"
                     f"{_pct(_ratio(m['storagefs'], m['direct'], op)):>18}")  # fmt: skip
    lines += ["", f"{'missing name lookup':<28}{'p50 ms':>12}{'p99 ms':>12}"]
    for look in res["lookup"]:
        if not look.get("ok"):
            lines.append(f"{'(failed)':<28}{look.get('error', '')[:60]}")
            continue
        for kind in ("asks_peers", "negative_cache"):
            label = f"{look['hosts']} hosts, {kind.replace('_', ' ')}"
            lines.append(f"{label:<28}{look[kind]['p50_ms']:>12.2f}{look[kind]['p99_ms']:>12.2f}")
    lines.append(f"(goal: p50 <= {GOALS['lookup_p50_ms_8']:.0f} ms at 8 hosts, asking the peers)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller files, fewer names")
    ap.add_argument(
        "--no-lock", action="store_true",
        help=f"the caller holds {LOCK} already (as `flock {LOCK} python -m ... --no-lock`)",
    )  # fmt: skip
    ap.add_argument("--peer", action="store_true",
                    help="only the peer-owned file's write and read, and iperf3")  # fmt: skip
    ap.add_argument("--local", type=int, metavar="ROUNDS", default=0,
                    help="only local writes in n1 (ROUNDS x A B B A), metadata rates")  # fmt: skip
    args = ap.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    ensure_packages("fio", "iperf3")
    if not os.path.exists("/dev/fuse"):
        raise SystemExit("no /dev/fuse: storagefs cannot mount here")
    if not args.no_lock:
        say(f"taking {LOCK} (one simulated cluster per machine)")
    if args.local:
        with contextlib.nullcontext() if args.no_lock else exclusive_cluster():
            local = with_cluster(3, lambda: measure_local(sizes, args.local))
        print(local_table(local))
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "fs-local.json").write_text(json.dumps(local, indent=2))
        return local
    if args.peer:
        with contextlib.nullcontext() if args.no_lock else exclusive_cluster():
            peer = with_cluster(3, lambda: measure_peer(sizes.file_mib, sizes.iperf_s))
        print(peer_table(peer))
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "fs-peer.json").write_text(json.dumps(peer, indent=2))
        return peer
    with contextlib.nullcontext() if args.no_lock else exclusive_cluster():
        three: dict[str, Any] = {}

        def on_three() -> dict[str, Any]:
            three["throughput"] = measure_throughput(sizes)
            three["metadata"] = measure_metadata(sizes)
            three["lookup"] = measure_lookup(3, sizes)
            return three

        with_cluster(3, on_three)
        eight = with_cluster(8, lambda: measure_lookup(8, sizes))
    result = {
        "cpu_quota": CPU_QUOTA,
        "machine_cpus": os.cpu_count(),
        "sizes": asdict(sizes),
        "goals": GOALS,
        "throughput": three["throughput"],
        "metadata": three["metadata"],
        "lookup": [three["lookup"], eight],
    }
    print(table(result))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / ("fs-quick.json" if args.quick else "fs.json")).write_text(
        json.dumps(result, indent=2)
    )
    return result


if __name__ == "__main__":
    main()
