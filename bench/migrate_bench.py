"""Moving a process between two simulated hosts with CRIU (issue 4's benchmark, first part).

Side by side in one run, for a Python process that has touched 16 MiB, 256 MiB and 1 GiB:

* **dunix**: ``dunix.migrate.driver.move`` with the swrk driver dumping inside host n1 and a
  ``HostTarget`` restoring inside host n2, images through a tmpfs both hosts see (mounted
  before the hosts are made, so their mount namespaces have it); the source is killed only
  after n2 confirmed the restore. Reported: freeze (dump call to the tree seized),
  downtime (seized to running on n2), total, and the rate (resident size / total);
* **raw CRIU pair**: ``criu dump`` and ``criu restore -d`` command lines inside n1 through a
  tmpfs folder (the limit: no RPC, no second host, no waiting for a confirmation).

* **post-copy**: ``driver.move_lazy`` (dunix/migrate/lazy.py): dump with lazy pages, the
  page server in n1 on n1's address with TLS (a one-move key), ``criu lazy-pages`` and a
  lazy restore in n2. Downtime is frozen to running on n2; "every page" is until the
  daemon copied the last page in (its log's "UFFD transferred pages", counted from the
  move's start); "source freed" is when the source's criu returned (its copy killed),
  later by the page-server goodbye and the kill of the frozen copy (stock CRIU also
  waited out ~0.4 s of TCP_CORK there; see ``LazyDaemon.pages_in_after``). Each host's
  cgroup CPU over the move is printed under the table. ``DUNIX_CRIU=PATH`` runs another
  criu build (e.g. the unpatched one, for a before/after).

The plain streamed dump keeps the process frozen while all of its pages are written and
read back, so its downtime grows with size; post-copy's does not.

No agents run in the hosts (``sleep`` stands in), so nothing else touches the process.

Fresh memory: this machine is a VM whose free memory the kernel hands back to the
hypervisor (free page reporting, /sys/module/page_reporting): the first touch of such a
page costs a fault in the hypervisor too, ~3 s per GiB instead of ~0.35 s (measured with
a C loop touching 1-8 GiB: the first ~1 GiB warm, the rest cold). A move allocates its
size on the target (post-copy: UFFDIO_COPY; the raw pair: the tmpfs images and the
restore), so which pages it happened to get decided "every page" more than CRIU did
(the same build: 4 MiB copied every 2.6-3 ms in one stretch, every 12.5 ms in the next).
So before each measured move the bench touches and frees ``WARM_FACTOR`` x the size
(``warm_free_memory``), the same for every kind, as real hosts' RAM would be; the time
that took is printed ("fresh memory", ms per GiB: ~350 warm, ~3000 cold).
``--no-warm`` measures without it.
Run (root): ``python -m bench.migrate_bench [--sizes 16,256,1024] [--rounds 3]``; also
``--kinds plain,lazy,raw`` (a subset), ``--cpu-quota 0.5`` (the hosts' quota), ``--logs DIR``
(each post-copy move's criu logs, debug level with timestamps of
every request), ``--no-tls`` and ``--sysctl KEY=VALUE`` (comparisons only). The
post-copy phases (ms from the move's start: frozen, dumped, listening, daemon ready,
restored) are printed under the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import shutil
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio

from bench._cluster import LOCK, exclusive_cluster, say
from bench.run_bench import _cgroup_cpu_s
from dunix import cluster
from dunix.cluster import HostInfo
from dunix.migrate import driver, lazy, swrk

RESULTS = Path(__file__).parent / "results"
IMAGES = Path("/run/dunix-bench-migrate")  # a tmpfs mounted here before the hosts exist
#: --logs: where the criu logs (-v4, timestamped) of each post-copy move are kept
KEEP_LOGS: Path | None = None
#: --no-tls: the page server without CRIU's TLS (only to see what TLS costs)
PAGES_TLS = True
CRIU = swrk.default_binary()  # the criu scripts/setup.sh built
#: touch and free this many times the moved size before each move (0: --no-warm); 2x
#: covers the raw pair's tmpfs images and restore, 1x the post-copy target's copy-in
WARM_FACTOR = 2.25
#: n1's next pid (the holders'): n2 allocates from 2 up
HOLDER_PIDS = 20000
#: Linux's MADV_POPULATE_WRITE (5.14): fault a range in, writable, in one call
MADV_POPULATE_WRITE = 23
#: seconds per GiB each warm-up took (the memory's state before it: cold or not)
WARM_RATES: list[float] = []

# Touches SIZE MiB, makes the file READY, then counts; detached (own session, stdio on
# /dev/null) so that CRIU needs no --shell-job. Prints nothing: its pid comes from the
# launcher. Moved before it is ready, it would go on touching pages on the target, one
# fault each, and "every page" would time that loop.
HOLDER = textwrap.dedent(
    """\
    import sys, time
    size = int(sys.argv[1]) << 20
    block = bytearray(size)
    for i in range(0, size, 4096):
        block[i] = 1
    open(sys.argv[2], "w").close()
    n = 0
    while True:
        n += 1
        time.sleep(0.01)
    """
)
LAUNCH = textwrap.dedent(
    """\
    import subprocess, sys
    child = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", sys.argv[2], sys.argv[1], sys.argv[3]],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    print(child.pid)
    """
)


def host_proc(host: HostInfo) -> Path:
    return Path(f"/proc/{host.init_pid}/root/proc")


def rss_mib(host: HostInfo, pid: int) -> float:
    for line in (host_proc(host) / str(pid) / "status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_holder(host: HostInfo, mib: int) -> int:
    ready = IMAGES / "holder-ready"  # the tmpfs every host sees
    ready.unlink(missing_ok=True)
    done = cluster.run_in(
        host.name,
        [sys.executable, "-I", "-S", "-c", LAUNCH, str(mib), HOLDER, str(ready)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if done.returncode != 0:
        raise RuntimeError(f"holder did not start in {host.name}: {done.stderr}")
    pid = int(done.stdout)
    deadline = time.monotonic() + 60
    while not ready.exists():  # every page touched
        if time.monotonic() > deadline:
            raise RuntimeError(f"holder {pid} never reached {mib} MiB")
        time.sleep(0.05)
    return pid


def warm_free_memory(mib: int) -> None:
    """Touch ``WARM_FACTOR * mib`` MiB of fresh anonymous memory and free it: the kernel
    hands those pages out first (its free lists are last in, first out), before the
    hypervisor takes them back; how long the touch took goes to ``WARM_RATES``."""
    size = int(WARM_FACTOR * mib) << 20
    if size <= 0:
        return
    t0 = time.monotonic()
    with mmap.mmap(-1, size) as m:
        m.madvise(MADV_POPULATE_WRITE)
    WARM_RATES.append((time.monotonic() - t0) * (1 << 30) / size)


def kill_in(host: HostInfo, pid: int) -> None:
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        fd = os.open(host_proc(host) / str(pid), os.O_RDONLY | os.O_DIRECTORY)
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        finally:
            os.close(fd)


@contextlib.contextmanager
def images_folder(name: str) -> Iterator[Path]:
    folder = IMAGES / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def tmpfs(path: Path) -> Iterator[None]:
    path.mkdir(parents=True, exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", "mode=0700", "dunix-bench", str(path)]
    subprocess.run(mount, check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
        with contextlib.suppress(OSError):
            path.rmdir()


def move_once(n1: HostInfo, n2: HostInfo, mib: int) -> dict[str, float]:
    assert n1.init_pid is not None and n2.init_pid is not None
    src, dst = n1.init_pid, n2.init_pid
    pid = start_holder(n1, mib)
    warm_free_memory(mib)
    rss = rss_mib(n1, pid)
    try:
        with images_folder("dunix") as folder:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                report = trio.run(
                    lambda: driver.move(
                        pid,
                        fd,
                        driver.HostTarget.simulated(dst, cgroups=n2.cgroup),
                        source=swrk.CriuCommand.in_host(src, cgroups=n1.cgroup),
                        phase_timeout=120.0,
                    )
                )
            finally:
                os.close(fd)
        if not (host_proc(n2) / str(report.restored_pid)).exists():
            raise RuntimeError("the restored process is not running in n2")
        return {
            "rss_mib": rss,
            "freeze_s": report.freeze_seconds,
            "dump_s": report.dump_seconds,
            "restore_s": report.restore_seconds,
            "downtime_s": report.downtime_seconds,
            "total_s": report.total_seconds,
        }
    finally:
        kill_in(n2, pid)
        kill_in(n1, pid)


def lazy_once(n1: HostInfo, n2: HostInfo, mib: int) -> dict[str, float]:
    """One post-copy move n1 -> n2: the page server in n1 on n1's address, TLS with a
    one-move key, the lazy-pages daemon and the restore in n2."""
    assert n1.init_pid is not None and n2.init_pid is not None
    src, dst = n1.init_pid, n2.init_pid
    pid = start_holder(n1, mib)
    warm_free_memory(mib)
    rss = rss_mib(n1, pid)
    try:
        with images_folder("lazy") as folder, images_folder("lazy-keys") as keys:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            kfd = os.open(keys, os.O_RDONLY | os.O_DIRECTORY)
            try:
                lazy.write_keys(lazy.make_keys(), kfd)
                tls = lazy.tls_files(kfd) if PAGES_TLS else None
                port = lazy.free_port()
                target = driver.HostTarget.simulated(
                    dst, cgroups=n2.cgroup, lazy_from=(n1.address, port, tls)
                )
                plan = driver.LazyPlan(port, tls, host_proc(n1))
                cpu: dict[str, float] = {}

                async def go() -> tuple[driver.MoveReport, float, float, int]:
                    t0 = time.monotonic()
                    cpu0 = _cgroup_cpu_s(n1.cgroup), _cgroup_cpu_s(n2.cgroup)
                    async with trio.open_nursery() as background:
                        report = await driver.move_lazy(
                            pid, fd, target, plan, background,
                            source=swrk.CriuCommand.in_host(src, cgroups=n1.cgroup),
                            phase_timeout=120.0,
                        )  # fmt: skip
                        code = await target.pages_in()
                        assert target.daemon is not None and report.transfer is not None
                        last = target.daemon.pages_in_after()
                        if last is None:
                            raise RuntimeError("the lazy-pages log says no last page")
                        pages = target.daemon.started - t0 + last
                        await report.transfer.done.wait()
                        if report.transfer.error:
                            raise RuntimeError(report.transfer.error)
                    # CPU of each host's cgroup over the whole move: criu and its page
                    # server in n1, the daemon, the restore and the process in n2
                    cpu["source"] = _cgroup_cpu_s(n1.cgroup) - cpu0[0]
                    cpu["target"] = _cgroup_cpu_s(n2.cgroup) - cpu0[1]
                    keep_logs(folder, f"lazy-{mib}")
                    marks = {k: v - t0 for k, v in target.marks.items()}
                    return report, pages, report.transfer.seconds or 0.0, code, marks

                report, every_page, source_freed, code, marks = trio.run(go)
            finally:
                os.close(fd)
                os.close(kfd)
        if code != 0:
            raise RuntimeError(f"criu lazy-pages exited {code}")
        if not (host_proc(n2) / str(report.restored_pid)).exists():
            raise RuntimeError("the restored process is not running in n2")
        return {
            "rss_mib": rss,
            "rss_after_mib": rss_mib(n2, report.restored_pid),
            "freeze_s": report.freeze_seconds,
            "dump_s": report.dump_seconds,
            "restore_s": report.restore_seconds,
            "downtime_s": report.downtime_seconds,
            "total_s": every_page,
            "source_freed_s": source_freed,
            "source_cpu_s": cpu["source"],
            "target_cpu_s": cpu["target"],
            **{f"at_{k.replace(' ', '_')}_s": v for k, v in (*report.phases, *marks.items())},
        }
    finally:
        kill_in(n2, pid)
        kill_in(n1, pid)


def keep_logs(folder: Path, name: str) -> None:
    """Copy the criu logs of ``folder`` into ``KEEP_LOGS/name/`` (the last move wins)."""
    if KEEP_LOGS is None:
        return
    dest = KEEP_LOGS / name
    dest.mkdir(parents=True, exist_ok=True)
    for log in folder.glob("*.log"):
        shutil.copy(log, dest / log.name)


def _criu_in(host: HostInfo, args: list[str]) -> float:
    t0 = time.monotonic()
    done = cluster.run_in(host.name, [CRIU, *args], capture_output=True, text=True, timeout=300)
    took = time.monotonic() - t0
    if done.returncode != 0:
        raise RuntimeError(f"criu {args[0]} failed: {done.stderr.strip()[-400:]}")
    return took


def raw_once(n1: HostInfo, mib: int) -> dict[str, float]:
    pid = start_holder(n1, mib)
    warm_free_memory(mib)
    try:
        with images_folder("raw") as folder:
            dump = _criu_in(n1, ["dump", "-t", str(pid), "-D", str(folder), "-o", "dump.log"])
            restore = _criu_in(n1, ["restore", "-d", "-D", str(folder), "-o", "restore.log"])
            if not (host_proc(n1) / str(pid)).exists():
                raise RuntimeError("the raw restore left nothing running")
        return {"dump_s": dump, "restore_s": restore, "total_s": dump + restore}
    finally:
        kill_in(n1, pid)


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


KINDS = ("plain", "lazy", "raw")


def measure(
    sizes: list[int],
    rounds: int,
    kinds: tuple[str, ...] = KINDS,
    cpu_quota: float | None = None,
    sysctls: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """``kinds``: which of the plain move, post-copy and the raw pair to run;
    ``cpu_quota``: the hosts' CPU quota (None: unlimited); ``sysctls``: ``KEY=VALUE``
    set in both hosts (their network namespaces' own, e.g. net.ipv4.tcp_wmem)."""
    rows = []
    with exclusive_cluster(), tmpfs(IMAGES):
        cluster.down()
        hosts = cluster.up(2, cpu_quota, agent_argv=lambda h: ["sleep", "100000"])
        try:
            n1, n2 = hosts
            # n1's processes (the holders) get pids far from n2's own (criu's), as dunix's
            # per-node pid ranges do: else a restore can find its pid taken by a criu child
            # on n2 ("Can't fork for 4: File exists", once the lazy-pages daemon started
            # while the restore's criu did)
            last_pid = f"echo {HOLDER_PIDS} >/proc/sys/kernel/ns_last_pid"
            cluster.run_in(n1.name, ["sh", "-c", last_pid], check=True)
            for host in hosts:
                for kv in sysctls:
                    cluster.run_in(host.name, ["sysctl", "-q", "-w", kv], check=True)
            for mib in sizes:
                say(f"{mib} MiB: {rounds} rounds of {', '.join(kinds)}")
                row: dict[str, Any] = {"mib": mib, "cpu_quota": cpu_quota}
                WARM_RATES.clear()
                if "plain" in kinds:
                    row["dunix"] = median_of([move_once(n1, n2, mib) for _ in range(rounds)])
                if "lazy" in kinds:
                    row["lazy"] = median_of([lazy_once(n1, n2, mib) for _ in range(rounds)])
                if "raw" in kinds:
                    row["raw"] = median_of([raw_once(n1, mib) for _ in range(rounds)])
                if WARM_RATES:
                    row["warm_ms_per_gib"] = [round(r * 1000) for r in WARM_RATES]
                rows.append(row)
        finally:
            cluster.down()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Plain streamed dump, post-copy and the raw local CRIU pair side by side."""
    head = (
        "size", "rss MiB", "plain downtime", "plain total", "post-copy downtime",
        "post-copy every page", "post-copy MB/s", "post-copy source freed",
        "raw dump+restore", "plain vs raw", "post-copy vs raw",
    )  # fmt: skip
    out = [head]
    for r in rows:
        d, lz, raw = r.get("dunix"), r.get("lazy"), r.get("raw")
        ms = "{:.0f} ms".format
        out.append(
            (
                f"{r['mib']} MiB",
                f"{(d or lz or {'rss_mib': 0})['rss_mib']:.0f}",
                ms(d["downtime_s"] * 1000) if d else "-",
                ms(d["total_s"] * 1000) if d else "-",
                ms(lz["downtime_s"] * 1000) if lz else "-",
                ms(lz["total_s"] * 1000) if lz else "-",
                f"{lz['rss_mib'] * 1.048576 / lz['total_s']:.0f}" if lz else "-",
                ms(lz["source_freed_s"] * 1000) if lz else "-",
                ms(raw["total_s"] * 1000) if raw else "-",
                f"{d['total_s'] / raw['total_s']:.2f}x" if d and raw else "-",
                f"{lz['total_s'] / raw['total_s']:.2f}x" if lz and raw else "-",
            )
        )
    widths = [max(len(row[i]) for row in out) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in out]
    lines.append("goals (post-copy): downtime <= 150 ms at every size; every page <= 1.3x raw;"
                 " >= 1000 MB/s at 1 GiB")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="16,256,1024", help="MiB touched, comma-separated")
    ap.add_argument("--rounds", type=int, default=3, help="moves per size (median reported)")
    ap.add_argument("--quick", action="store_true", help="16 and 256 MiB, one round")
    ap.add_argument("--kinds", default=",".join(KINDS), help="of plain,lazy,raw")
    ap.add_argument("--cpu-quota", type=float, default=None, help="hosts' CPU quota")
    ap.add_argument("--logs", type=Path, help="keep each post-copy move's criu logs here")
    ap.add_argument("--out", default="migrate.json", help="file name in bench/results")
    ap.add_argument("--no-tls", action="store_true", help="post-copy pages without TLS")
    ap.add_argument("--sysctl", action="append", default=[], help="KEY=VALUE in both hosts")
    ap.add_argument("--no-warm", action="store_true", help="no fresh-memory warm-up")
    args = ap.parse_args(argv)
    sizes = [16, 256] if args.quick else [int(s) for s in args.sizes.split(",")]
    rounds = 1 if args.quick else args.rounds
    kinds = tuple(k for k in args.kinds.split(",") if k)
    if unknown := set(kinds) - set(KINDS):
        ap.error(f"unknown kinds: {', '.join(sorted(unknown))}")
    global KEEP_LOGS, PAGES_TLS, WARM_FACTOR
    KEEP_LOGS, PAGES_TLS = args.logs, not args.no_tls
    if args.no_warm:
        WARM_FACTOR = 0.0
    say(f"taking {LOCK} (one simulated cluster per machine)")
    rows = measure(sizes, rounds, kinds, args.cpu_quota, tuple(args.sysctl))
    print(table(rows))
    for r in rows:
        if "warm_ms_per_gib" in r:
            rates = ", ".join(str(v) for v in r["warm_ms_per_gib"])
            print(f"fresh memory before each {r['mib']} MiB move (ms per GiB touched): {rates}")
        if "lazy" in r:
            at = {k[3:-2]: v for k, v in r["lazy"].items() if k.startswith("at_")}
            order = sorted(at.items(), key=lambda kv: kv[1])
            steps = ", ".join(f"{k} {v * 1000:.0f}" for k, v in order)
            print(f"post-copy {r['mib']} MiB phases (ms from the start): {steps}")
            lz = r["lazy"]
            print(f"post-copy {r['mib']} MiB CPU: source host {lz['source_cpu_s']:.2f} s,"
                  f" target host {lz['target_cpu_s']:.2f} s")  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
