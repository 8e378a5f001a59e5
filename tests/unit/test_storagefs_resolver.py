"""PeerResolver: several hosts' lookups over a fake network, on trio's MockClock."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from dunix.errors import PeerUnreachable
from dunix.pid.devino import split_ino
from dunix.storagefs.lookup import Lookup, LookupConfig, LookupQuery, NameCreated
from dunix.storagefs.resolver import LookupMessage, PeerResolver
from dunix.storagefs.store import LocalStore


class Net:
    """Delivers messages between resolvers; nodes in ``silent`` never answer."""

    def __init__(self) -> None:
        self.nodes: dict[int, PeerResolver] = {}
        self.silent: set[int] = set()
        self.unreachable: set[int] = set()
        self.sent: list[tuple[int, int, LookupMessage]] = []

    def sender(self, src: int):  # type: ignore[no-untyped-def]
        async def send(dst: int, message: LookupMessage) -> None:
            if dst in self.unreachable:
                raise PeerUnreachable(f"node {dst}")
            self.sent.append((src, dst, message))
            await trio.sleep(0.001)  # one link hop
            if dst not in self.silent:
                await self.nodes[dst].received(src, message)

        return send


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[dict[int, LocalStore]]:
    stores = {n: LocalStore(tmp_path / f"n{n}", n) for n in (1, 2, 3)}
    yield stores
    for store in stores.values():
        store.close()


def cluster(stores: dict[int, LocalStore], net: Net) -> dict[int, PeerResolver]:
    config = LookupConfig(deadline=0.05, negative_ttl=1.0)
    for n, store in stores.items():
        net.nodes[n] = PeerResolver(store, Lookup(n, config), net.sender(n), lambda: set(stores))
    return net.nodes


def run(scenario, stores: dict[int, LocalStore], net: Net) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        nodes = cluster(stores, net)
        async with trio.open_nursery() as nursery:
            for node in nodes.values():
                await nursery.start(node.run)
            await scenario(nodes)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_found_on_a_peer(stores: dict[int, LocalStore]) -> None:
    (stores[3].tree / "build").mkdir()
    (stores[3].tree / "build/foo.o").write_bytes(b"obj")
    net = Net()

    async def scenario(nodes: dict[int, PeerResolver]) -> None:
        start = trio.current_time()
        found = await nodes[1].lookup("build/foo.o")
        assert found is not None and found.node == 3 and found.size == 3
        assert split_ino(found.ino).node_id == 3
        assert trio.current_time() - start < 0.05  # answered before the deadline
        assert await nodes[2].lookup("build") is not None

    run(scenario, stores, net)


def test_missing_everywhere_then_created(stores: dict[int, LocalStore]) -> None:
    net = Net()

    async def scenario(nodes: dict[int, PeerResolver]) -> None:
        assert await nodes[1].lookup("x") is None
        queries = sum(isinstance(m, LookupQuery) for _, _, m in net.sent)
        assert queries == 2
        assert await nodes[1].lookup("x") is None  # negative cache: no new query
        assert sum(isinstance(m, LookupQuery) for _, _, m in net.sent) == queries
        (stores[2].tree / "x").write_bytes(b"")
        nodes[2].created("x")
        await trio.sleep(0.01)
        assert (2, 1, NameCreated(2, "x")) in net.sent
        found = await nodes[1].lookup("x")
        assert found is not None and found.node == 2

    run(scenario, stores, net)


def test_silent_peer_hits_the_deadline(stores: dict[int, LocalStore]) -> None:
    net = Net()
    net.silent.add(3)

    async def scenario(nodes: dict[int, PeerResolver]) -> None:
        start = trio.current_time()
        assert await nodes[1].lookup("nope") is None
        assert trio.current_time() - start == pytest.approx(0.05)

    run(scenario, stores, net)


def test_unreachable_peer_is_not_waited_for(stores: dict[int, LocalStore]) -> None:
    net = Net()
    net.unreachable.add(3)

    async def scenario(nodes: dict[int, PeerResolver]) -> None:
        start = trio.current_time()
        assert await nodes[1].lookup("nope") is None
        assert trio.current_time() - start < 0.05

    run(scenario, stores, net)


def test_query_escaping_the_tree_is_answered_no(stores: dict[int, LocalStore]) -> None:
    net = Net()

    async def scenario(nodes: dict[int, PeerResolver]) -> None:
        await nodes[2].received(1, LookupQuery(99, 1, "../../etc/passwd"))
        await trio.sleep(0.01)
        replies = [m for src, dst, m in net.sent if src == 2 and dst == 1]
        assert len(replies) == 1 and not getattr(replies[0], "found", True)

    run(scenario, stores, net)


def test_names_in_a_folder_only_one_host_has_ask_nobody(stores: dict[int, LocalStore]) -> None:
    """Host 1's output folder: its peers say they lack it, so the next names in it are not
    asked at all, until a peer creates something there."""
    (stores[1].tree / "out").mkdir()
    (stores[3].tree / "src").mkdir()
    net = Net()

    async def scenario(nodes: dict[int, PeerResolver]) -> None:
        def queries() -> int:
            return sum(isinstance(m, LookupQuery) for _, _, m in net.sent)

        assert await nodes[1].lookup("out/a.o") is None
        assert queries() == 2
        for name in ("out/b.o", "out/c.o", "out/sub/d.o"):
            assert await nodes[1].lookup(name) is None
        assert queries() == 2  # no message for any of them
        assert await nodes[1].lookup("src/x.c") is None  # asks both: 2 lacks src, 3 has it
        assert queries() == 4
        assert await nodes[1].lookup("src/y.c") is None  # only 3
        assert queries() == 5
        (stores[2].tree / "out").mkdir()
        (stores[2].tree / "out/e.o").write_bytes(b"e")
        nodes[2].created("out/e.o")  # 2's NameCreated
        await trio.sleep(0.01)
        found = await nodes[1].lookup("out/e.o")
        assert found is not None and found.node == 2

    run(scenario, stores, net)


def test_names_created_together_go_in_one_message_per_peer(
    stores: dict[int, LocalStore],
) -> None:
    net = Net()

    async def scenario(nodes: dict[int, PeerResolver]) -> None:
        await trio.sleep(3)  # a new agent tells everybody for a while (as after a restart)
        for name in ("a", "b", "c"):
            assert await nodes[2].lookup(name) is None  # cached as missing on 2
        net.sent.clear()
        for name in ("a", "b", "c"):  # made on 1 in one go (one FUSE burst)
            (stores[1].tree / name).write_bytes(b"")
            nodes[1].created(name)
        await trio.sleep(0.01)
        sent = [(dst, m) for src, dst, m in net.sent if isinstance(m, NameCreated)]
        assert sorted(dst for dst, _ in sent) == [2]  # 3 never asked about them
        assert all((m.path, *m.more) == ("a", "b", "c") for _, m in sent)
        for name in ("a", "b", "c"):  # every one of them is asked again, and found
            found = await nodes[2].lookup(name)
            assert found is not None and found.node == 1
        assert await nodes[3].lookup("d") is None
        nodes[1].created("d")  # a later one: a message of its own, to 3 only
        await trio.sleep(0.01)
        later = [(d, m) for _, d, m in net.sent if isinstance(m, NameCreated) and m.path == "d"]
        assert [(d, m.more) for d, m in later] == [(3, ())]

    run(scenario, stores, net)
