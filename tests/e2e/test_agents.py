"""Agents on a real 3-host simulated cluster: membership, load, failure, TLS refusal."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import DUNIX, REPO, cli_as, dunix, nodes_json, wait_for

pytestmark = pytest.mark.e2e

NAMES = ["n1", "n2", "n3"]
TLS_DIR = Path("/run/dunix/cluster/tls")


def states(view: list[dict[str, Any]]) -> dict[str, str]:
    return {n["name"]: n["state"] for n in view}


def all_alive(host: str) -> list[dict[str, Any]] | None:
    view = nodes_json(host)
    return view if states(view) == dict.fromkeys(NAMES, "alive") else None


def alive_with_load(host: str) -> list[dict[str, Any]] | None:
    view = all_alive(host)
    return view if view and all(n["mem_free"] > 0 for n in view) else None


def test_all_hosts_alive_with_load_and_cpu_fields(cluster3: list[Any]) -> None:
    for host in NAMES:
        view = wait_for(lambda h=host: alive_with_load(h), 15, f"all alive from {host}")
        for node in view:
            for key in ("name", "address", "state", "load", "mem_free", "cpu_level", "procs"):
                assert key in node
            assert node["address"].startswith("10.213.0.")
            assert node["mem_free"] > 0
            assert node["cpus"] == pytest.approx(0.5)
            assert node["cpu_level"] >= 1 and node["cpu_flags"] > 0


def test_cluster_status_json(cluster3: list[Any]) -> None:
    hosts = json.loads(dunix("cluster", "status", "--json").stdout)
    assert [h["name"] for h in hosts] == NAMES
    for h in hosts:
        assert h["netns"] and h["agent_pid"]
        os.kill(h["agent_pid"], 0)


def test_table_output_names_every_host(cluster3: list[Any]) -> None:
    wait_for(lambda: all_alive("n1"), 15, "all alive")
    out = dunix("nodes", "--control", "/run/dunix/hosts/n1/control.sock").stdout
    header, *rows = out.splitlines()
    assert header.split()[:3] == ["NODE", "ADDRESS", "STATE"]
    assert sorted(r.split()[0] for r in rows) == NAMES


def test_cpu_loop_on_one_host_raises_its_load_seen_from_another(cluster3: list[Any]) -> None:
    from dunix.cluster import exec_in

    wait_for(lambda: all_alive("n2"), 15, "all alive")

    def load_of_n1() -> float:
        return next(n["load_now"] for n in nodes_json("n2") if n["name"] == "n1")

    wait_for(lambda: load_of_n1() < 1.0, 20, "n1 idle before the test")
    loop = exec_in("n1", ["sh", "-c", "while :; do :; done"])
    try:
        # one runnable loop on a 0.5-CPU host is a normalised load of 2
        wait_for(lambda: load_of_n1() >= 1.5, 20, "n1's load to rise, as n2 sees it")
        wait_for(
            lambda: next(n["load"] for n in nodes_json("n2") if n["name"] == "n1") > 0.05,
            20,
            "n1's 1-minute load to rise",
        )
    finally:
        loop.kill()
        loop.wait()
    wait_for(lambda: load_of_n1() < 1.0, 20, "n1's load to fall again")


def test_killed_agent_is_marked_dead_and_comes_back(cluster3: list[Any]) -> None:
    from dunix import cluster

    wait_for(lambda: all_alive("n1"), 15, "all alive")
    watch = subprocess.Popen(
        [*DUNIX, "watch", "--control", "/run/dunix/hosts/n1/control.sock"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        time.sleep(0.5)  # let the watch subscribe before the event happens
        n3 = next(h for h in cluster.status() if h.name == "n3")
        assert n3.agent_pid
        os.kill(n3.agent_pid, signal.SIGKILL)
        for host in ("n1", "n2"):
            wait_for(
                lambda h=host: states(nodes_json(h)).get("n3") == "dead",
                15,
                f"{host} to mark n3 dead",
            )
        assert watch.stdout is not None
        events = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            line = watch.stdout.readline()
            if not line:
                break
            event = json.loads(line)
            events.append(event)
            if event["event"] == "dead" and event["name"] == "n3":
                break
        assert any(e["event"] == "dead" and e["name"] == "n3" for e in events), events
    finally:
        watch.terminate()
        watch.wait()

    cluster.start_agent("n3")
    for host in NAMES:
        wait_for(lambda h=host: all_alive(h), 20, f"n3 alive again as seen from {host}")


def _tls_refused(context: ssl.SSLContext) -> bool:
    """True when the agent refuses this TLS client (during or right after the handshake).

    In TLS 1.3 the server checks the client certificate after the client has finished its
    side of the handshake, so the refusal shows up as an alert (or EOF) on the first read.
    """
    raw = socket.create_connection(("10.213.0.1", 7946), timeout=5)
    try:
        with context.wrap_socket(raw) as tls:
            tls.sendall(b"\x00\x00\x00\x04junk")
            return tls.recv(1) == b""
    except (ssl.SSLError, ConnectionError):
        return True


def test_client_without_valid_certificate_is_refused(cluster3: list[Any], tmp_path: Path) -> None:
    from dunix.wire import keygen

    wait_for(lambda: all_alive("n1"), 15, "all alive")
    # no client certificate at all
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(TLS_DIR / "ca.pem")
    assert _tls_refused(ctx)
    proc = dunix("nodes", "--connect", "10.213.0.1:7946", "--tls-dir", str(tmp_path), check=False)
    assert proc.returncode != 0
    # a certificate from another CA
    keygen(tmp_path, nodes=[], clients=["admin"])
    proc = dunix("nodes", "--connect", "10.213.0.1:7946", "--tls-dir", str(tmp_path), check=False)
    assert proc.returncode != 0, proc.stdout
    # the agent logged why, and still serves a good client and its peers
    log = Path("/run/dunix/hosts/n1/agent.log").read_text()
    assert "10.213.0.254" in log
    proc = dunix("nodes", "--json", "--connect", "10.213.0.1:7946", "--tls-dir", str(TLS_DIR))
    assert states(json.loads(proc.stdout)) == dict.fromkeys(NAMES, "alive")


def test_non_root_user_may_list(cluster3: list[Any]) -> None:
    wait_for(lambda: all_alive("n1"), 15, "all alive")
    proc = cli_as(
        65534, 65534, ["nodes", "--json", "--control", "/run/dunix/hosts/n1/control.sock"]
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(states(json.loads(proc.stdout))) == NAMES
