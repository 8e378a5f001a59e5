"""Jobs spread over a real simulated cluster (issue 3's benchmark, the throughput part),
side by side in one run on 4 hosts with 0.5-CPU quotas:

1. CPU-bound jobs (a fixed bash arithmetic loop each, then ``echo $HOSTNAME``, so the
   host that printed is the host that computed), all started at once by ONE script
   (``for ...; do bash job.sh & done; wait``): under ``dunix run`` (auto placement, and
   every exec forced remote) vs the same script in host n1 alone vs GNU parallel
   ``--sshlogin`` over the same 4 hosts (n1 as ``:``, the others through an ``sshd`` in
   each host), all jobs at once too. Each job also appends its host to a file under
   /var/tmp, so where the jobs ran is known even when their stdout does not arrive;
2. short jobs (``true``) through ``xargs -P 8`` under ``dunix run --placement remote``
   (every exec remote) and ``auto``, vs ``parallel -M`` (ssh ControlMaster) over the same
   hosts, 8 at a time too, and plain ``xargs`` in n1 for reference;
3. one cross-host pipe: ``dd if=/dev/zero bs=1M | dunix run --placement remote -- dd
   of=/dev/null bs=1M`` inside n1 (the writer in n1, the reader sent to a peer, the pipe
   relayed by the agents over their TLS link) vs ``iperf3`` from n1 to that peer; also the
   pipe inside one remote job (``sh -c 'dd | dd'``, where each exec hops again) and a
   local pipe in n1 for reference. MB/s are dd's own (10^6 bytes/s); the cross-host
   pipe and iperf3 run ``PIPE_RUNS`` times each and the medians are compared.

The ``dunix run`` clients run on the machine (the designed use: the machine is not a
node), except the pipe's, which runs in n1 so its stdin is n1's pipe. Where each dunix exec
went is counted from the agents' logs. A failure or stall is reported in the table and the
JSON (with the agents' warnings), not raised. Files live under /var/tmp: a simulated host
has its own /tmp. ``parallel``, ``iperf3`` and ``openssh-server`` are installed with apt
when missing.

Run (root): ``python -m bench.spread_bench``, or ``--quick`` (fewer and smaller jobs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trio

from bench._cluster import (
    LOCK,
    SshPeer,
    address,
    control,
    ensure_packages,
    exclusive_cluster,
    keep_logs,
    log_since,
    log_sizes,
    say,
    up_when_free,
    wait_alive,
)
from dunix import cluster

RESULTS = Path(__file__).parent / "results"
WORK = Path("/var/tmp/dunix-bench-spread")  # seen by every host (a host's /tmp is its own)
HOME = "n1"
NODES = ("n1", "n2", "n3", "n4")
CPU_QUOTA = 0.5
XARGS_P = 8
DUNIX = [sys.executable, "-m", "dunix"]
ENV = {**os.environ, "LC_ALL": "C"}  # dd's report in one format

JOB = """\
# CPU-bound: $1 rounds of bash arithmetic (no exec), then the host it ran on, on stdout
# and appended with its start and end times to the file $2 (so where and when the jobs
# ran is known even if stdout is lost)
t0=$EPOCHREALTIME n=$1 s=0
for ((i = 0; i < n; i++)); do s=$((s + i)); done
echo "$HOSTNAME"
echo "$HOSTNAME $t0 $EPOCHREALTIME" >> "$2"
"""
SPREAD = """\
# $2 CPU-bound jobs at once, each `bash job.sh $1 $3`
for ((j = 0; j < $2; j++)); do bash job.sh "$1" "$3" & done
wait
"""


@dataclass(frozen=True)
class Sizes:
    cpu_jobs: int
    cpu_rounds: int  # bash loop rounds per job: 400,000 ~ 0.75 s of CPU here
    short_jobs: int
    pipe_mib: int
    iperf_s: int


FULL = Sizes(cpu_jobs=32, cpu_rounds=400_000, short_jobs=1000, pipe_mib=1024, iperf_s=5)
QUICK = Sizes(cpu_jobs=16, cpu_rounds=200_000, short_jobs=200, pipe_mib=256, iperf_s=2)
TINY = Sizes(cpu_jobs=8, cpu_rounds=50_000, short_jobs=40, pipe_mib=32, iperf_s=1)  # a smoke run


class Failed(Exception):
    """A side of the benchmark did not give a number: the reason goes in the report."""


# --- running things ----------------------------------------------------------------------


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.perf_counter()
    try:
        proc = fn(*args, **kwargs)
    except subprocess.TimeoutExpired as exc:
        raise Failed(f"stalled: no end after {exc.timeout:.0f} s") from exc
    return time.perf_counter() - t0, proc


def in_home(script: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``bash -c script`` in host n1 (its namespaces and 0.5-CPU cgroup)."""
    return cluster.run_in(
        HOME, ["bash", "-c", script], stdin=subprocess.DEVNULL, capture_output=True,
        text=True, cwd=WORK, env=ENV, timeout=timeout,
    )  # fmt: skip


def dunix_run(placement: str, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """``dunix run`` from the machine, the job's first process started by n1's agent."""
    return subprocess.run(
        [*DUNIX, "run", "--control", str(control(HOME)), "--placement", placement, "--",
         *argv],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=WORK, env=ENV,
        timeout=timeout,
    )  # fmt: skip


def check(proc: subprocess.CompletedProcess[str], what: str) -> None:
    if proc.returncode != 0:
        raise Failed(f"{what} exited {proc.returncode}: {proc.stderr.strip()[-600:]}")


def job_hosts(
    proc: subprocess.CompletedProcess[str], record: Path, jobs: int, what: str, t0: float
) -> dict[str, Any]:
    """Which hosts the jobs ran on and when the first started and the last ended, in
    seconds after ``t0`` (from the file each appended to; all must have), and how many of
    their stdout lines arrived."""
    lines = [line.split() for line in record.read_text().splitlines()] if record.exists() else []
    ran = Counter(fields[0] for fields in lines)
    if ran.total() < jobs:
        raise Failed(f"{what}: {ran.total()} of {jobs} jobs finished (exit {proc.returncode})")
    printed = len(proc.stdout.split())
    if printed != jobs:
        say(f"  {what}: {printed} of {jobs} lines of stdout arrived")
    return {"hosts": dict(sorted(ran.items())), "stdout_lines": printed,
            "stdout_lost_lines": jobs - printed,
            "first_job_started_s": min(float(f[1]) for f in lines) - t0,
            "last_job_ended_s": max(float(f[2]) for f in lines) - t0}  # fmt: skip


def fresh(path: Path) -> Path:
    path.unlink(missing_ok=True)
    return path


_RUNS_ON = re.compile(rb" runs on (\S+) as pid ")


def placements_logged(since: dict[str, int]) -> dict[str, Any]:
    """From every agent's log since ``since``: how many execs each agent sent where, how
    many fell back to local, and its warnings and errors (the last few)."""
    sent: dict[str, dict[str, int]] = {}
    fell_back = 0
    warnings: list[str] = []
    for node in NODES:
        lines = log_since(node, since)
        to = Counter(m.group(1).decode() for line in lines if (m := _RUNS_ON.search(line)))
        if to:
            sent[node] = dict(sorted(to.items()))
        fell_back += sum(b" could not run on " in line for line in lines)
        warnings += [
            f"{node}: {line.decode(errors='replace')[:300]}"
            for line in lines
            if b"WARNING" in line or b"ERROR" in line
        ]
    landed: Counter[str] = Counter()
    for dest in sent.values():
        landed.update(dest)
    return {
        "sent": sent,
        "landed": dict(sorted(landed.items())),
        "remote_total": sum(landed.values()),
        "fell_back_local": fell_back,
        "warnings": warnings[-8:],
    }


def side(fn: Any, *args: Any) -> dict[str, Any]:
    """One side of a comparison, as a dict; a failure becomes ``ok: False`` and a reason."""
    since = log_sizes()
    try:
        result: dict[str, Any] = {"ok": True, **fn(*args)}
    except Failed as exc:
        result = {"ok": False, "error": str(exc)}
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    result["dunix_execs"] = placements_logged(since)
    if not result["ok"]:
        say(f"  FAILED: {result['error']}")
        for w in result["dunix_execs"]["warnings"]:
            say(f"    {w}")
    crashed = restart_dead_agents(since)
    if crashed:
        result["agents_crashed"] = crashed
    return result


def restart_dead_agents(since: dict[str, int]) -> dict[str, list[str]]:
    """Agents that died during a side (with the end of their log's last traceback) are
    restarted, so the sides after it still measure something."""
    crashed: dict[str, list[str]] = {}
    for host in cluster.status():
        if host.agent_alive:
            continue
        lines = [line.decode(errors="replace") for line in log_since(host.name, since)]
        tail = [line.strip(" |") for line in lines if "File " in line or "Error" in line]
        crashed[host.name] = tail[-4:]
        say(f"  the agent of {host.name} died: {' / '.join(tail[-2:])}; restarting it")
        cluster.start_agent(host.name)
    if crashed:
        trio.run(wait_alive, control(HOME), len(NODES))
    return crashed


# --- GNU parallel ------------------------------------------------------------------------


def parallel_cmd(
    peers: list[SshPeer], per_host: int, command: str, joblog: Path, control_master: bool
) -> str:
    """``parallel`` in n1 over n1 (``:``, local) and the peers by ssh, ``per_host`` jobs
    at a time on each, with ssh ControlMasters (``-M``) or not; arguments from stdin.

    With ``-M``, GNU parallel 20221122 runs the first job of each ssh login twice (seen in
    its --joblog and in what the jobs did; not without -M): the runs are counted."""
    logins = ",".join([f"{per_host}/:", *(f"{per_host}/root@{p.address}" for p in peers)])
    ssh = " ".join(["ssh", *peers[0].options(control_master=False)])
    joblog.unlink(missing_ok=True)
    m = " -M" if control_master else ""
    return f"parallel --will-cite{m} --joblog {joblog} --ssh '{ssh}' -S {logins} {command}"


def parallel_runs(joblog: Path, jobs: int) -> dict[str, int]:
    runs = len(joblog.read_text().splitlines()) - 1 if joblog.exists() else 0  # a header
    if runs < jobs:
        raise Failed(f"parallel: {runs} runs in its joblog for {jobs} jobs")
    return {"runs": runs, "extra_runs": runs - jobs}


# --- 1. CPU-bound jobs -------------------------------------------------------------------


def measure_cpu(sizes: Sizes, peers: list[SshPeer]) -> dict[str, Any]:
    (WORK / "job.sh").write_text(JOB)
    (WORK / "spread.sh").write_text(SPREAD)
    n, rounds = sizes.cpu_jobs, sizes.cpu_rounds
    # one host needs ~1.5 s per job (400,000 rounds); a spread that takes longer is no spread
    one_host_s = 1.5 * n * rounds / 400_000
    budget, spread_budget = 30 + 2 * one_host_s, 20 + 1.2 * one_host_s

    def alone() -> dict[str, Any]:
        seconds, proc = timed(in_home, f"bash job.sh {rounds} /dev/null", 60)
        check(proc, "one job in n1")
        return {"wall_s": seconds}

    def one_host() -> dict[str, Any]:
        record = fresh(WORK / "ran-one-host")
        t0 = time.time()
        seconds, proc = timed(in_home, f"bash spread.sh {rounds} {n} {record}", budget)
        check(proc, f"spread.sh in {HOME}")
        return {"wall_s": seconds, **job_hosts(proc, record, n, "one host", t0)}

    def dunix(placement: str) -> dict[str, Any]:
        record = fresh(WORK / f"ran-dunix-{placement}")
        argv = ["bash", "spread.sh", str(rounds), str(n), str(record)]
        t0 = time.time()
        seconds, proc = timed(dunix_run, placement, argv, spread_budget)
        check(proc, f"dunix run --placement {placement} bash spread.sh")
        return {"wall_s": seconds, **job_hosts(proc, record, n, f"dunix {placement}", t0)}

    def gnu_parallel() -> dict[str, Any]:
        per_host = -(-n // len(NODES))  # all at once, as the script starts them
        record = fresh(WORK / "ran-parallel")
        job, log = f"bash {WORK}/job.sh {rounds} {record}", WORK / "joblog-cpu"
        cmd = parallel_cmd(peers, per_host, job, log, control_master=False)
        t0 = time.time()
        seconds, proc = timed(in_home, f"seq {n} | {cmd}", spread_budget)
        check(proc, "parallel")
        return {
            "wall_s": seconds,
            **job_hosts(proc, record, n, "parallel", t0),
            **parallel_runs(log, n),
        }

    out: dict[str, Any] = {"jobs": n, "rounds_per_job": rounds}
    for name, fn, args in (("alone", alone, ()), ("dunix_auto", dunix, ("auto",)),
                           ("dunix_remote", dunix, ("remote",)), ("parallel", gnu_parallel, ()),
                           ("one_host", one_host, ())):  # fmt: skip
        say(f"CPU-bound: {name} ({n} jobs of {rounds} rounds)")
        out[name] = side(fn, *args)
    return out


# --- 2. short jobs -----------------------------------------------------------------------


def measure_short(sizes: Sizes, peers: list[SshPeer]) -> dict[str, Any]:
    n = sizes.short_jobs
    xargs = f"seq {n} | xargs -P {XARGS_P} -n 1 true"
    budget = 30 + n * 0.1  # parallel -M: ~65 ms a job here

    def dunix(placement: str) -> dict[str, Any]:
        seconds, proc = timed(dunix_run, placement, ["sh", "-c", xargs], budget / 2)
        check(proc, f"dunix run --placement {placement} xargs")
        return {"wall_s": seconds}

    def plain() -> dict[str, Any]:
        seconds, proc = timed(in_home, xargs, budget)
        check(proc, f"xargs in {HOME}")
        return {"wall_s": seconds}

    def gnu_parallel() -> dict[str, Any]:
        log = WORK / "joblog-short"
        cmd = parallel_cmd(peers, XARGS_P // len(NODES), "true", log, control_master=True)
        seconds, proc = timed(in_home, f"seq {n} | {cmd}", budget)
        check(proc, "parallel")
        return {"wall_s": seconds, **parallel_runs(log, n)}

    out: dict[str, Any] = {"jobs": n, "at_a_time": XARGS_P}
    for name, fn, args in (("dunix_remote", dunix, ("remote",)), ("dunix_auto", dunix, ("auto",)),
                           ("parallel", gnu_parallel, ()), ("plain_xargs", plain, ())):  # fmt: skip
        say(f"short jobs: {name} ({n} x true, {XARGS_P} at a time)")
        out[name] = side(fn, *args)
    return out


# --- 3. one cross-host pipe --------------------------------------------------------------

_DD = re.compile(r"(\d+) bytes .* copied, ([\d.]+) s")


def dd_rate(stderr: str, mib: int, what: str) -> dict[str, Any]:
    """The reader dd's own report: bytes over its seconds, in MB/s (10^6)."""
    found = _DD.findall(stderr)
    if not found:
        raise Failed(f"{what}: no dd report in {stderr.strip()[-400:]!r}")
    nbytes, seconds = int(found[-1][0]), float(found[-1][1])
    lost = (mib << 20) - nbytes
    if lost:
        say(f"  {what}: the reader got {nbytes} bytes, {lost} fewer than were written")
    return {
        "bytes": nbytes,
        "lost_bytes": lost,
        "dd_s": seconds,
        "mb_per_s": nbytes / seconds / 1e6,
    }


#: runs of the cross-host pipe and of iperf3 each, the median counts: on 0.5-CPU hosts
#: which host pays for the TCP receive path (the veth's softirq runs in the sender's or
#: the receiver's context) changes from run to run, and single runs of the same build
#: ranged 0.33-0.51x iperf3 on this 2-core machine
PIPE_RUNS = 3


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median MB/s, with every run's MB/s beside it."""
    ranked = sorted(runs, key=lambda r: r["mb_per_s"])
    return {**ranked[len(ranked) // 2], "runs_mb_per_s": [round(r["mb_per_s"]) for r in runs]}


def measure_pipe(sizes: Sizes) -> dict[str, Any]:
    mib = sizes.pipe_mib
    writer = f"dd if=/dev/zero bs=1M count={mib} 2>/dev/null"
    reader = "dd of=/dev/null bs=1M"
    budget = 30 + mib * 0.03
    peer_seen: list[str] = []

    def local() -> dict[str, Any]:
        seconds, proc = timed(in_home, f"{writer} | {reader}", budget)
        check(proc, "local pipe")
        return {"wall_s": seconds, **dd_rate(proc.stderr, mib, "local pipe")}

    def cross_host_once() -> dict[str, Any]:
        since = log_sizes()
        run = " ".join([*DUNIX, "run", "--control", str(control(HOME)), "--placement", "remote"])
        seconds, proc = timed(in_home, f"{writer} | {run} -- {reader}", budget)
        check(proc, "dd | dunix run -- dd")
        sent = placements_logged(since)["sent"].get(HOME, {})
        if list(sent.values()) != [1]:
            raise Failed(f"the reader dd was not sent to one peer: {HOME} sent {sent}")
        peer_seen.append(next(iter(sent)))
        rate = dd_rate(proc.stderr, mib, "dd | dunix run -- dd")
        return {"wall_s": seconds, "reader_on": peer_seen[-1], **rate}

    def cross_host() -> dict[str, Any]:
        return median_run([cross_host_once() for _ in range(PIPE_RUNS)])

    def in_job() -> dict[str, Any]:
        seconds, proc = timed(dunix_run, "remote", ["sh", "-c", f"{writer} | {reader}"], budget)
        check(proc, "dunix run --placement remote sh -c 'dd | dd'")
        return {"wall_s": seconds, **dd_rate(proc.stderr, mib, "dd | dd in one job")}

    def iperf3() -> dict[str, Any]:
        peer = peer_seen[0] if peer_seen else "n2"
        server = cluster.exec_in(
            peer, ["iperf3", "-s", "-B", address(peer)], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            client = f"iperf3 -c {address(peer)} -t {sizes.iperf_s} -J"
            runs = []
            for _ in range(PIPE_RUNS):
                for _ in range(50):  # until the server listens
                    proc = in_home(client, sizes.iperf_s + 30)
                    if proc.returncode == 0 or "connect" not in proc.stdout:
                        break
                    time.sleep(0.1)
                check(proc, "iperf3 -c")
                report = json.loads(proc.stdout)
                received = report.get("end", {}).get("sum_received")
                if received is None:  # iperf3 -J reports its own failures in "error"
                    error = report.get("error", "no sum_received in its report")
                    raise Failed(f"iperf3: {error}")
                bps = float(received["bits_per_second"])
                runs.append({"from": HOME, "to": peer, "seconds": sizes.iperf_s,
                             "mb_per_s": bps / 8e6})  # fmt: skip
            return median_run(runs)
        finally:
            server.kill()
            server.wait()

    out: dict[str, Any] = {"mib": mib}
    for name, fn in (("local", local), ("dunix_cross_host", cross_host),
                     ("dunix_in_one_job", in_job), ("iperf3", iperf3)):  # fmt: skip
        say(f"pipe: {name} ({mib} MiB)")
        out[name] = side(fn)
    return out


# --- report ------------------------------------------------------------------------------


def _num(r: dict[str, Any], key: str, fmt: str = "{:.2f}") -> str:
    return fmt.format(r[key]) if r.get("ok") and key in r else "FAILED"


def _ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> tuple[str, float | None]:
    """a[key] / b[key] as text and number, when both sides gave one."""
    if a.get("ok") and b.get("ok") and b.get(key):
        x = a[key] / b[key]
        return f"{x:.2f}x", x
    return "-", None


def _span(r: dict[str, Any]) -> str:
    """When the first job started and the last ended, after the command was started."""
    if "last_job_ended_s" not in r:
        return "-"
    return f"{r['first_job_started_s']:.2f} to {r['last_job_ended_s']:.2f}"


def _hosts(r: dict[str, Any]) -> str:
    return " ".join(f"{h}:{k}" for h, k in r.get("hosts", {}).items()) or "-"


def _met(x: float | None, goal: float) -> str:
    return "-" if x is None else ("yes" if x >= goal else "NO")


def _landed(r: dict[str, Any]) -> str:
    landed = r.get("dunix_execs", {}).get("landed", {})
    return " ".join(f"{h}:{k}" for h, k in landed.items()) or "none"


def _goal(
    rows: list[tuple[str, ...]], label: str, d: dict[str, Any], peer: dict[str, Any],
    peer_name: str, key: str, goal: float, fmt: str = "{:.2f}", higher_is_better: bool = False,
) -> None:  # fmt: skip
    """A row comparing dunix ``d`` with ``peer`` on ``key``, the ratio oriented so that
    more is better for dunix."""
    txt, x = _ratio(d, peer, key) if higher_is_better else _ratio(peer, d, key)
    peer_txt = f"{_num(peer, key, fmt)} ({peer_name})"
    rows.append((label, _num(d, key, fmt), peer_txt, txt, f">= {goal:g}x", _met(x, goal)))


def table(r: dict[str, Any]) -> str:
    cpu, short, pipe = r["cpu"], r["short"], r["pipe"]
    rows: list[tuple[str, ...]] = [("metric", "dunix", "peer", "ratio", "goal", "met")]
    tag = f"{cpu['jobs']} CPU jobs, wall s"
    one, par = cpu["one_host"], cpu["parallel"]
    for kind in ("auto", "remote"):
        d = cpu[f"dunix_{kind}"]
        _goal(rows, f"{tag}: dunix {kind} vs 1 host", d, one, f"bash in {HOME}", "wall_s", 3.6)
        _goal(rows, f"{tag}: dunix {kind} vs parallel -S", d, par, "GNU parallel", "wall_s", 1)
        rows.append((f"  jobs per host; jobs ran (s): dunix {kind}", _hosts(d), _span(d),
                     "-", "-", "-"))  # fmt: skip
    for name, res in (("parallel -S", par), ("1 host", one)):
        rows.append((f"  jobs per host; jobs ran (s): {name}", "-",
                     f"{_hosts(res)}; {_span(res)}", "-", "-", "-"))  # fmt: skip
    alone = _num(cpu["alone"], "wall_s")
    rows.append(("  one job alone in a 0.5-CPU host, s", "-", alone, "-", "-", "-"))
    tag = f"{short['jobs']} x true, xargs -P {short['at_a_time']}, wall s"
    par = short["parallel"]
    for kind in ("remote", "auto"):
        d = short[f"dunix_{kind}"]
        _goal(rows, f"{tag}: dunix {kind} vs parallel -M", d, par, "GNU parallel", "wall_s", 5)
        rows.append((f"  execs sent remote ({kind}), per host", _landed(d), "-", "-", "-", "-"))
    plain = _num(short["plain_xargs"], "wall_s")
    rows.append((f"  plain xargs in {HOME}, wall s", "-", plain, "-", "-", "-"))
    mib = pipe["mib"]
    cross, ip = pipe["dunix_cross_host"], pipe["iperf3"]
    label = f"pipe {mib} MiB {HOME}->{cross.get('reader_on', '?')}, MB/s: dunix vs iperf3"
    ip_name = f"iperf3 {HOME}->{ip.get('to', '?')}"
    _goal(rows, label, cross, ip, ip_name, "mb_per_s", 0.5, "{:.0f}", higher_is_better=True)
    each = [", ".join(str(x) for x in r.get("runs_mb_per_s", [])) or "-" for r in (cross, ip)]
    rows.append(("  each run (the median above), MB/s", *each, "-", "-", "-"))
    job = pipe["dunix_in_one_job"]
    txt, _ = _ratio(job, ip, "mb_per_s")
    rows.append(("  dd | dd in one remote job, MB/s", _num(job, "mb_per_s", "{:.0f}"),
                 f"execs landed: {_landed(job)}", txt, "-", "-"))  # fmt: skip
    local = _num(pipe["local"], "mb_per_s", "{:.0f}")
    rows.append((f"  local pipe in {HOME}, MB/s", "-", local, "-", "-", "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]  # fmt: skip
    for part in ("cpu", "short", "pipe"):
        for name, res in r[part].items():
            if not isinstance(res, dict):
                continue
            if not res.get("ok", True):
                lines.append(f"FAILED {part}/{name}: {res['error']}")
            if res.get("stdout_lost_lines"):
                lines.append(f"STDOUT LOST {part}/{name}: {res['stdout_lines']} of "
                             f"{res['stdout_lines'] + res['stdout_lost_lines']} lines arrived "
                             "(the jobs ran: see their hosts above)")  # fmt: skip
            for node, tail in res.get("agents_crashed", {}).items():
                last = tail[-1] if tail else "?"
                lines.append(f"AGENT DIED {part}/{name}: {node}: {last} (restarted)")
            if res.get("extra_runs"):
                jobs = res["runs"] - res["extra_runs"]
                lines.append(f"NOTE {part}/{name}: GNU parallel ran {res['runs']} jobs for "
                             f"{jobs} (with -M: a first job per ssh login twice)")  # fmt: skip
            if res.get("lost_bytes"):
                lines.append(f"DATA LOST {part}/{name}: the reader got {res['bytes']} bytes, "
                             f"{res['lost_bytes']} fewer than written")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer and smaller jobs, 256 MiB pipe")
    ap.add_argument(
        "--no-lock", action="store_true",
        help=f"the caller holds {LOCK} already (as `flock {LOCK} python -m ... --no-lock`)",
    )  # fmt: skip
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sizes = TINY if args.tiny else QUICK if args.quick else FULL
    ensure_packages("openssh-server", "openssh-client", "parallel", "iperf3")
    WORK.mkdir(parents=True, exist_ok=True)
    peers = [SshPeer(node, HOME) for node in NODES[1:]]
    for p in peers:
        p.prepare()
    if not args.no_lock:
        say(f"taking {LOCK} (one simulated cluster per machine)")
    with contextlib.nullcontext() if args.no_lock else exclusive_cluster():
        say(f"cluster up: {len(NODES)} hosts, cpu quota {CPU_QUOTA}")
        up_when_free(len(NODES), CPU_QUOTA)
        try:
            trio.run(wait_alive, control(HOME), len(NODES))
            try:
                for p in peers:
                    p.start()
                cpu = measure_cpu(sizes, peers)
                short = measure_short(sizes, peers)
            finally:
                for p in peers:
                    p.stop()
            pipe = measure_pipe(sizes)
        finally:
            keep_logs(WORK / "logs")
            cluster.down()
    result = {
        "hosts": len(NODES),
        "cpu_quota": CPU_QUOTA,
        "machine_cpus": os.cpu_count(),
        "sizes": asdict(sizes),
        "cpu": cpu,
        "short": short,
        "pipe": pipe,
    }
    print(table(result))
    RESULTS.mkdir(exist_ok=True)
    name = "spread-tiny.json" if args.tiny else "spread-quick.json" if args.quick else "spread.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
