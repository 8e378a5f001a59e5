"""The sans-IO stream mux: states, credit, final words, and what the peer may not do."""

from __future__ import annotations

import random

import pytest

from dunix.errors import ProtocolError
from dunix.fdmove import (
    STREAM_AFTER,
    STREAM_MESSAGES,
    STREAM_MIN_READ,
    TRANSITIONS,
    Event,
    Role,
    State,
    StreamBulk,
    StreamCredit,
    StreamData,
    StreamEnd,
    StreamGone,
    StreamMessage,
    StreamMux,
    StreamPull,
    StreamReady,
    StreamWant,
    odd_side,
)
from dunix.fdmove import streams as streams_module
from dunix.wire import decode, encode

WINDOW = 1024


def pair(window: int = WINDOW) -> tuple[StreamMux, StreamMux]:
    return StreamMux(odd=True, window=window), StreamMux(odd=False, window=window)


def feed(mux: StreamMux, msgs: list[StreamMessage]) -> None:
    for msg in msgs:
        mux.receive(msg)


def opened(window: int = WINDOW) -> tuple[StreamMux, StreamMux, int]:
    """A sender mux and a receiver mux with one open stream."""
    sender, receiver = pair(window)
    stream = sender.allocate()
    sender.open_sender(stream)
    feed(sender, receiver.open_receiver(stream))
    return sender, receiver, stream


def test_ids_have_the_sides_parity_and_never_repeat() -> None:
    odd, even = pair()
    assert [odd.allocate() for _ in range(3)] == [1, 3, 5]
    assert [even.allocate() for _ in range(3)] == [2, 4, 6]
    assert odd_side("a", "b") and not odd_side("b", "a")
    with pytest.raises(ValueError):
        odd_side("a", "a")


def test_messages_cross_the_wire() -> None:
    sent = (
        StreamData(3, b"\0" * 10), StreamEnd(3), StreamGone(3), StreamCredit(3, 7),
        StreamPull(3, 9), StreamWant(3, 5), StreamReady(3), StreamBulk(3, "10.0.0.1:5", b"k"),
    )  # fmt: skip
    for msg in sent:
        assert decode(encode(msg)) == msg
    assert set(STREAM_MESSAGES) == {type(m) for m in sent}


def test_sender_waits_for_the_opening_credit_which_sets_the_window() -> None:
    sender, receiver = pair()
    sender.open_sender(1)
    assert sender.sendable(1) == 0 and sender.info(1).state is State.WAITING
    assert receiver.open_receiver(1) == [StreamCredit(1, WINDOW)]
    sender.receive(StreamCredit(1, 100))
    assert sender.sendable(1) == 100 and sender.info(1).window == 100


def test_credit_that_arrives_before_the_sender_registers_is_kept() -> None:
    sender = StreamMux(odd=True)
    assert sender.receive(StreamCredit(2, 500)) is None
    sender.open_sender(2)
    assert sender.sendable(2) == 500


def test_early_messages_are_bounded() -> None:
    mux = StreamMux(odd=True)
    for stream in range(1, streams_module.MAX_EARLY + 1):
        mux.receive(StreamCredit(stream, 1))
    with pytest.raises(ProtocolError, match="unknown streams"):
        mux.receive(StreamCredit(streams_module.MAX_EARLY + 1, 1))
    mux.receive(StreamGone(1))
    with pytest.raises(ProtocolError, match="too many"):
        mux.receive(StreamGone(1))


def test_a_whole_stream_ends_and_both_sides_forget_it() -> None:
    sender, receiver, stream = opened()
    feed(receiver, sender.read(stream, b"x" * 600))
    assert sender.sendable(stream) == WINDOW - 600
    assert receiver.info(stream).buffered == 600
    assert receiver.written(stream, 200) == []  # below a quarter window: kept
    credit = receiver.written(stream, 400)
    assert credit == [StreamCredit(stream, 600)]
    feed(sender, credit)
    assert sender.sendable(stream) == WINDOW
    end = sender.local_eof(stream)
    assert end == [StreamEnd(stream)] and sender.info(stream).state is State.ENDED
    feed(receiver, end)
    assert receiver.info(stream).state is State.DRAINING
    gone = receiver.flushed(stream)
    assert gone == [StreamGone(stream)] and stream not in receiver
    feed(sender, gone)
    assert stream not in sender and len(sender) == len(receiver) == 0


def test_a_reader_going_away_stops_the_sender() -> None:
    sender, receiver, stream = opened()
    in_flight = sender.read(stream, b"y" * 100)
    gone = receiver.local_gone(stream)
    assert gone == [StreamGone(stream)] and receiver.info(stream).state is State.GONE
    feed(receiver, in_flight)  # was on the way: dropped, not buffered
    assert receiver.info(stream).buffered == 0
    assert receiver.written(stream, 0) == []
    feed(sender, gone)
    assert sender.info(stream).state is State.PEER_GONE and sender.sendable(stream) == 0
    assert sender.local_eof(stream) == []  # the end is the finish's to send
    end = sender.finish(stream)
    assert end == [StreamEnd(stream)] and stream not in sender
    feed(receiver, end)
    assert stream not in receiver


def test_epipe_while_draining_is_the_final_word() -> None:
    sender, receiver, stream = opened()
    feed(receiver, sender.read(stream, b"z"))
    feed(receiver, sender.local_eof(stream))
    assert receiver.local_gone(stream) == [StreamGone(stream)]
    assert stream not in receiver


def test_credit_sent_before_the_end_is_ignored_by_an_ended_sender() -> None:
    sender, receiver, stream = opened()
    feed(receiver, sender.read(stream, b"a" * WINDOW))
    credit = receiver.written(stream, WINDOW)
    end = sender.local_eof(stream)
    feed(sender, credit)
    feed(receiver, end)
    feed(sender, receiver.flushed(stream))
    assert len(sender) == len(receiver) == 0


@pytest.mark.parametrize(
    "msg, match",
    [
        (StreamData(1, b"x" * (WINDOW + 1)), "beyond credit"),
        (StreamData(9, b"x"), "unknown stream"),
        (StreamEnd(9), "unknown stream"),
        (StreamCredit(1, 1), "unexpected credit"),
    ],
)
def test_receiver_refuses_what_the_peer_may_not_send(msg: StreamMessage, match: str) -> None:
    receiver = StreamMux(odd=False, window=WINDOW)
    receiver.open_receiver(1)
    with pytest.raises(ProtocolError, match=match):
        receiver.receive(msg)


def test_sender_refuses_credit_above_the_window_and_data() -> None:
    sender, _, stream = opened()
    with pytest.raises(ProtocolError, match="overflow"):
        sender.receive(StreamCredit(stream, 1))
    with pytest.raises(ProtocolError, match="credit of 0"):
        sender.receive(StreamCredit(stream, 0))
    with pytest.raises(ProtocolError, match="unexpected data"):
        sender.receive(StreamData(stream, b"x"))
    with pytest.raises(ProtocolError, match="unexpected end"):
        sender.receive(StreamEnd(stream))


def test_credit_for_a_stream_we_receive_on_is_refused_at_registration() -> None:
    mux = StreamMux(odd=True)
    mux.receive(StreamCredit(4, 10))
    with pytest.raises(ProtocolError, match="ours to give"):
        mux.open_receiver(4)


def test_local_misuse_is_a_bug_not_a_protocol_error() -> None:
    sender, receiver, stream = opened()
    with pytest.raises(RuntimeError, match="beyond credit"):
        sender.read(stream, b"x" * (WINDOW + 1))
    with pytest.raises(RuntimeError, match="receive stream"):
        receiver.read(stream, b"x")
    with pytest.raises(RuntimeError, match="still held"):
        feed(receiver, sender.read(stream, b"x"))
        feed(receiver, sender.local_eof(stream))
        receiver.flushed(stream)
    with pytest.raises(ValueError, match="already open"):
        sender.open_sender(stream)
    with pytest.raises(KeyError):
        sender.info(99)


def test_every_peer_event_missing_from_the_table_is_a_protocol_error() -> None:
    messages: dict[Event, StreamMessage] = {
        Event.CREDIT: StreamCredit(1, 1),
        Event.DATA: StreamData(1, b""),
        Event.END: StreamEnd(1),
        Event.GONE: StreamGone(1),
        Event.PULL: StreamPull(1, 1),
        Event.WANT: StreamWant(1, 1),
        Event.READY: StreamReady(1),
    }
    for role in Role:
        for state in State:
            if state is State.CLOSED:
                continue
            for event, msg in messages.items():
                if (role, state, event) in TRANSITIONS:
                    continue
                mux = StreamMux(odd=True, window=WINDOW)
                if role is Role.SEND:
                    mux.open_sender(1)
                else:
                    mux.open_receiver(1)
                mux.info(1).state = state
                mux.info(1).credit = 10
                with pytest.raises(ProtocolError):
                    mux.receive(msg)


@pytest.mark.parametrize("seed", range(20))
def test_in_flight_never_exceeds_the_window_under_any_schedule(seed: int) -> None:
    """A random interleaving of reads, deliveries and writes, with a random window."""
    rng = random.Random(seed)
    window = rng.randint(1, 5000)
    sender, receiver = pair(window)
    stream = sender.allocate()
    sender.open_sender(stream)
    to_sender: list[StreamMessage] = list(receiver.open_receiver(stream))
    to_receiver: list[StreamMessage] = []
    total, sent, written = 50_000, 0, 0
    while stream in sender or stream in receiver:
        step = rng.random()
        if step < 0.3 and stream in sender and sender.info(stream).state is State.OPEN:
            n = min(sender.sendable(stream), total - sent, rng.randint(0, 3000))
            if sent == total:
                to_receiver += sender.local_eof(stream)
            elif n:
                to_receiver += sender.read(stream, b"d" * n)
                sent += n
            assert sender.info(stream).in_flight <= window
        elif step < 0.5 and to_receiver:
            receiver.receive(to_receiver.pop(0))
        elif step < 0.7 and to_sender:
            sender.receive(to_sender.pop(0))
        elif stream in receiver:
            info = receiver.info(stream)
            assert info.buffered <= window
            n = rng.randint(0, info.buffered)
            to_sender += receiver.written(stream, n)
            written += n
            if info.state is State.DRAINING and not info.buffered:
                to_sender += receiver.flushed(stream)
    assert written == sent == total


def test_a_mux_can_start_at_a_chosen_id_of_its_parity() -> None:
    from dunix.fdmove.streams import fresh_first

    assert StreamMux(odd=True, first=101).allocate() == 101
    with pytest.raises(ValueError):
        StreamMux(odd=True, first=100)
    firsts = {fresh_first(True) for _ in range(50)}
    assert all(f % 2 == 1 for f in firsts) and len(firsts) > 1
    assert all(f % 2 == 0 for f in (fresh_first(False) for _ in range(50)))


def test_a_new_hub_does_not_count_from_one_again() -> None:
    from dunix.fdmove import StreamHub

    async def send(msg: object) -> None:
        pass

    ids = {StreamHub(send, odd=True).allocate() for _ in range(20)}
    assert len(ids) == 20  # a hub made after a lost link would otherwise reuse stream 1


# -- pull mode: a read end held elsewhere is read only on demand ---------------------------


def pulled(window: int = WINDOW) -> tuple[StreamMux, StreamMux, int]:
    sender, receiver = pair(window)
    stream = sender.allocate()
    sender.open_sender(stream)
    opening = receiver.open_receiver(stream, pull=True)
    assert opening == [StreamPull(stream, window)]
    feed(sender, opening)
    return sender, receiver, stream


def test_a_pulled_sender_is_open_but_may_send_nothing() -> None:
    sender, receiver, s = pulled()
    assert sender.info(s).state is State.OPEN and sender.sendable(s) == 0
    assert not receiver.info(s).probing  # nothing waits at the sender: no looking
    with pytest.raises(RuntimeError):
        sender.read(s, b"x")


def test_data_waiting_is_said_once_until_the_next_grant() -> None:
    sender, receiver, s = pulled()
    ready = sender.ready(s)
    assert ready == [StreamReady(s)] and sender.ready(s) == []
    feed(receiver, ready)
    assert receiver.info(s).probing
    feed(sender, receiver.demand(s, 100))
    assert not receiver.info(s).probing
    assert sender.ready(s) == []  # it holds a want
    feed(receiver, sender.read(s, b"abc"))
    assert sender.ready(s) == [StreamReady(s)]


def test_a_want_is_one_read_of_at_most_its_size() -> None:
    sender, receiver, s = pulled()
    feed(receiver, sender.ready(s))
    assert receiver.demand(s, 10) == [StreamWant(s, 10)]
    feed(sender, [StreamWant(s, 10)])
    assert sender.sendable(s) == 10
    msgs = sender.read(s, b"abc")  # the read got 3 bytes: the want is spent
    assert sender.sendable(s) == 0
    feed(receiver, msgs)
    info = receiver.info(s)
    assert info.buffered == 3 and info.want == 0 and info.served == 0  # a small read
    assert receiver.written(s, 3) == []  # wants are not credit: nothing comes back


def test_a_want_is_capped_by_the_window_and_must_not_be_exceeded() -> None:
    sender, receiver, s = pulled(window=64)
    feed(receiver, sender.ready(s))
    assert receiver.demand(s, 1 << 20) == [StreamWant(s, 64)]
    with pytest.raises(ProtocolError):
        receiver.receive(StreamData(s, b"x" * 65))


def serve(sender: StreamMux, receiver: StreamMux, s: int, n: int) -> list[StreamMessage]:
    """The sender has data; a reader wants ``n``: what the receiver grants (the want
    served with ``n`` bytes)."""
    feed(receiver, sender.ready(s))
    grant = receiver.demand(s, n)
    feed(sender, grant)
    if isinstance(grant[0], StreamWant):
        feed(receiver, sender.read(s, b"x" * n))
        receiver.written(s, n)
    return grant


def test_a_steady_reader_of_big_reads_gets_credit() -> None:
    window = 64 * STREAM_MIN_READ
    sender, receiver, s = pulled(window)
    n = STREAM_MIN_READ
    for _ in range(STREAM_AFTER):
        assert serve(sender, receiver, s, n) == [StreamWant(s, n)]
    granted = 4 * n
    assert serve(sender, receiver, s, n) == [StreamCredit(s, granted)]
    assert sender.sendable(s) == granted
    feed(receiver, sender.read(s, b"y" * granted))
    assert receiver.written(s, granted) == [StreamCredit(s, granted)]  # credit comes back


def test_a_reader_of_small_reads_is_served_read_by_read_for_good() -> None:
    window = 64 * STREAM_MIN_READ
    sender, receiver, s = pulled(window)
    for n in [STREAM_MIN_READ] * (STREAM_AFTER - 1) + [1] + [STREAM_MIN_READ] * (STREAM_AFTER - 1):
        assert serve(sender, receiver, s, n) == [StreamWant(s, n)]
    assert serve(sender, receiver, s, 1) == [StreamWant(s, 1)]  # a shell's `read`: 1 byte


def test_an_end_needs_no_grant() -> None:
    sender, receiver, s = pulled()
    end = sender.local_eof(s)
    assert end == [StreamEnd(s)]
    feed(receiver, end)
    assert receiver.info(s).state is State.DRAINING
    feed(sender, receiver.flushed(s))
    assert s not in sender and s not in receiver


def test_the_peer_may_not_want_twice_or_without_pull() -> None:
    sender, _, s = pulled()
    sender.receive(StreamWant(s, 5))
    with pytest.raises(ProtocolError):
        sender.receive(StreamWant(s, 5))
    plain, _, t = opened()
    with pytest.raises(ProtocolError):
        plain.receive(StreamWant(t, 5))


def test_a_pull_opening_before_the_sender_registers_is_kept() -> None:
    sender, _ = pair()
    assert sender.receive(StreamPull(7, 50)) is None
    sender.open_sender(7)
    info = sender.info(7)
    assert info.state is State.OPEN and info.pull and info.window == 50
    assert sender.sendable(7) == 0 and info.in_flight == 0


# -- the hand-over to a native relay (dunix.fdmove.bulk) -----------------------------------


def test_a_handed_over_stream_ignores_credit_in_flight_and_ends_with_both_final_words() -> None:
    sender, receiver, s = opened()
    feed(receiver, sender.read(s, b"x" * 300))
    late = receiver.written(s, 300)  # credit on its way while the sender hands over
    assert sender.bulk(s, "10.0.0.1:7", b"key") == [StreamBulk(s, "10.0.0.1:7", b"key")]
    assert sender.sendable(s) == 0 and sender.info(s).state is State.BULK
    feed(sender, late)  # ignored
    feed(receiver, [StreamBulk(s, "10.0.0.1:7", b"key")])
    assert receiver.info(s).state is State.BULK
    assert receiver.written(s, 0) == []  # no credit after the hand-over
    # the receiver's relay exits first: its final word, then the sender's
    gone = receiver.local_gone(s)
    assert gone == [StreamGone(s)]
    feed(sender, gone)
    assert sender.info(s).state is State.PEER_GONE
    end = sender.finish(s)
    assert end == [StreamEnd(s)] and s not in sender
    feed(receiver, end)
    assert s not in receiver


def test_a_handed_over_sender_may_end_first() -> None:
    sender, receiver, s = opened()
    feed(receiver, sender.bulk(s, ":7", b"key"))
    end = sender.local_eof(s)
    assert end == [StreamEnd(s)] and sender.info(s).state is State.ENDED
    feed(receiver, end)
    assert receiver.info(s).state is State.DRAINING
    feed(sender, receiver.flushed(s))
    assert s not in sender and s not in receiver


def test_no_data_after_a_hand_over_and_none_for_a_pull_reader_served_read_by_read() -> None:
    sender, receiver, s = opened()
    feed(receiver, sender.bulk(s, ":7", b"key"))
    with pytest.raises(ProtocolError):
        receiver.receive(StreamData(s, b"late"))
    pulled, far = pair()
    p = pulled.allocate()
    pulled.open_sender(p)
    feed(pulled, far.open_receiver(p, pull=True))
    with pytest.raises(RuntimeError):
        pulled.bulk(p, ":7", b"key")
