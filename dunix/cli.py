"""The `dunix` command: a thin argparse front end over dunix.client and dunix.cluster.

Exit codes: 0 success, 1 a dunix error, 2 bad usage or configuration, 3 no such
node/process, 69 no agent reachable, 77 not allowed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import trio

from dunix.errors import DunixError

EPILOG_NODES = """examples:
  $ dunix nodes
  $ dunix nodes --json | jq '.[] | select(.state == "alive") | .name'
"""
EPILOG_CLUSTER = """examples:
  $ sudo dunix cluster up -n 4 --cpu-quota 0.5
  $ dunix cluster status --json
  $ sudo dunix cluster down
"""
EPILOG_RUN = """examples:
  $ dunix run -- ./script.sh arg1 arg2
  $ dunix run --node n2 -- make -j8
  $ dunix run --placement remote -- sh -c 'hostname'
exit status: the program's, or 128+N when a signal N killed it.
"""
EPILOG_PS = """examples:
  $ dunix ps
  $ dunix ps --json | jq '.[] | select(.node != .home)'
"""
EPILOG_KILL = """examples:
  $ dunix kill 4194305
  $ dunix kill -s INT 1:4100
"""
EPILOG_MIGRATE = """examples:
  $ dunix migrate 4194305 n3
  $ dunix migrate 1:4100 home
exit status: 0 when it moved; 1 (with the reason) when it still runs where it was.
"""
EPILOG_KEYGEN = """examples:
  $ dunix keygen --dir /etc/dunix/tls --node n1 --node n2 --client admin
"""
EPILOG_AGENT = """examples:
  $ dunix agent --listen 192.0.2.7:7946 --join 192.0.2.1:7946
  $ dunix agent --config /etc/dunix/dunix.toml --discover
"""


def _client_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("which agent")
    g.add_argument("--control", type=Path, help="control socket (default: this host's agent)")
    g.add_argument("--connect", metavar="HOST:PORT", help="a remote agent, over mutual TLS")
    g.add_argument("--tls-dir", type=Path, help="folder with ca.pem and the client certificate")
    g.add_argument("--client-name", default="admin", help="client certificate name")


async def _client(args: argparse.Namespace) -> Any:
    from dunix.client import Client

    return await Client.connect(
        args.control, address=args.connect, tls_dir=args.tls_dir, client_name=args.client_name
    )


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "K", "M", "G", "T"):
        if size < 1024 or unit == "T":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    raise AssertionError


def _node_json(node: Any) -> dict[str, Any]:
    return asdict(node)


def cmd_nodes(args: argparse.Namespace) -> int:
    async def main() -> list[Any]:
        async with await _client(args) as client:
            return list(await client.nodes())

    nodes = trio.run(main)
    if args.json:
        print(json.dumps([_node_json(n) for n in nodes], indent=2))
        return 0
    rows = [("NODE", "ADDRESS", "STATE", "LOAD", "NOW", "CPUS", "MEM FREE", "CPU", "PROCS")]
    for n in nodes:
        rows.append(
            (
                n.name,
                n.address,
                n.state,
                f"{n.load:.2f}",
                f"{n.load_now:.2f}",
                f"{n.cpus:g}",
                _human_bytes(n.mem_free),
                f"v{n.cpu_level}",
                str(n.procs),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    async def main() -> None:
        async with await _client(args) as client:
            if args.initial:
                for node in await client.nodes():
                    print(json.dumps({"event": "present", "time": node.since, **_node_json(node)}))
            sys.stdout.flush()
            async for ev in await client.watch():
                print(json.dumps({"event": ev.kind, "time": ev.time, **_node_json(ev.node)}))
                sys.stdout.flush()

    with contextlib.suppress(KeyboardInterrupt):
        trio.run(main)
    return 0


def cmd_fs_where(args: argparse.Namespace) -> int:
    from dunix.client import storagefs_copies, storagefs_owner

    owners = [(path, *storagefs_owner(path), storagefs_copies(path)) for path in args.paths]
    names: dict[int, str] = {0: "every host"}
    with contextlib.suppress(DunixError, OSError):

        async def main() -> list[Any]:
            async with await _client(args) as client:
                return list(await client.nodes())

        names.update({n.node_id: n.name for n in trio.run(main)})
    rows = [
        {"path": p, "node_id": node, "node": names.get(node, ""), "ino": ino,
         "replicas": [{"node_id": r, "node": names.get(r, "")} for r in copies]}
        for p, node, ino, copies in owners
    ]  # fmt: skip
    if args.json:
        print(json.dumps(rows[0] if len(rows) == 1 else rows, indent=2))
        return 0
    for row in rows:
        extra = "".join(f", replica {r['node'] or '?'} (node {r['node_id']})"
                        for r in row["replicas"])  # fmt: skip
        print(f"{row['path']}  {row['node'] or '?'} (node {row['node_id']}){extra}")
    return 0


def cmd_fs_replicas(args: argparse.Namespace) -> int:
    from dunix.client import storagefs_set_replicas

    for path in args.paths:
        storagefs_set_replicas(path, args.factor)
    return 0


def _run_control(args: argparse.Namespace) -> Path | None:
    """Which agent starts the job: --control, --node on the local cluster, or the default."""
    if args.control is not None:
        return Path(str(args.control))
    if args.node:
        from dunix.client import CLUSTER_HOSTS

        path: Path = CLUSTER_HOSTS / str(args.node) / "control.sock"
        if not path.exists():
            from dunix.errors import NoSuchNode

            raise NoSuchNode(f"no agent of node {args.node!r} on this machine ({path})")
        return path
    return None


def cmd_run(args: argparse.Namespace) -> int:
    from dunix.client import Client, exit_code

    argv = list(args.program)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print(
            "dunix run: nothing to run (dunix run [--node N] -- PROGRAM ARGS...)", file=sys.stderr
        )
        return 2

    async def main() -> int:
        async with await Client.connect(_run_control(args)) as client:
            return await client.run(argv, mode=args.placement or "")

    return exit_code(trio.run(main))


def cmd_ps(args: argparse.Namespace) -> int:
    async def main() -> Any:
        async with await _client(args) as client:
            return await client.ps()

    reply = trio.run(main)
    if args.json:
        print(json.dumps([asdict(p) for p in reply.procs], indent=2))
    else:
        rows = [("GPID", "HOME", "NODE", "MOVES", "PID", "USER", "STATE", "CPU", "RSS",
                 "COMMAND")]  # fmt: skip
        for p in reply.procs:
            rows.append(
                (str(p.gpid), p.home, p.node, str(p.moves), str(p.pid), _user(p.uid), p.state,
                 f"{p.cpu:.1f}", _human_bytes(p.rss), p.cmd)
            )  # fmt: skip
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    for node in reply.missing:
        print(f"dunix ps: {node} did not answer", file=sys.stderr)
    return 0


SIGNAL_NAMES = {s.name.removeprefix("SIG") for s in signal.Signals}


def _user(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _signal_number(text: str) -> int:
    import signal as sig

    name = text.upper().removeprefix("-")
    if name.isdigit():
        return int(name)
    try:
        return int(sig.Signals[name if name.startswith("SIG") else "SIG" + name])
    except KeyError:
        from dunix.errors import ConfigError

        raise ConfigError(f"unknown signal {text!r}") from None


def cmd_kill(args: argparse.Namespace) -> int:
    from dunix.pid import parse_gpid

    signum = _signal_number(args.signal)
    gpids = [parse_gpid(g) for g in args.gpid]

    async def main() -> None:
        async with await _client(args) as client:
            for gpid in gpids:
                await client.kill(gpid, signum)

    trio.run(main)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from dunix.pid import parse_gpid

    gpid = parse_gpid(args.gpid)

    async def main() -> Any:
        async with await _client(args) as client:
            return await client.migrate(gpid, args.node)

    reply = trio.run(main)
    if args.json:
        print(json.dumps(asdict(reply), indent=2))
        return 0
    print(f"gpid {reply.gpid} moved {reply.source} -> {reply.target} (pid {reply.pid}, "
          f"move {reply.moves})")  # fmt: skip
    for phase in reply.phases:
        print(f"  {phase.name:<14} {phase.ms:9.1f} ms")
    mb = reply.image_bytes / 1e6
    print(f"frozen for {reply.downtime_ms:.1f} ms (freezing took {reply.freeze_ms:.1f} ms); "
          f"{mb:.1f} MB of images; {reply.total_ms:.1f} ms in all")  # fmt: skip
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    from dunix.agent import run_agent
    from dunix.agent.config import load_config

    overrides = {
        "name": args.name,
        "listen": args.listen,
        "advertise": args.advertise,
        "join": args.join or None,
        "control": args.control,
        "tls_dir": args.tls_dir,
        "state_dir": args.state_dir,
        "discover": True if args.discover else None,
        "storagefs": True if args.storagefs else None,
    }
    config = load_config(args.config, overrides)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    run_agent(config)
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from dunix.wire import keygen

    keygen(args.dir, nodes=args.node, clients=args.client or ["admin"])
    print(f"certificates in {args.dir}")
    return 0


def cmd_cluster_up(args: argparse.Namespace) -> int:
    from dunix import cluster
    from dunix.client import Client

    hosts = cluster.up(args.n, args.cpu_quota)
    for h in hosts:
        print(f"{h.name}  {h.address}  netns {h.netns}  agent pid {h.agent_pid}")

    async def ready() -> None:
        deadline = trio.current_time() + args.wait
        while True:  # the agent may not have made its socket yet
            try:
                client = await Client.connect(hosts[0].control_socket)
                break
            except DunixError:
                if trio.current_time() > deadline:
                    raise
                await trio.sleep(0.1)
        async with client:
            await client.wait_alive(len(hosts), max(0.0, deadline - trio.current_time()))

    if args.wait > 0:
        trio.run(ready)
        print(f"all {len(hosts)} hosts alive")
    return 0


def cmd_cluster_down(args: argparse.Namespace) -> int:
    from dunix import cluster

    cluster.down()
    return 0


def cmd_cluster_status(args: argparse.Namespace) -> int:
    from dunix import cluster

    hosts = cluster.status()
    if args.json:
        print(json.dumps([asdict(h) for h in hosts], indent=2, default=str))
    elif not hosts:
        print("no local cluster")
    else:
        for h in hosts:
            state = "running" if h.agent_pid else "agent down"
            print(f"{h.name}  {h.address}  netns {h.netns}  agent pid {h.agent_pid}  {state}")
    return 0


def cmd_cluster_start_agent(args: argparse.Namespace) -> int:
    from dunix import cluster

    h = cluster.start_agent(args.name)
    print(f"{h.name}: agent pid {h.agent_pid}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dunix",
        description="Run a cluster of Linux hosts as one machine.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("nodes", help="list members, their state and load", epilog=EPILOG_NODES,
                       formatter_class=fmt)  # fmt: skip
    p.add_argument("--json", action="store_true", help="a JSON list of objects")
    _client_args(p)
    p.set_defaults(func=cmd_nodes)

    p = sub.add_parser("fs", help="the shared file tree at /dunix/fs",
                       epilog="examples:\n  $ dunix fs where /dunix/fs/build/foo.o\n"
                              "  $ dunix fs replicas 2 /dunix/fs/home\n"
                              "  $ dunix fs where --json /dunix/fs/a /dunix/fs/b",
                       formatter_class=fmt)  # fmt: skip
    fsub = p.add_subparsers(dest="fs_action", metavar="ACTION", required=True)
    c = fsub.add_parser("where", help="which node owns a file (from its inode number)")
    c.add_argument("--json", action="store_true", help="a JSON object (a list for several)")
    c.add_argument("paths", nargs="+", metavar="PATH")
    _client_args(c)
    c.set_defaults(func=cmd_fs_where)
    c = fsub.add_parser("replicas", help="keep N copies of every file below a folder")
    c.add_argument("factor", type=int, metavar="N", help="copies in all (1: no replicas)")
    c.add_argument("paths", nargs="+", metavar="PATH", help="folders under /dunix/fs")
    c.set_defaults(func=cmd_fs_replicas)

    p = sub.add_parser(
        "watch",
        help="JSON lines as hosts join, become suspect, die, leave",
        epilog="examples:\n  $ dunix watch\n  $ dunix watch --initial | grep '\"dead\"'\n",
        formatter_class=fmt,
    )
    p.add_argument("--initial", action="store_true", help="first print every current member")
    _client_args(p)
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser(
        "run",
        help="run a program as a job on the cluster",
        epilog=EPILOG_RUN,
        formatter_class=fmt,
    )
    p.add_argument("--node", help="start the job's first process on this node")
    p.add_argument("--control", type=Path, help="control socket of the starting agent")
    p.add_argument(
        "--placement", choices=("auto", "local", "remote"), help="where execs go (default auto)"
    )
    p.add_argument("program", nargs=argparse.REMAINDER, help="-- PROGRAM ARGS...")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("ps", help="every managed process, cluster-wide", epilog=EPILOG_PS,
                       formatter_class=fmt)  # fmt: skip
    p.add_argument("--json", action="store_true")
    _client_args(p)
    p.set_defaults(func=cmd_ps)

    p = sub.add_parser("kill", help="signal processes by gpid", epilog=EPILOG_KILL,
                       formatter_class=fmt)  # fmt: skip
    p.add_argument("-s", "--signal", default="TERM", help="signal name or number (default TERM)")
    p.add_argument("gpid", nargs="+")
    _client_args(p)
    p.set_defaults(func=cmd_kill)

    p = sub.add_parser("migrate", help="move a running process to another node",
                       epilog=EPILOG_MIGRATE, formatter_class=fmt)  # fmt: skip
    p.add_argument("gpid", help="as `dunix ps` shows it, or NODE_ID:PID")
    p.add_argument("node", help="a node name, or `home`")
    p.add_argument("--json", action="store_true")
    _client_args(p)
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("agent", help="run the node agent", epilog=EPILOG_AGENT,
                       formatter_class=fmt)  # fmt: skip
    p.add_argument("--config", type=Path, help="TOML file (see dunix.agent.config)")
    p.add_argument("--name", help="node name (default: host name)")
    p.add_argument("--listen", help="HOST:PORT for peers and remote clients")
    p.add_argument("--advertise", help="HOST:PORT peers should use, if not --listen")
    p.add_argument("--join", action="append", metavar="HOST:PORT", help="any member")
    p.add_argument("--control", type=Path, help="local control socket path")
    p.add_argument("--tls-dir", type=Path, help="folder with ca.pem, NAME.pem, NAME.key")
    p.add_argument("--state-dir", type=Path, help="folder for the agent's own files")
    p.add_argument("--discover", action="store_true", help="find peers by UDP multicast")
    p.add_argument("--storagefs", action="store_true", help="mount the shared tree at /dunix/fs")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_agent)

    p = sub.add_parser(
        "keygen",
        help="make a cluster CA and node/client certificates",
        epilog=EPILOG_KEYGEN,
        formatter_class=fmt,
    )
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--node", action="append", default=[], help="a node name (repeat)")
    p.add_argument("--client", action="append", help="a client name (repeat; default admin)")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("cluster", help="a local simulated cluster", epilog=EPILOG_CLUSTER,
                       formatter_class=fmt)  # fmt: skip
    csub = p.add_subparsers(dest="cluster_verb", required=True, metavar="ACTION")
    c = csub.add_parser("up", help="bring up N simulated hosts, each running an agent")
    c.add_argument("-n", type=int, default=3, help="number of hosts (default 3)")
    c.add_argument("--cpu-quota", type=float, help="CPUs per host, e.g. 0.5")
    c.add_argument(
        "--wait", type=float, default=30, help="seconds to wait until all are alive (0: no wait)"
    )
    c.set_defaults(func=cmd_cluster_up)
    c = csub.add_parser("down", help="remove every host, link, cgroup and mount")
    c.set_defaults(func=cmd_cluster_down)
    c = csub.add_parser("status", help="the simulated hosts and their agents")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_cluster_status)
    c = csub.add_parser("start-agent", help="(re)start the agent of one host")
    c.add_argument("name")
    c.set_defaults(func=cmd_cluster_start_agent)
    return parser


def _kill_shorthand(argv: list[str]) -> list[str]:
    """`dunix kill -TERM GPID` / `-9` as kill(1) spells it: the same as `-s TERM`."""
    if len(argv) >= 2 and argv[0] == "kill" and argv[1].startswith("-"):
        flag = argv[1][1:]
        if flag.isdigit() or flag.upper().removeprefix("SIG") in SIGNAL_NAMES:
            return ["kill", "-s", flag, *argv[2:]]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(_kill_shorthand(raw))
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except DunixError as exc:
        print(f"dunix: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `dunix nodes | head`: the reader left, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # a path argument: `dunix fs where /dunix/fs/missing`
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"dunix: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
