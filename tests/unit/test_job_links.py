"""JobLinks (agent/remote.py): what is sent to a peer meanwhile goes in one write, in call
order; a closed stream's final StreamGone waits for the next write (or DEFER_MAX)."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from dunix.agent import remote as remote_mod
from dunix.agent.remote import DEFER_END, DEFER_MAX, JobLinks
from dunix.errors import PeerUnreachable
from dunix.fdmove.streams import StreamCredit, StreamEnd, StreamGone
from dunix.wire.jobs import RemoteSignal


class FakeChannel:
    """Records each write (a list of messages); ``gate`` holds writes while it is set."""

    def __init__(self) -> None:
        self.writes: list[list[Any]] = []
        self.gate: trio.Event | None = None
        self.fail = False

    async def send(self, msg: Any) -> None:
        await self.send_many([msg])

    async def send_many(self, msgs: list[Any]) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise PeerUnreachable("sending to n2: broken")
        self.writes.append(list(msgs))

    async def aclose(self) -> None:
        pass


def sig(n: int) -> RemoteSignal:
    return RemoteSignal("job", n, 15, False)


@pytest.fixture
def channel(monkeypatch: pytest.MonkeyPatch) -> FakeChannel:
    chan = FakeChannel()

    async def open_channel(*args: Any, **kwargs: Any) -> FakeChannel:
        return chan

    monkeypatch.setattr(remote_mod, "open_channel", open_channel)
    monkeypatch.setattr(JobLinks, "_bulk", lambda self, peer: None)
    return chan


def links_in(nursery: trio.Nursery) -> JobLinks:
    config = SimpleNamespace(name="n1", address="10.0.0.1:1", connect_timeout=1.0)
    members = SimpleNamespace(member=lambda peer: SimpleNamespace(address="10.0.0.2:1"))
    agent = SimpleNamespace(config=config, identity=None, membership=members)
    return JobLinks(agent, nursery)  # type: ignore[arg-type]


def run(body: Callable[[JobLinks], Awaitable[None]], clock: Any = None) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await body(links_in(nursery))
            nursery.cancel_scope.cancel()

    trio.run(main, clock=clock or trio.testing.MockClock(autojump_threshold=0))


def test_what_is_sent_in_one_turn_goes_in_one_write(channel: FakeChannel) -> None:
    async def body(links: JobLinks) -> None:
        async with trio.open_nursery() as nursery:
            for n in range(4):  # tasks of one turn (trio runs them in any order)
                nursery.start_soon(links.send, "n2", sig(n))
        assert len(channel.writes) == 1
        assert sorted(channel.writes[0], key=lambda m: m.home_pid) == [sig(n) for n in range(4)]
        await links.send_many("n2", [sig(5), sig(4)])  # one call: its order
        assert channel.writes[1] == [sig(5), sig(4)]

    run(body)


def test_sends_during_a_write_gather_in_the_next_one(channel: FakeChannel) -> None:
    async def body(links: JobLinks) -> None:
        channel.gate = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(links.send, "n2", sig(0))
            await trio.testing.wait_all_tasks_blocked()  # its write waits at the gate
            for n in (1, 2, 3):
                nursery.start_soon(links.send_many, "n2", [sig(n), sig(10 + n)])
                await trio.testing.wait_all_tasks_blocked()
            channel.gate.set()
        assert channel.writes == [
            [sig(0)], [sig(1), sig(11), sig(2), sig(12), sig(3), sig(13)]
        ]  # fmt: skip

    run(body)


def test_a_failed_write_fails_every_message_of_its_batch(channel: FakeChannel) -> None:
    async def body(links: JobLinks) -> None:
        channel.fail = True
        failed: list[int] = []

        async def send(n: int) -> None:
            try:
                await links.send("n2", sig(n))
            except PeerUnreachable:
                failed.append(n)

        async with trio.open_nursery() as nursery:
            for n in range(3):
                nursery.start_soon(send, n)
        assert sorted(failed) == [0, 1, 2] and channel.writes == []
        channel.fail = False
        await links.send("n2", sig(9))  # a new channel for the next one
        assert channel.writes == [[sig(9)]]

    run(body)


def test_a_cancelled_writer_still_sends_what_joined_its_batch(channel: FakeChannel) -> None:
    async def body(links: JobLinks) -> None:
        channel.gate = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(links.send, "n2", sig(0))  # holds the lock at the gate
            await trio.testing.wait_all_tasks_blocked()
            with trio.CancelScope() as scope:
                nursery.start_soon(links.send, "n2", sig(2))  # joins the batch of 1
                scope.cancel()
                await links.send("n2", sig(1))  # opens the next batch, then is cancelled
            channel.gate.set()
        assert [m for write in channel.writes for m in write] == [sig(0), sig(1), sig(2)]

    run(body)


def test_a_closed_streams_gone_rides_with_the_next_write(channel: FakeChannel) -> None:
    clock = trio.testing.MockClock()  # moved by hand: time passes only where it says

    async def body(links: JobLinks) -> None:
        hub = await links.hub("n2")
        r, w = os.pipe()
        r2, w2 = os.pipe()
        try:
            stream = hub.allocate()
            receiver = hub.open_receiver(stream, w)
            await trio.testing.wait_all_tasks_blocked()
            assert channel.writes == [[StreamCredit(stream, hub.mux.window)]]
            hub.deliver(StreamEnd(stream))  # nothing to write: flushed, closed here
            await receiver.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert len(channel.writes) == 1  # its StreamGone waits
            await links.send("n2", sig(1))
            assert channel.writes[1] == [StreamGone(stream), sig(1)]

            clock.jump(DEFER_MAX)  # its timer finds nothing left to send
            await trio.testing.wait_all_tasks_blocked()
            assert len(channel.writes) == 2

            other = hub.allocate()
            hub.open_receiver(other, os.dup(w2))
            await trio.testing.wait_all_tasks_blocked()
            hub.deliver(StreamEnd(other))
            await trio.testing.wait_all_tasks_blocked()
            assert channel.writes[-1] == [StreamCredit(other, hub.mux.window)]
            clock.jump(DEFER_MAX)  # nothing else went: it goes alone
            await trio.testing.wait_all_tasks_blocked()
            assert channel.writes[-1] == [StreamGone(other)]
        finally:
            for fd in (r, r2, w2):
                os.close(fd)

    run(body, clock)


def test_a_gone_that_the_sender_must_act_on_goes_at_once(channel: FakeChannel) -> None:
    async def body(links: JobLinks) -> None:
        hub = await links.hub("n2")
        r, w = os.pipe()
        stream = hub.allocate()
        receiver = hub.open_receiver(stream, w)
        await trio.testing.wait_all_tasks_blocked()
        receiver.stop()  # its reader left before the sender's end: EPIPE there
        await trio.testing.wait_all_tasks_blocked()
        assert channel.writes[-1] == [StreamGone(stream)]
        os.close(r)

    run(body)


def test_a_streams_end_keeps_its_place_and_waits_at_most_defer_end(
    channel: FakeChannel,
) -> None:
    clock = trio.testing.MockClock()

    async def body(links: JobLinks) -> None:
        hub = await links.hub("n2")
        send = hub.send  # what a sender endpoint calls
        channel.gate = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(links.send, "n2", sig(0))  # a write under way
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(links.send, "n2", sig(1))  # opens the next batch
            await trio.testing.wait_all_tasks_blocked()
            await send(StreamEnd(7))  # joins that batch after sig(1); returns at once
            channel.gate.set()
        assert channel.writes == [[sig(0)], [sig(1), StreamEnd(7)]]

        channel.gate = None
        await send(StreamEnd(9))  # nothing open: it waits for the next write
        await trio.testing.wait_all_tasks_blocked()
        assert len(channel.writes) == 2
        await links.send("n2", sig(2))  # as a guest's RemoteExited after its ends
        assert channel.writes[2] == [StreamEnd(9), sig(2)]

        await send(StreamEnd(11))
        clock.jump(DEFER_END / 2)
        await trio.testing.wait_all_tasks_blocked()
        assert len(channel.writes) == 3
        clock.jump(DEFER_END / 2)
        await trio.testing.wait_all_tasks_blocked()
        assert channel.writes[3] == [StreamEnd(11)]

    run(body, clock)
