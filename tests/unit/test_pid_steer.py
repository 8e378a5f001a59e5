"""The pid cursor is put back into the node's range only when a fork left it."""

from __future__ import annotations

from pathlib import Path

from dunix.pid.gpid import PidRange
from dunix.pid.steer import PidSteer

NODE = 5
SPAN = PidRange.for_node(NODE)


def steer(tmp_path: Path) -> tuple[PidSteer, Path]:
    cursor = tmp_path / "ns_last_pid"
    cursor.write_text("123")
    return PidSteer(cursor), cursor


def test_a_pid_outside_the_range_aims_the_cursor_at_its_start(tmp_path: Path) -> None:
    s, cursor = steer(tmp_path)
    s.forked(NODE, 400)
    assert cursor.read_text() == str(SPAN.first - 1)


def test_a_pid_inside_the_range_leaves_the_cursor_alone(tmp_path: Path) -> None:
    s, cursor = steer(tmp_path)
    for pid in (SPAN.first, SPAN.first + 1, SPAN.end - 2):
        s.forked(NODE, pid)
    assert cursor.read_text() == "123"


def test_the_last_pid_of_the_range_starts_a_new_lap(tmp_path: Path) -> None:
    s, cursor = steer(tmp_path)
    s.forked(NODE, SPAN.end - 1)  # the next fork would be SPAN.end: outside
    assert cursor.read_text() == str(SPAN.first - 1)


def test_a_refused_write_turns_steering_off_with_the_reason(tmp_path: Path) -> None:
    s = PidSteer(tmp_path / "missing" / "ns_last_pid")
    s.forked(NODE, 1)
    assert s.off is not None and "ns_last_pid" in s.off
    s.forked(NODE, 2)  # no second attempt, no exception
