"""The migration transition table: happy path, rollbacks, and properties over any events."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dunix.errors import MigrationFailed, ProtocolError
from dunix.migrate.lifecycle import (
    TERMINAL,
    TRANSITIONS,
    Action,
    Event,
    EventKind,
    Migration,
    State,
)

E = EventKind


def run(*kinds: EventKind) -> tuple[Migration, list[Action]]:
    m = Migration()
    out: list[Action] = []
    for kind in kinds:
        out += m.handle(Event(kind, pid=42 if kind is E.RESTORE_OK else None))
    return m, out


def test_happy_path_kills_the_source_only_at_restore_ok() -> None:
    m, actions = run(E.START, E.FREEZE_OK, E.DUMP_OK, E.TARGET_READY, E.SENT)
    assert m.state is State.RESTORING
    assert Action.KILL_SOURCE not in actions
    assert actions == [
        Action.START_DUMP,
        Action.PREPARE_TARGET,
        Action.SEND_IMAGES,
        Action.START_RESTORE,
    ]
    assert m.handle(Event(E.RESTORE_OK, pid=1234)) == (Action.KILL_SOURCE, Action.REPORT_MOVED)
    assert m.state is State.RUNNING_THERE and m.restored_pid == 1234
    m.handle(Event(E.SOURCE_KILLED))
    m.raise_for_outcome()


def test_restore_failure_resumes_the_source() -> None:
    m, _ = run(E.START, E.DUMP_OK, E.TARGET_READY, E.SENT)
    assert m.handle(Event(E.RESTORE_FAILED, "Can't fork for 77: File exists")) == (
        Action.ABORT_TARGET,
        Action.RESUME_SOURCE,
    )
    assert m.handle(Event(E.SOURCE_RESUMED)) == (Action.REPORT_FAILED,)
    assert m.state is State.RESUMED
    with pytest.raises(MigrationFailed, match="File exists"):
        m.raise_for_outcome()


def test_dump_failure_needs_no_resume_order() -> None:
    m, actions = run(E.START, E.DUMP_FAILED)
    assert m.state is State.RESUMED and actions == [Action.START_DUMP, Action.REPORT_FAILED]


def test_target_lost_while_freezing_refuses_post_dump() -> None:
    m, _ = run(E.START, E.TARGET_LOST)
    assert m.handle(Event(E.DUMP_OK)) == (Action.RESUME_SOURCE,)
    m.handle(Event(E.SOURCE_RESUMED))
    assert m.state is State.RESUMED and m.reason == "target lost"


def test_late_restore_ok_after_giving_up_aborts_the_target() -> None:
    m, _ = run(E.START, E.DUMP_OK, E.TARGET_READY, E.SENT, E.TIMEOUT)
    assert m.handle(Event(E.RESTORE_OK, pid=9)) == (Action.ABORT_TARGET,)
    assert m.restored_pid is None


def test_source_lost_loses_the_process() -> None:
    m, actions = run(E.START, E.DUMP_OK, E.TARGET_READY, E.SOURCE_LOST)
    assert m.state is State.LOST and Action.REPORT_LOST in actions
    with pytest.raises(MigrationFailed, match="lost"):
        m.raise_for_outcome()


def test_invalid_event_is_refused_and_changes_nothing() -> None:
    m = Migration()
    with pytest.raises(ProtocolError, match="restore_ok is not valid in state running"):
        m.handle(Event(E.RESTORE_OK))
    assert m.state is State.RUNNING and m.history == []


def test_kill_source_appears_in_exactly_one_row() -> None:
    rows = [key for key, (_, actions) in TRANSITIONS.items() if Action.KILL_SOURCE in actions]
    assert rows == [(State.RESTORING, E.RESTORE_OK)]


def test_terminal_states_have_no_way_out() -> None:
    for (state, _), (new, _) in TRANSITIONS.items():
        if state in TERMINAL:
            assert new is state


@given(st.lists(st.sampled_from(list(EventKind)), max_size=30))
def test_any_event_sequence_follows_the_table_or_is_refused(kinds: list[EventKind]) -> None:
    m = Migration()
    seen: list[Action] = []
    restore_ok_seen = False
    for kind in kinds:
        before = m.state
        expected = TRANSITIONS.get((before, kind))
        if expected is None:
            with pytest.raises(ProtocolError):
                m.handle(Event(kind))
            assert m.state is before
            continue
        actions = m.handle(Event(kind))
        assert (m.state, actions) == expected
        if kind is E.RESTORE_OK and before is State.RESTORING:
            restore_ok_seen = True
        if Action.KILL_SOURCE in actions:
            # never before the target confirmed, never after a resume was ordered
            assert restore_ok_seen
            assert Action.RESUME_SOURCE not in seen
        if Action.RESUME_SOURCE in actions:
            assert Action.KILL_SOURCE not in seen
        seen += actions
    assert seen.count(Action.KILL_SOURCE) <= 1
    if m.state is State.RUNNING_THERE:
        assert Action.KILL_SOURCE in seen
