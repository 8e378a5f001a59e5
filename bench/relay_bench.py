"""Throughput of an fd relay: pipe -> StreamHub -> link -> StreamHub -> pipe.

Rows (SIZE bytes of zeros from ``dd``, read by ``dd of=/dev/null``):

* ``local pipe``: ``dd | dd``, the ceiling;
* ``relay, in-memory link``: both hubs in one process joined by trio memory channels
  (what the relay code itself costs, no TLS, no socket);
* ``relay, loopback TLS``: the home hub in this process, the peer hub in a child process,
  joined by a real ``dunix.wire`` mutual-TLS channel on 127.0.0.1 (two agents' view);
* ``channel only, loopback TLS``: the same ``StreamData`` messages sent on the same kind
  of channel with no fds and no relay: the ceiling the wire layer sets.

All processes share this machine's cores (2 here), as in DESIGN.md's reference: a Python
``os.splice`` relay over plain TCP carried 4 GiB in 6.9 s (~620 MB/s), a local pipe in
2.5 s. Time runs from starting the source until the receiving hub has closed its pipe
(at most one pipe buffer left for the sink to read). Best of ``--repeat`` runs: other
work on the machine makes single runs vary by 2x.

    python -m bench.relay_bench [--size BYTES] [--json PATH]
    python -m bench.relay_bench --cluster [--mib 1024] [--compare]

``--cluster [--compare]``: the cross-host pipe of bench/spread_bench.py alone, on a 4-host simulated
cluster (0.5 CPU each, under the machine's cluster lock): a local ``dd | dd`` in n1,
``dd | dunix run --placement remote -- dd`` (the reader on a peer, n1's pipe relayed to
it), ``dunix run --placement remote sh -c 'dd | dd'``, and iperf3 n1 -> that peer in the
same run, so the ratio to iperf3 compares numbers taken together.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from dunix.fdmove import (
    DEFAULT_CHUNK,
    DEFAULT_WINDOW,
    PIPE_SIZE,
    Outcome,
    StreamData,
    StreamEnd,
    StreamGone,
    StreamHub,
    StreamMessage,
)
from dunix.wire import Channel, TLSIdentity, keygen, listener_addresses, open_channel, serve_tls

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "relay.json"
GiB = 1024 * 1024 * 1024
MB = 1_000_000
STREAM = 1


def _source(size: int) -> tuple[subprocess.Popen[bytes], int]:
    """``dd`` writing ``size`` zero bytes into a new pipe; returns it and the read end."""
    r, w = os.pipe()
    count = size // (1024 * 1024)
    proc = subprocess.Popen(
        ["dd", "if=/dev/zero", "bs=1M", f"count={count}", "status=none"], stdout=w
    )
    os.close(w)
    return proc, r


def _sink() -> tuple[subprocess.Popen[bytes], int]:
    """``dd`` reading a new pipe to /dev/null; returns it and the write end."""
    r, w = os.pipe()
    proc = subprocess.Popen(["dd", "of=/dev/null", "bs=1M", "status=none"], stdin=r)
    os.close(r)
    return proc, w


def local_pipe(size: int) -> float:
    start = time.perf_counter()
    count = size // (1024 * 1024)
    subprocess.run(
        f"dd if=/dev/zero bs=1M count={count} status=none | dd of=/dev/null bs=1M status=none",
        shell=True,
        check=True,
    )
    return time.perf_counter() - start


def in_memory(size: int, *, chunk: int = DEFAULT_CHUNK, window: int = DEFAULT_WINDOW) -> float:
    async def main() -> float:
        async with trio.open_nursery() as nursery:
            to_b, from_a = trio.open_memory_channel[StreamMessage](4)
            to_a, from_b = trio.open_memory_channel[StreamMessage](4)
            a = StreamHub(to_b.send, odd=True, chunk=chunk, window=window)
            b = StreamHub(to_a.send, odd=False, chunk=chunk, window=window)

            async def pump(
                source: trio.MemoryReceiveChannel[StreamMessage], hub: StreamHub
            ) -> None:
                async for msg in source:
                    hub.deliver(msg)

            nursery.start_soon(pump, from_a, b)
            nursery.start_soon(pump, from_b, a)
            await nursery.start(a.run)
            await nursery.start(b.run)
            start = time.perf_counter()
            source, r = _source(size)
            sink, w = _sink()
            receiver = b.open_receiver(STREAM, w)
            sender = a.open_sender(STREAM, r)
            assert await sender.wait() is Outcome.EOF
            assert await receiver.wait() is Outcome.EOF
            elapsed = time.perf_counter() - start
            await trio.to_thread.run_sync(source.wait)
            await trio.to_thread.run_sync(sink.wait)
            nursery.cancel_scope.cancel()
            return elapsed

    return trio.run(main)


async def _pump(channel: Channel, hub: StreamHub) -> None:
    try:
        async for msg in channel:
            hub.deliver(msg)
    finally:
        hub.link_lost()


def peer(pki: str, drain: bool, window: int) -> None:
    """The child: serve TLS as n1, relay stream 1 into a ``dd`` sink, exit at hang-up.

    ``drain``: no relay; read messages until a ``StreamEnd``, answer ``StreamGone``.
    """
    identity = TLSIdentity.load(pki, "n1", "node")

    async def main() -> None:
        async with trio.open_nursery() as nursery:

            async def handler(channel: Channel) -> None:
                if drain:
                    async for msg in channel:
                        if isinstance(msg, StreamEnd):
                            await channel.send(StreamGone(msg.stream))
                    nursery.cancel_scope.cancel()
                    return
                async with trio.open_nursery() as inner:
                    hub = StreamHub(channel.send, odd=False, window=window)
                    await inner.start(hub.run)
                    sink, w = _sink()
                    hub.open_receiver(STREAM, w)
                    await _pump(channel, hub)
                    await trio.to_thread.run_sync(sink.wait)
                    inner.cancel_scope.cancel()
                nursery.cancel_scope.cancel()

            listeners = await nursery.start(serve_tls, "127.0.0.1:0", identity, handler)
            print(listener_addresses(listeners)[0], flush=True)

    trio.run(main)


def over_tls(
    size: int, *, chunk: int = DEFAULT_CHUNK, window: int = DEFAULT_WINDOW, drain: bool = False
) -> float:
    with tempfile.TemporaryDirectory() as pki:
        keygen(pki, ["n1", "n2"], [])
        child = subprocess.Popen(
            [sys.executable, "-m", "bench.relay_bench", "--peer", pki, "--window", str(window)]
            + (["--drain"] if drain else []),
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        assert child.stdout is not None
        address = child.stdout.readline().decode().strip()
        identity = TLSIdentity.load(pki, "n2", "node")

        async def channel_only() -> float:
            channel = await open_channel(address, identity)
            payload = bytes(chunk)
            start = time.perf_counter()
            for _ in range(size // chunk):
                await channel.send(StreamData(STREAM, payload))
            await channel.send(StreamEnd(STREAM))
            assert isinstance(await channel.receive(), StreamGone)
            elapsed = time.perf_counter() - start
            await channel.aclose()
            return elapsed

        async def main() -> float:
            channel = await open_channel(address, identity)
            async with trio.open_nursery() as nursery:
                hub = StreamHub(channel.send, odd=True, chunk=chunk)
                await nursery.start(hub.run)
                nursery.start_soon(_pump, channel, hub)
                start = time.perf_counter()
                source, r = _source(size)
                sender = hub.open_sender(STREAM, r)
                assert await sender.wait() is Outcome.EOF
                while len(hub.mux):  # the receiver's final word: it wrote and closed
                    await trio.sleep(0.001)
                elapsed = time.perf_counter() - start
                await trio.to_thread.run_sync(source.wait)
                nursery.cancel_scope.cancel()
            await channel.aclose()
            return elapsed

        elapsed = trio.run(channel_only if drain else main)
        child.wait(timeout=30)
        return elapsed


def _cluster_run(mib: int, python_relay: bool) -> dict[str, Any]:
    """measure_pipe on a fresh cluster; ``python_relay``: its agents never hand a stream
    to the native relay (dunix/fdmove/bulk.py), as before it existed."""
    from bench import spread_bench as sb
    from bench._cluster import control, exclusive_cluster, keep_logs, up_when_free, wait_alive
    from dunix import cluster
    from dunix.fdmove.bulk import ENV

    sb.WORK.mkdir(parents=True, exist_ok=True)
    sizes = sb.Sizes(cpu_jobs=0, cpu_rounds=0, short_jobs=0, pipe_mib=mib, iperf_s=2)
    saved = os.environ.get(ENV)
    if python_relay:
        os.environ[ENV] = "0"  # the agents inherit it from `cluster up`
    try:
        with exclusive_cluster():
            up_when_free(len(sb.NODES), sb.CPU_QUOTA)
            try:
                trio.run(wait_alive, control(sb.HOME), len(sb.NODES))
                return sb.measure_pipe(sizes)
            finally:
                keep_logs(sb.WORK / "logs")
                cluster.down()
    finally:
        os.environ.pop(ENV, None)
        if saved is not None:
            os.environ[ENV] = saved


def cluster_pipe(mib: int, json_path: Path, compare: bool = False) -> int:
    """The cross-host pipe against iperf3, in one run (see the module docstring);
    ``compare``: first on a cluster whose agents keep every stream in Python."""
    from bench import spread_bench as sb

    before = _cluster_run(mib, python_relay=True) if compare else None
    pipe = _cluster_run(mib, python_relay=False)
    iperf = pipe["iperf3"].get("mb_per_s") if pipe["iperf3"].get("ok") else None
    print(f"{mib} MiB, {len(sb.NODES)} hosts x {sb.CPU_QUOTA} CPU, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}")  # fmt: skip
    cross = pipe["dunix_cross_host"]
    # the row spread_bench's table has: the same measure_pipe, the same medians
    print(f"pipe {mib} MiB {sb.HOME}->{cross.get('reader_on', '?')}, MB/s: dunix vs iperf3 "
          f"(median of {sb.PIPE_RUNS} runs each)")  # fmt: skip
    print(f"{'case':<22} {'MB/s':>8} {'x iperf3':>9}  each run")
    if before is not None:
        pipe["python_relay_cross_host"] = before["dunix_cross_host"]
        pipe["python_relay_iperf3"] = before["iperf3"]
    names = ["local", "dunix_cross_host", "dunix_in_one_job", "iperf3"]
    if before is not None:
        names[1:1] = ["python_relay_cross_host", "python_relay_iperf3"]
    first = pipe.get("python_relay_iperf3", {})
    iperf_before = first.get("mb_per_s") if first.get("ok") else None
    for name in names:
        r = pipe[name]
        rate = r.get("mb_per_s") if r.get("ok") else None
        base = iperf_before if name.startswith("python_relay") else iperf  # same cluster's
        ratio = f"{rate / base:.2f}" if rate and base else "-"
        shown = f"{rate:.0f}" if rate else "FAILED"
        each = ", ".join(str(x) for x in r.get("runs_mb_per_s", []))
        error = "" if rate else f"  {r.get('error', '')}"
        print(f"{name:<22} {shown:>8} {ratio:>9}  {each}{error}")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"benchmark": "relay-cluster", "mib": mib, **pipe}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.relay_bench", description=__doc__)
    ap.add_argument("--size", type=int, default=GiB, help="bytes per run (whole MiB)")
    ap.add_argument("--json", type=Path, default=RESULTS)
    ap.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="bytes per StreamData")
    ap.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="receive window")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case; the best counts")
    ap.add_argument("--cluster", action="store_true", help="the cross-host pipe vs iperf3")
    ap.add_argument(
        "--mib", type=int, default=1024,
        help="--cluster: MiB through the pipe (1024, as spread_bench's full run)",
    )  # fmt: skip
    ap.add_argument(
        "--compare", action="store_true",
        help="--cluster: first with every stream in Python (DUNIX_BULK_RELAY=0), then native",
    )  # fmt: skip
    ap.add_argument("--peer", metavar="PKI", help=argparse.SUPPRESS)
    ap.add_argument("--drain", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.peer:
        peer(args.peer, args.drain, args.window)
        return 0
    if args.cluster:
        json_path = args.json if args.json != RESULTS else RESULTS.with_name("relay-cluster.json")
        return cluster_pipe(args.mib, json_path, args.compare)
    size, chunk, window = args.size, args.chunk, args.window
    rows: list[dict[str, Any]] = []
    baseline = min(local_pipe(size) for _ in range(args.repeat))
    cases: list[tuple[str, Callable[[], float]]] = [
        ("local pipe", lambda: baseline),
        ("relay, in-memory link", lambda: in_memory(size, chunk=chunk, window=window)),
        ("relay, loopback TLS", lambda: over_tls(size, chunk=chunk, window=window)),
        ("channel only, loopback TLS", lambda: over_tls(size, chunk=chunk, drain=True)),
    ]
    for name, fn in cases:
        seconds = min(fn() for _ in range(args.repeat))
        rows.append(
            {
                "case": name,
                "seconds": round(seconds, 3),
                "mb_per_s": round(size / seconds / MB, 1),
                "ratio_to_pipe": round(baseline / seconds, 3),
            }
        )
    print(
        f"{size / GiB:.2f} GiB per run, window {window // 1024} KiB, "
        f"chunk {chunk // 1024} KiB, pipe {PIPE_SIZE // 1024} KiB, "
        f"{os.cpu_count()} cores"
    )
    print(f"{'case':<28} {'seconds':>8} {'MB/s':>8} {'x pipe':>7}")
    for row in rows:
        print(
            f"{row['case']:<28} {row['seconds']:>8.2f} {row['mb_per_s']:>8.0f} "
            f"{row['ratio_to_pipe']:>7.2f}"
        )
    result = {
        "benchmark": "relay",
        "bytes": size,
        "window": window,
        "chunk": chunk,
        "pipe_size": PIPE_SIZE,
        "cores": os.cpu_count(),
        "repeat": args.repeat,
        "load_average_1min": os.getloadavg()[0],
        "reference": "DESIGN.md: Python os.splice relay over plain TCP ~620 MB/s "
        "(4 GiB in 6.9 s); local pipe 4 GiB in 2.5 s (~1700 MB/s)",
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
