import os

import pytest

from dunix.errors import ConfigError
from dunix.storagefs.lookup import (
    Answer,
    Broadcast,
    Lookup,
    LookupConfig,
    LookupQuery,
    LookupReply,
    NameCreated,
    SendQuery,
    reply_for,
)
from dunix.wire import decode, encode

PEERS = {2, 3, 4}


def make() -> Lookup:
    return Lookup(1, LookupConfig(deadline=0.05, negative_ttl=1.0))


def start(lookup: Lookup, path: str = "a/b", now: float = 0.0, caller: int = 7) -> LookupQuery:
    (action,) = lookup.local_miss(caller, path, PEERS | {1}, now)
    assert isinstance(action, SendQuery)
    assert action.peers == frozenset(PEERS)  # never asks itself
    return action.query


def no(query: LookupQuery, node: int) -> LookupReply:
    return LookupReply(query.query_id, node, query.path, False)


def test_first_positive_reply_answers() -> None:
    lookup = make()
    query = start(lookup)
    assert lookup.peer_reply(no(query, 2), 0.01) == []
    found = LookupReply(query.query_id, 3, "a/b", True, 99, 0o100644, 5, 1)
    assert lookup.peer_reply(found, 0.02) == [Answer((7,), "a/b", found)]
    assert lookup.peer_reply(no(query, 4), 0.03) == []  # late: ignored
    assert lookup.next_deadline() is None


def test_all_negative_answers_and_caches() -> None:
    lookup = make()
    query = start(lookup)
    lookup.peer_reply(no(query, 2), 0.01)
    lookup.peer_reply(no(query, 3), 0.01)
    assert lookup.peer_reply(no(query, 4), 0.02) == [Answer((7,), "a/b", None)]
    # cached: answered at once, no query
    assert lookup.local_miss(8, "a/b", PEERS, 0.5) == [Answer((8,), "a/b", None)]
    # expired: asks again
    assert isinstance(lookup.local_miss(8, "a/b", PEERS, 1.1)[0], SendQuery)


def test_deadline_means_no_such_file() -> None:
    lookup = make()
    query = start(lookup, now=10.0)
    lookup.peer_reply(no(query, 2), 10.01)
    assert lookup.next_deadline() == pytest.approx(10.05)
    assert lookup.tick(10.04) == []
    assert lookup.tick(10.05) == [Answer((7,), "a/b", None)]
    assert lookup.peer_reply(no(query, 3), 10.06) == []


def test_callers_share_a_running_query() -> None:
    lookup = make()
    query = start(lookup, caller=1)
    assert lookup.local_miss(2, "a/b", PEERS, 0.01) == []
    assert lookup.tick(0.1) == [Answer((1, 2), "a/b", None)]
    assert query.query_id == 1


def test_creation_invalidates_cache() -> None:
    lookup = make()
    start(lookup)
    lookup.tick(0.1)
    assert lookup.cached_negatives() == 1
    assert lookup.name_created("a/b") == []
    assert lookup.cached_negatives() == 0
    assert isinstance(lookup.local_miss(7, "a/b", PEERS, 0.2)[0], SendQuery)


def test_creation_during_query_is_not_cached_as_negative() -> None:
    lookup = make()
    start(lookup)
    lookup.name_created("a/b")
    assert lookup.tick(0.1) == [Answer((7,), "a/b", None)]
    assert lookup.cached_negatives() == 0


def test_a_creation_is_told_to_the_peers_we_told_we_lack_it() -> None:
    lookup = make()
    assert lookup.created_here("v", 0.0) == []  # nobody asked us: nobody to tell
    # (re)started: what this agent told peers before is lost, so every peer hears of its
    # creations for as long as they may rely on an old answer
    lookup.started(0.0)
    assert lookup.created_here("w", 0.1) == [Broadcast(NameCreated(1, "w"))]
    assert lookup.created_here("w", 2.0) == [Broadcast(NameCreated(1, "w"))]
    t = 3.0
    assert lookup.created_here("x", t) == []  # nobody asked us: nobody to tell
    lookup.answered_missing(2, "x", "", t)
    lookup.answered_missing(3, "out/a.o", "out", t)  # 3 heard we lack "out"
    lookup.answered_missing(4, "y", "", t)
    assert lookup.created_here("x", t + 0.1) == [Broadcast(NameCreated(1, "x"), frozenset({2}))]
    assert lookup.created_here("x", t + 0.2) == []  # told already: it asks again if it wants
    want = [Broadcast(NameCreated(1, "out/b.o"), frozenset({3}))]
    assert lookup.created_here("out/b.o", t + 0.3) == want
    # a peer's reliance ends with its cache: negative_ttl, plus deadline and a margin
    assert lookup.created_here("y", t + 1.0 + 0.05 + 1.0 + 0.01) == []


def test_too_many_told_to_track_tells_everybody_for_a_while() -> None:
    lookup = Lookup(1, LookupConfig(deadline=0.05, negative_ttl=1.0, max_negative=2))
    for n, name in enumerate(("a", "b", "c")):
        lookup.answered_missing(2, name, "", 3.0 + n)
    assert lookup.created_here("z", 5.5) == [Broadcast(NameCreated(1, "z"))]  # every peer
    assert lookup.created_here("z", 12.0) == []


def test_a_cached_no_such_file_does_not_hold_for_a_peer_that_joined_since() -> None:
    lookup = make()
    query = start(lookup, "a/b")
    for peer in PEERS:
        lookup.peer_reply(no(query, peer), 0.01)
    assert lookup.local_miss(8, "a/b", PEERS, 0.1) == [Answer((8,), "a/b", None)]
    (ask,) = lookup.local_miss(8, "a/b", PEERS | {5}, 0.2)
    assert isinstance(ask, SendQuery) and ask.peers == PEERS | {5}


def test_names_found_missing_without_a_peer_are_asked_again_once_it_creates_there() -> None:
    lookup = make()
    query = start(lookup, "out/a.o")
    for peer in PEERS:
        lookup.peer_reply(lacks(query, peer, "out"), 0.01)
    assert lookup.local_miss(8, "out/b.o", PEERS, 0.1) == [Answer((8,), "out/b.o", None)]
    lookup.name_created("out/c.o", 2)  # 2 has "out" now: out/a.o and out/b.o may be there
    (ask,) = lookup.local_miss(8, "out/a.o", PEERS, 0.2)
    assert isinstance(ask, SendQuery) and ask.peers == {2}


def test_no_peers_means_no_such_file() -> None:
    lookup = make()
    assert lookup.local_miss(7, "a", [], 0.0) == [Answer((7,), "a", None)]
    assert lookup.local_miss(7, "a", [1], 0.0) == [Answer((7,), "a", None)]


def test_peer_gone_stops_waiting() -> None:
    lookup = make()
    query = start(lookup)
    lookup.peer_reply(no(query, 2), 0.0)
    lookup.peer_reply(no(query, 3), 0.0)
    assert lookup.peer_gone(4, 0.01) == [Answer((7,), "a/b", None)]


def test_unasked_and_mismatched_replies_ignored() -> None:
    lookup = make()
    query = start(lookup)
    assert lookup.peer_reply(LookupReply(query.query_id, 9, "a/b", True), 0.0) == []
    assert lookup.peer_reply(LookupReply(query.query_id, 2, "other", True), 0.0) == []
    assert lookup.peer_reply(LookupReply(999, 2, "a/b", True), 0.0) == []


def test_negative_cache_is_bounded() -> None:
    lookup = Lookup(1, LookupConfig(max_negative=2))
    for i, path in enumerate(["a", "b", "c"]):
        lookup.local_miss(i, path, PEERS, 0.0)
    lookup.tick(1.0)
    assert lookup.cached_negatives() == 2


def test_thousand_peers_one_query() -> None:
    lookup = make()
    peers = set(range(2, 1002))
    (send,) = lookup.local_miss(1, "x", peers, 0.0)
    assert isinstance(send, SendQuery) and len(send.peers) == 1000
    for peer in sorted(peers)[:-1]:
        assert lookup.peer_reply(no(send.query, peer), 0.001) == []
    assert lookup.peer_reply(no(send.query, 1001), 0.002) == [Answer((1,), "x", None)]


def test_messages_cross_the_wire() -> None:
    for msg in (
        LookupQuery(1, 2, "a/b"),
        LookupReply(1, 3, "a/b", True, 2**62, 0o100644, 10, 5),
        NameCreated(4, "c"),
    ):
        assert decode(encode(msg)) == msg


def test_reply_for() -> None:
    query = LookupQuery(5, 1, "f")
    assert reply_for(query, 2, None, 0) == LookupReply(5, 2, "f", False)
    st = os.stat("/")
    reply = reply_for(query, 2, st, 77)
    assert reply.found and reply.ino == 77 and reply.mode == st.st_mode


def test_bad_config() -> None:
    with pytest.raises(ConfigError):
        LookupConfig(deadline=0)


def lacks(query: LookupQuery, node: int, folder: str) -> LookupReply:
    return LookupReply(query.query_id, node, query.path, False, missing=folder)


def test_names_in_a_folder_a_peer_lacks_are_not_asked_of_it() -> None:
    lookup = make()
    query = start(lookup, "out/x/a.o")
    lookup.peer_reply(lacks(query, 2, "out"), 0.01)
    lookup.peer_reply(lacks(query, 3, "out/x"), 0.01)
    lookup.peer_reply(no(query, 4), 0.01)  # 4 has out/x
    (ask,) = lookup.local_miss(8, "out/x/b.o", PEERS, 0.1)
    assert isinstance(ask, SendQuery) and ask.peers == {4}
    lookup.peer_reply(lacks(ask.query, 4, "out/x"), 0.11)
    # nobody has out/x: a name there is answered at once, no message
    assert lookup.local_miss(9, "out/x/c.o", PEERS, 0.2) == [Answer((9,), "out/x/c.o", None)]
    # out itself and names beside it are still asked of those that have "out"
    (ask,) = lookup.local_miss(9, "out/y", PEERS, 0.2)
    assert isinstance(ask, SendQuery) and ask.peers == {3, 4}
    # trusted for negative_ttl only
    (ask,) = lookup.local_miss(9, "out/x/d.o", PEERS, 1.2)
    assert isinstance(ask, SendQuery) and ask.peers == frozenset(PEERS)


def test_a_peers_creation_below_a_folder_it_lacked_asks_it_again() -> None:
    lookup = make()
    query = start(lookup, "out/x/a.o")
    for peer in PEERS:
        lookup.peer_reply(lacks(query, peer, "out"), 0.01)
    assert lookup.absences(2) == ["out"]
    lookup.name_created("out/x/z.o", 2)  # 2 made out/x (its NameCreated)
    lookup.name_created("out/q", 1)  # this host's own creations change nothing here
    assert lookup.absences(2) == [] and lookup.absences(3) == ["out"]
    (ask,) = lookup.local_miss(8, "out/x/b.o", PEERS, 0.1)
    assert isinstance(ask, SendQuery) and ask.peers == {2}
    lookup.name_created("out", 3)  # the folder itself
    assert lookup.absences(3) == []
    lookup.peer_gone(4, 0.2)
    assert lookup.absences(4) == []


def test_an_answer_across_the_peers_creation_is_not_kept() -> None:
    """2 said it lacks "out" but announced a creation after the query went out (it may be
    "out"): not trusted; 3's answer is."""
    lookup = make()
    query = start(lookup, "out/a")
    lookup.name_created("out/b", 2)
    lookup.peer_reply(lacks(query, 2, "out"), 0.01)
    lookup.peer_reply(lacks(query, 3, "out"), 0.01)
    lookup.peer_reply(lacks(query, 4, "elsewhere"), 0.01)  # not above the name: ignored
    assert lookup.absences(2) == [] and lookup.absences(3) == ["out"]
    assert lookup.absences(4) == []


def test_missing_folder_is_the_shallowest_absent_one() -> None:
    from dunix.storagefs.lookup import missing_folder

    have = {"a", "a/b"}
    assert missing_folder("a/b/name", have.__contains__) == ""
    assert missing_folder("a/b/c/d/name", have.__contains__) == "a/b/c"
    assert missing_folder("x/y/name", have.__contains__) == "x"
    assert missing_folder("name", have.__contains__) == ""
    reply = lacks(LookupQuery(1, 2, "x/y"), 3, "x")
    assert decode(encode(reply)) == reply
