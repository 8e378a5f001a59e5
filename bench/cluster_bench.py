"""Membership on a real simulated cluster of 8 hosts (issue 2's second benchmark), dunix
side by side with HashiCorp memberlist (Consul/Serf's membership, the peer a user would
otherwise use) on the same hosts in the same run.

For each protocol, with default timings (memberlist: ``DefaultLANConfig()`` unchanged):

* join: from (re)starting a host's member until every other host lists it alive;
* detection: from SIGKILL of a host's member until every other host marks it dead
  (memberlist reports a dead member through ``NotifyLeave``);
* steady traffic per host (bytes/s sent on its eth0; TLS included for dunix), over 30 s so
  that memberlist's 30 s TCP push-pull is counted once per host on average;
* false deaths during a soak with 5 % inbound packet loss on every host (nftables
  ``numgen random``, since this kernel has no netem) and n1's member frozen with SIGSTOP
  for 400 ms every 2 s (the Lifeguard paper's "slow member" test).

The two protocols run in turn, never at once, so they neither share the hosts' CPU quota
nor the eth0 counters: phase A is dunix alone; for phase B every dunix agent is stopped
(SIGSTOP, continued at the end) and a memberlist node (bench/memberlist/main.go, built by
bench/memberlist/build.sh from Debian packages) runs on port 7950 of every host.

Run: ``python -m bench.cluster_bench [--hosts 8] [--kills 10] [--soak 600]``; quick:
``--kills 5 --soak 60``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import trio

from dunix import cluster
from dunix.client import Client
from dunix.errors import DunixError

RESULTS = Path(__file__).parent / "results"
MEMBERLIST = Path(__file__).parent / "memberlist"
MEMBERLIST_PORT = 7950  # beside the dunix agent's 7946
LOCK = Path("/run/dunix-tests.lock")  # the e2e tests' lock (tests/e2e/conftest.py)
SEE_TIMEOUT = 60.0  # memberlist's Lifeguard suspicion may last up to 6 x its minimum
GRACE = 10.0  # after a soak: deaths it caused may be declared a suspicion timeout later


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


class Observations(Protocol):
    def first(self, observer: str, subject: str, kinds: set[str], after: float) -> float | None:
        """Time of the first event of one of ``kinds`` about ``subject`` that ``observer``
        reported at or after ``after`` (wall clock), or None."""


class Watches:
    """Membership events from every host's agent, as (host, event) with agent timestamps."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.events: list[tuple[str, Any]] = []

    async def _watch(self, name: str) -> None:
        while True:
            try:
                path = Path(f"/run/dunix/hosts/{name}/control.sock")
                async with await Client.connect(path) as client:
                    async for ev in await client.watch():
                        self.events.append((name, ev))
            except DunixError:
                await trio.sleep(0.1)  # that agent is down; watch again when it is back

    async def run(self, nursery: trio.Nursery) -> None:
        for name in self.names:
            nursery.start_soon(self._watch, name)
        await trio.sleep(0.5)

    def first(self, observer: str, subject: str, kinds: set[str], after: float) -> float | None:
        for host, ev in self.events:
            if (
                host == observer
                and ev.node.name == subject
                and ev.kind in kinds
                and ev.time >= after
            ):
                return float(ev.time)
        return None

    def count(self, kind: str, after: float) -> int:
        return sum(1 for _, e in self.events if e.kind == kind and e.time >= after)


def build_memberlist() -> tuple[Path, float]:
    """Build (or find cached) the memberlist node; returns its path and the seconds taken."""
    t0 = time.monotonic()
    out = subprocess.run(
        ["bash", str(MEMBERLIST / "build.sh")], stdout=subprocess.PIPE, text=True, check=True
    ).stdout
    return Path(out.strip().splitlines()[-1]), time.monotonic() - t0


def _resume(pid: int) -> None:
    """SIGCONT ``pid`` and, if stopped, its nsenter parent. util-linux nsenter forks the
    command (for ``-p``) and stops itself when it sees its child stop (it waits with
    WUNTRACED), then stays stopped: it could no longer reap the child, and a stopped
    parent makes both ``Popen.wait`` and ``cluster.down`` hang or crawl. Continued, it
    sends its child one more SIGCONT, so the parent goes second, once the child runs."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)
    with contextlib.suppress(OSError, ValueError, IndexError):
        status = Path(f"/proc/{pid}/status").read_text()
        ppid = int(status.split("PPid:", 1)[1].split()[0])
        if Path(f"/proc/{ppid}/comm").read_text().strip() == "nsenter":
            os.kill(ppid, signal.SIGCONT)


def _child_pid(parent: int, timeout: float = 5.0) -> int:
    """The one child of ``parent``: exec_in's Popen is nsenter, which forks the command
    into the host's PID namespace (setpriv then execs it, keeping that pid)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            kids = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
            if kids:
                return int(kids[0])
        time.sleep(0.01)
    raise RuntimeError(f"process {parent} started no child within {timeout:g} s")


class MemberlistNodes:
    """One memberlist node per host, started with ``cluster.exec_in``; each node's JSON
    event lines go to ``<logdir>/<host>.jsonl`` and the library's log to ``<host>.log``."""

    def __init__(self, binary: Path, hosts: list[cluster.HostInfo], logdir: Path) -> None:
        self.binary = binary
        self.address = {h.name: h.address for h in hosts}
        self.seed = hosts[0].name
        self.logdir = logdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.pids: dict[str, int] = {}
        self.events: list[tuple[str, str, str, float]] = []  # observer, event, subject, time
        self._offsets: dict[str, int] = {}

    def start(self, name: str) -> None:
        argv = [str(self.binary), "-name", name]
        argv += ["-bind", f"{self.address[name]}:{MEMBERLIST_PORT}"]
        if name != self.seed:
            argv += ["-join", f"{self.address[self.seed]}:{MEMBERLIST_PORT}"]
        with (
            (self.logdir / f"{name}.jsonl").open("ab") as out,
            (self.logdir / f"{name}.log").open("ab") as err,
        ):
            proc = cluster.exec_in(
                name, argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True,
            )  # fmt: skip
        self.procs[name] = proc
        self.pids[name] = _child_pid(proc.pid)

    def kill(self, name: str) -> None:
        pid = self.pids.pop(name)
        _resume(pid)  # so that its nsenter is not left stopped by a freeze
        os.kill(pid, signal.SIGKILL)
        self.procs.pop(name).wait(timeout=10)

    def stop_all(self) -> None:
        for name in list(self.procs):
            with contextlib.suppress(ProcessLookupError):
                self.kill(name)

    def _read(self) -> None:
        for name in self.address:
            path = self.logdir / f"{name}.jsonl"
            if not path.exists():
                continue
            with path.open("rb") as f:
                f.seek(self._offsets.get(name, 0))
                data = f.read()
            complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits
            self._offsets[name] = self._offsets.get(name, 0) + len(complete)
            for line in complete.splitlines():
                ev = json.loads(line)
                self.events.append((name, ev["event"], ev["name"], float(ev["time"])))

    def first(self, observer: str, subject: str, kinds: set[str], after: float) -> float | None:
        self._read()
        for host, kind, about, at in self.events:
            if host == observer and about == subject and kind in kinds and at >= after:
                return at
        return None

    def count(self, kind: str, after: float) -> int:
        self._read()
        return sum(1 for _, k, _, at in self.events if k == kind and at >= after)

    def log_sizes(self) -> dict[str, int]:
        return {n: (self.logdir / f"{n}.log").stat().st_size for n in self.procs}

    def suspect_probes_since(self, sizes: dict[str, int]) -> int:
        """Probes that ended in suspicion ("Suspect X has failed" in the library's log,
        once per failed probe round, whether it raises a suspicion or confirms one):
        memberlist 0.2.2 shows suspicion neither as an event nor in ``Members()``."""
        count = 0
        for name, size in sizes.items():
            with (self.logdir / f"{name}.log").open("rb") as f:
                f.seek(size)
                count += f.read().count(b"memberlist: Suspect ")
        return count


async def _all_see(
    source: Observations, observers: list[str], subject: str, kinds: set[str], t0: float
) -> float:
    deadline = trio.current_time() + SEE_TIMEOUT
    while trio.current_time() < deadline:
        times = [source.first(o, subject, kinds, t0) for o in observers]
        if all(t is not None for t in times):
            return max(t for t in times if t is not None) - t0
        await trio.sleep(0.05)
    raise RuntimeError(f"not every host saw {subject} {kinds} within {SEE_TIMEOUT:g} s")


async def _converged(names: list[str]) -> None:
    """Every agent lists every host alive. Asked, not watched: a watch only streams events
    after it subscribes, and the first joins may come before that; ``cluster.up`` returns
    once the agents run, before they listen."""
    deadline = trio.current_time() + SEE_TIMEOUT
    for name in names:
        path = Path(f"/run/dunix/hosts/{name}/control.sock")
        while True:
            try:
                async with await Client.connect(path) as client:
                    await client.wait_alive(len(names), deadline - trio.current_time())
                break
            except DunixError:
                if trio.current_time() > deadline:
                    raise
                await trio.sleep(0.1)  # the agent is not listening yet


def _agent_pid(name: str) -> int:
    for h in cluster.status():
        if h.name == name and h.agent_pid:
            return h.agent_pid
    raise RuntimeError(f"{name} has no agent")


def _tx_bytes(name: str) -> int:
    out = subprocess.run(
        ["nsenter", f"--net=/run/netns/dunix-{name}", "cat", "/proc/net/dev"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    for line in out.splitlines():
        if line.strip().startswith("eth0:"):
            return int(line.split(":", 1)[1].split()[8])
    raise RuntimeError(f"{name} has no eth0")


def _nft(name: str, rules: str) -> None:
    subprocess.run(
        ["nsenter", f"--net=/run/netns/dunix-{name}", "nft", "-f", "-"],
        input=rules, text=True, check=True,
    )  # fmt: skip


def _packet_loss(names: list[str], percent: int) -> None:
    rules = (
        "table inet dunixbench {\n chain input {\n  type filter hook input priority 0;\n"
        f"  numgen random mod 100 < {percent} drop\n }}\n}}\n"
    )
    for name in names:
        _nft(name, rules)


def _no_packet_loss(names: list[str]) -> None:
    for name in names:
        _nft(name, "delete table inet dunixbench\n")


class Lifecycle(Protocol):
    def kill(self, name: str) -> None: ...
    def start(self, name: str) -> None: ...


async def _kill_and_rejoin(
    source: Observations,
    member: Lifecycle,
    names: list[str],
    kills: int,
    alive: set[str],
    dead: set[str],
) -> dict[str, Any]:
    subject, others = names[-1], names[:-1]
    joins, deaths = [], []
    for _ in range(kills):
        await trio.sleep(1.0)
        t0 = time.time()
        member.kill(subject)
        deaths.append(await _all_see(source, others, subject, dead, t0))
        await trio.sleep(0.5)
        t0 = time.time()
        await trio.to_thread.run_sync(member.start, subject)
        joins.append(await _all_see(source, others, subject, alive, t0))
    return {"join_s": joins, "detect_s": deaths}


async def _traffic(names: list[str], span: float) -> dict[str, float]:
    await trio.sleep(3.0)
    before = {n: _tx_bytes(n) for n in names}
    t0 = time.monotonic()
    await trio.sleep(span)
    took = time.monotonic() - t0
    after = {n: _tx_bytes(n) for n in names}
    return {n: (after[n] - before[n]) / took for n in names}


async def _soak(names: list[str], frozen: int, soak: float) -> float:
    """5 % inbound loss on every host and ``frozen`` stopped for 0.4 s every 2 s, for
    ``soak`` seconds, then ``GRACE`` seconds without either (so that deaths the soak
    caused are declared); returns the wall-clock start."""
    say(f"soak: {soak:g} s, 5% loss, pid {frozen} frozen 0.4 s every 2 s")
    _packet_loss(names, 5)
    t0 = time.time()
    end = trio.current_time() + soak
    try:
        while trio.current_time() < end:
            os.kill(frozen, signal.SIGSTOP)
            try:
                await trio.sleep(0.4)
            finally:
                os.kill(frozen, signal.SIGCONT)
            await trio.sleep(1.6)
    finally:
        _resume(frozen)
        _no_packet_loss(names)
    await trio.sleep(GRACE)
    return t0


class DunixAgents:
    """Kill and restart a host's dunix agent (``Lifecycle`` for ``_kill_and_rejoin``)."""

    def kill(self, name: str) -> None:
        os.kill(_agent_pid(name), signal.SIGKILL)

    def start(self, name: str) -> None:
        cluster.start_agent(name)


async def measure_dunix(
    names: list[str], kills: int, soak: float, traffic: float, nursery: trio.Nursery
) -> dict[str, Any]:
    say("dunix: waiting for every agent to list every host alive")
    watches = Watches(names)
    await watches.run(nursery)
    await _converged(names)
    say(f"dunix: {kills} x SIGKILL and restart of {names[-1]}'s agent")
    r = await _kill_and_rejoin(watches, DunixAgents(), names, kills, {"join", "alive"}, {"dead"})
    say(f"dunix: traffic over {traffic:g} s")
    r["bytes_per_s"] = await _traffic(names, traffic)
    if soak > 0:
        t0 = await _soak(names, _agent_pid(names[0]), soak)
        r["false_deaths"] = watches.count("dead", t0)
        r["suspicions"] = watches.count("suspect", t0)
    return r


async def measure_memberlist(
    nodes: MemberlistNodes, names: list[str], kills: int, soak: float, traffic: float
) -> dict[str, Any]:
    say(f"memberlist: starting a node on port {MEMBERLIST_PORT} of every host")
    t0 = time.time()
    for name in names:
        await trio.to_thread.run_sync(nodes.start, name)
    for name in names:
        await _all_see(nodes, [o for o in names if o != name], name, {"join"}, t0)
    say(f"memberlist: {kills} x SIGKILL and restart of {names[-1]}'s node")
    r = await _kill_and_rejoin(nodes, nodes, names, kills, {"join"}, {"leave"})
    say(f"memberlist: traffic over {traffic:g} s")
    r["bytes_per_s"] = await _traffic(names, traffic)
    if soak > 0:
        sizes = nodes.log_sizes()
        t0 = await _soak(names, nodes.pids[names[0]], soak)
        r["false_deaths"] = nodes.count("leave", t0)
        r["suspect_probes"] = nodes.suspect_probes_since(sizes)
    return r


async def measure(
    hosts: int, kills: int, soak: float, traffic: float, binary: Path, logdir: Path
) -> dict[str, Any]:
    names = [f"n{i}" for i in range(1, hosts + 1)]
    result: dict[str, Any] = {"hosts": hosts, "kills": kills, "soak_s": soak}
    async with trio.open_nursery() as nursery:
        result["dunix"] = await measure_dunix(names, kills, soak, traffic, nursery)
        say("dunix: every agent stopped (SIGSTOP) while memberlist runs alone")
        agents = [_agent_pid(n) for n in names]
        for pid in agents:
            os.kill(pid, signal.SIGSTOP)
        nodes = MemberlistNodes(binary, cluster.status(), logdir)
        try:
            result["memberlist"] = await measure_memberlist(nodes, names, kills, soak, traffic)
        finally:
            nodes.stop_all()
            for pid in agents:
                _resume(pid)
        nursery.cancel_scope.cancel()
    return result


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def _p50_p99(values: list[float]) -> str:
    return f"{pct(values, 50):.2f} / {pct(values, 99):.2f}"


def table(r: dict[str, Any]) -> str:
    d, m = r["dunix"], r["memberlist"]
    d_tx, m_tx = list(d["bytes_per_s"].values()), list(m["bytes_per_s"].values())
    rows = [
        ("metric", "dunix", "memberlist (LAN defaults)", "ratio (dunix/memberlist)", "goal"),
        ("join after restart, p50 / p99 (s)", _p50_p99(d["join_s"]), _p50_p99(m["join_s"]),
         _ratio(pct(d["join_s"], 50), pct(m["join_s"], 50)), "-"),
        ("dead detection, p50 / p99 (s)", _p50_p99(d["detect_s"]), _p50_p99(m["detect_s"]),
         _ratio(pct(d["detect_s"], 50), pct(m["detect_s"], 50)), "p50 <= 3, p99 <= 6"),
        ("traffic per host, mean / max (B/s)",
         f"{statistics.mean(d_tx):.0f} / {max(d_tx):.0f}",
         f"{statistics.mean(m_tx):.0f} / {max(m_tx):.0f}",
         _ratio(statistics.mean(d_tx), statistics.mean(m_tx)), "<= 2048"),
    ]  # fmt: skip
    if "false_deaths" in d:
        rows.append(
            (f"false deaths in {r['soak_s']:.0f} s (5% loss, n1 frozen 0.4/2 s)",
             f"{d['false_deaths']} ({d['suspicions']} suspect events)",
             f"{m['false_deaths']} ({m['suspect_probes']} probes ending in suspect)",
             _ratio(d["false_deaths"], m["false_deaths"]), "0")
        )  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=8)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--soak", type=float, default=600.0, help="seconds per protocol (0: skip)")
    ap.add_argument("--traffic", type=float, default=30.0, help="seconds of traffic counting")
    args = ap.parse_args(argv)
    say("memberlist: building bench/memberlist (cached)")
    binary, build_s = build_memberlist()
    say(f"taking {LOCK} (one simulated cluster per machine)")
    with exclusive_cluster(), tempfile.TemporaryDirectory(prefix="dunix-memberlist-") as logs:
        cluster.down()
        say(f"cluster up: {args.hosts} hosts, 0.5 CPU each")
        cluster.up(args.hosts, 0.5)
        try:
            result = trio.run(
                measure, args.hosts, args.kills, args.soak, args.traffic, binary, Path(logs)
            )
        finally:
            cluster.down()
    result["memberlist_build_s"] = build_s
    print(table(result))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cluster.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
