"""Agents started without --join find each other by UDP multicast (--discover)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.conftest import exclusive_cluster, nodes_json, require_root, wait_for

pytestmark = pytest.mark.e2e


def discover_argv(host: Any) -> list[str]:
    from dunix import cluster

    argv = cluster.default_agent_argv(host)
    if "--join" in argv:
        i = argv.index("--join")
        del argv[i : i + 2]
    return [*argv, "--discover"]


@pytest.fixture(scope="module")
def discovering() -> Iterator[list[Any]]:
    require_root()
    from dunix import cluster

    with exclusive_cluster():
        cluster.down()
        try:
            yield cluster.up(3, None, agent_argv=discover_argv)
        finally:
            cluster.down()


def test_agents_without_seeds_find_each_other(discovering: list[Any]) -> None:
    names = ["n1", "n2", "n3"]
    for host in names:
        wait_for(
            lambda h=host: (
                sorted(n["name"] for n in nodes_json(h) if n["state"] == "alive") == names
            ),
            20,
            f"{host} to discover every peer",
        )
