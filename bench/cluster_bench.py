"""Membership on a real simulated cluster of 8 hosts (issue 2's second benchmark).

Measures, with default timings:

* join: from (re)starting a host's agent until every other host lists it alive;
* detection: from SIGKILL of a host's agent until every other host marks it dead;
* steady gossip traffic per host (bytes/s sent on its eth0, TLS included);
* false deaths during a soak with 5 % inbound packet loss on every host (nftables
  ``numgen random``, since this kernel has no netem) and one agent frozen with SIGSTOP
  for 400 ms every 2 s (the Lifeguard paper's "slow member" test).

The peer a user would otherwise use is HashiCorp memberlist (Consul/Serf's membership);
its LAN defaults detect a dead member in about 5 to 7 s on small clusters, which is the
reference the ratio column divides by.

Run: ``python -m bench.cluster_bench [--hosts 8] [--kills 10] [--soak 600]``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import trio

from dunix import cluster
from dunix.client import Client
from dunix.errors import DunixError

RESULTS = Path(__file__).parent / "results"
MEMBERLIST_DETECT_S = (5.0, 7.0)  # LAN defaults, small clusters (see module docstring)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


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


async def _all_see(
    watches: Watches, observers: list[str], subject: str, kinds: set[str], t0: float
) -> float:
    deadline = trio.current_time() + 30
    while trio.current_time() < deadline:
        times = [watches.first(o, subject, kinds, t0) for o in observers]
        if all(t is not None for t in times):
            return max(t for t in times if t is not None) - t0
        await trio.sleep(0.05)
    raise RuntimeError(f"not every host saw {subject} {kinds} within 30 s")


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


def _packet_loss(names: list[str], percent: int) -> None:
    rules = (
        "table inet dunixbench {\n chain input {\n  type filter hook input priority 0;\n"
        f"  numgen random mod 100 < {percent} drop\n }}\n}}\n"
    )
    for name in names:
        subprocess.run(
            ["nsenter", f"--net=/run/netns/dunix-{name}", "nft", "-f", "-"],
            input=rules, text=True, check=True,
        )  # fmt: skip


async def measure(hosts: int, kills: int, soak: float) -> dict[str, Any]:
    names = [f"n{i}" for i in range(1, hosts + 1)]
    subject, others = names[-1], names[:-1]
    result: dict[str, Any] = {"hosts": hosts}
    watches = Watches(names)
    async with trio.open_nursery() as nursery:
        await watches.run(nursery)
        await _all_see(watches, others, subject, {"join", "alive"}, 0.0)

        joins, deaths = [], []
        for _ in range(kills):
            await trio.sleep(1.0)
            t0 = time.time()
            os.kill(_agent_pid(subject), signal.SIGKILL)
            deaths.append(await _all_see(watches, others, subject, {"dead"}, t0))
            await trio.sleep(0.5)
            t0 = time.time()
            await trio.to_thread.run_sync(cluster.start_agent, subject)
            joins.append(await _all_see(watches, others, subject, {"join", "alive"}, t0))
        result["join_s"] = joins
        result["detect_s"] = deaths

        await trio.sleep(3.0)
        before = {n: _tx_bytes(n) for n in names}
        t0 = time.monotonic()
        await trio.sleep(10.0)
        span = time.monotonic() - t0
        after = {n: _tx_bytes(n) for n in names}
        result["gossip_bytes_per_s"] = {n: (after[n] - before[n]) / span for n in names}

        if soak > 0:
            _packet_loss(names, 5)
            frozen = _agent_pid(names[0])
            t0 = time.time()
            end = trio.current_time() + soak
            while trio.current_time() < end:
                os.kill(frozen, signal.SIGSTOP)
                await trio.sleep(0.4)
                os.kill(frozen, signal.SIGCONT)
                await trio.sleep(1.6)
            false = [
                (h, e.node.name) for h, e in watches.events if e.kind == "dead" and e.time >= t0
            ]
            suspects = [e for _, e in watches.events if e.kind == "suspect" and e.time >= t0]
            result["soak_s"] = soak
            result["false_deaths"] = len(false)
            result["suspicions"] = len(suspects)
        nursery.cancel_scope.cancel()
    return result


def table(r: dict[str, Any]) -> str:
    traffic = list(r["gossip_bytes_per_s"].values())
    det_p50 = pct(r["detect_s"], 50)
    rows = [
        ("metric", "dunix", "memberlist (LAN defaults)", "ratio", "goal"),
        ("join, p50 / p99 (s)", f"{pct(r['join_s'], 50):.2f} / {pct(r['join_s'], 99):.2f}",
         "-", "-", "-"),
        ("dead detection, p50 / p99 (s)",
         f"{det_p50:.2f} / {pct(r['detect_s'], 99):.2f}", "5 - 7",
         f"{det_p50 / MEMBERLIST_DETECT_S[0]:.2f}", "p50 <= 3, p99 <= 6"),
        ("gossip traffic per host, mean / max (B/s)",
         f"{statistics.mean(traffic):.0f} / {max(traffic):.0f}", "-", "-", "<= 2048"),
    ]  # fmt: skip
    if "false_deaths" in r:
        rows.append(
            (f"false deaths in {r['soak_s']:.0f} s (5% loss, 1 host frozen 0.4/2 s)",
             f"{r['false_deaths']} ({r['suspicions']} suspicions)", "-", "-", "0")
        )  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=8)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--soak", type=float, default=600.0, help="seconds (0: skip)")
    args = ap.parse_args(argv)
    cluster.down()
    cluster.up(args.hosts, 0.5)
    try:
        result = trio.run(measure, args.hosts, args.kills, args.soak)
    finally:
        cluster.down()
    print(table(result))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cluster.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
