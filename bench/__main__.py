"""Run every benchmark: ``python -m bench [--quick]``. Tables on stdout, JSON in bench/results/."""

from __future__ import annotations

import argparse
import os
import sys


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, a 60 s soak")
    args = ap.parse_args()
    from bench import gossip_sim

    print("== membership, 10 / 100 / 1,000 simulated members (sans-IO core, 1% loss)")
    gossip_sim.main([] if not args.quick else ["--quick"])
    from bench import placement_sim, relay_bench

    print("\n== exec-time placement of a burst (simulation)")
    placement_sim.main([])
    from bench import balance_sim

    print("\n== live balancer: 12 CPU-bound loops started on 1 of 4 hosts (simulation)")
    balance_sim.main([])
    print("\n== fd relay throughput: pipe -> TLS link -> pipe vs a local pipe")
    relay_bench.main([])
    if os.geteuid() != 0:
        print("(the real-cluster benchmark needs root: skipped)", file=sys.stderr)
        return 0
    from bench import cluster_bench

    print("\n== membership on a real simulated cluster of 8 hosts")
    cluster_bench.main(["--kills", "5", "--soak", "60"] if args.quick else [])
    from bench import run_bench

    print("\n== dunix run: remote exec latency and a fork-heavy script on 3 simulated hosts")
    run_bench.main(["--quick"] if args.quick else [])
    from bench import spread_bench

    print("\n== dunix run: CPU-bound and short jobs spread, a cross-host pipe (4 hosts, 0.5 CPU)")
    spread_bench.main(["--quick"] if args.quick else [])
    from bench import migrate_bench

    print("\n== CRIU migration between 2 simulated hosts vs a raw local criu dump + restore")
    migrate_bench.main(["--quick"] if args.quick else [])
    from bench import home_move_bench

    print("\n== dunix migrate of a process at home: plain dump vs post-copy (3 hosts, real agents)")
    home_move_bench.main(["--rounds", "1", "--sizes", "256"] if args.quick else [])
    from bench import balance_bench

    print("\n== live balancer: 12 CPU-bound workers started on 1 of 4 hosts, on vs off")
    balance_bench.main(["--work", "1.0"] if args.quick else [])
    from bench import fs_bench

    print("\n== storagefs: fio vs the disk and iperf3, metadata, missing-name lookups (3, 8 hosts)")
    fs_bench.main(["--quick"] if args.quick else [])
    return 0


if __name__ == "__main__":
    sys.exit(main())
