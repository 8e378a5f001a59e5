"""The life of one migration as a single transition table (sans-IO).

A ``Migration`` takes the events its driver observes (CRIU's notify callbacks and
responses, the target's answers, lost peers) and returns the actions the driver must
carry out next. It does no IO, keeps no clock and knows no sockets, so the same table
runs in the agent, in unit tests and in the many-node simulation.

The commit point is CRIU's ``post-dump`` notification (criu/cr-dump.c, cr_dump_finish):
there the source is frozen and its images are complete, and CRIU waits for our answer.
The driver holds that answer while the images travel and the target restores. Only
``restore_ok`` (the target's CRIU reported the restored tree running) produces
``KILL_SOURCE`` (answer success: CRIU kills the frozen source); every failure before it
produces ``RESUME_SOURCE`` (answer failure: CRIU thaws the source where it was). So a
process is never killed at the source before the target confirms it runs, and never runs
twice: a target that may still finish a restore after a failure gets ``ABORT_TARGET``.

    running ─start→ freezing ─dump_ok→ dumped ─target_ready→ sending ─sent→ restoring
        restoring ─restore_ok→ running_there            (source killed by CRIU)
        any failure → failed ─source_resumed→ resumed   (source thawed by CRIU)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from dunix.errors import MigrationFailed, ProtocolError


class State(enum.Enum):
    RUNNING = "running"  # at the source, nothing started yet
    FREEZING = "freezing"  # CRIU is seizing and dumping the source
    DUMPED = "dumped"  # source frozen, images complete; waiting for the target to accept
    SENDING = "sending"  # images travelling to the target
    RESTORING = "restoring"  # the target's CRIU is restoring
    RUNNING_THERE = "running-there"  # the target runs it; the source is killed (terminal)
    FAILED = "failed"  # given up; waiting for CRIU to confirm the source runs again
    RESUMED = "resumed"  # running where it was, as if nothing happened (terminal)
    LOST = "lost"  # the source died during the move: the process is gone (terminal)


class EventKind(enum.Enum):
    START = "start"
    FREEZE_OK = "freeze_ok"  # CRIU's query-ext-files notify: the tree is seized (frozen)
    DUMP_OK = "dump_ok"  # CRIU's post-dump notify: frozen, images written
    DUMP_FAILED = "dump_failed"  # CRIU's dump failed on its own (it thaws the source)
    TARGET_READY = "target_ready"  # the target accepted (pid free, CPU fits, space)
    TARGET_REFUSED = "target_refused"
    SENT = "sent"  # every image byte is at the target
    SEND_FAILED = "send_failed"
    RESTORE_OK = "restore_ok"  # the target's CRIU reports the restored tree running
    RESTORE_FAILED = "restore_failed"  # the target's CRIU failed (it cleans up itself)
    TARGET_LOST = "target_lost"  # the target host or link died
    SOURCE_LOST = "source_lost"  # the source host died, or the frozen process did
    TIMEOUT = "timeout"  # the driver's deadline for the current phase passed
    CANCEL = "cancel"  # the user or the balancer called it off
    SOURCE_RESUMED = "source_resumed"  # CRIU's dump response after a refused post-dump
    SOURCE_KILLED = "source_killed"  # CRIU's dump response after an accepted post-dump


class Action(enum.Enum):
    START_DUMP = "start_dump"  # run CRIU dump (not leave_running) with notify callbacks
    PREPARE_TARGET = "prepare_target"  # ask the target: pid free? CPU? make room
    SEND_IMAGES = "send_images"
    START_RESTORE = "start_restore"
    KILL_SOURCE = "kill_source"  # answer post-dump with success
    RESUME_SOURCE = "resume_source"  # answer post-dump with failure
    ABORT_TARGET = "abort_target"  # drop images; kill a restored tree if one appears
    REPORT_MOVED = "report_moved"
    REPORT_FAILED = "report_failed"  # MigrationFailed(reason); the process runs at home
    REPORT_LOST = "report_lost"  # the process is gone: its parent sees SIGKILL


@dataclass(frozen=True)
class Event:
    kind: EventKind
    #: why, for failures (CRIU's message, the target's refusal), shown to the user
    reason: str = ""
    #: the restored pid, with RESTORE_OK
    pid: int | None = None


S, E, A = State, EventKind, Action

#: (state, event) -> (next state, actions). Everything not listed is refused.
#: KILL_SOURCE appears in exactly one row: (RESTORING, RESTORE_OK).
TRANSITIONS: dict[tuple[State, EventKind], tuple[State, tuple[Action, ...]]] = {
    (S.RUNNING, E.START): (S.FREEZING, (A.START_DUMP,)),
    (S.RUNNING, E.CANCEL): (S.RESUMED, (A.REPORT_FAILED,)),
    # CRIU thaws the source itself when its dump fails before post-dump.
    (S.FREEZING, E.FREEZE_OK): (S.FREEZING, ()),
    (S.FREEZING, E.DUMP_OK): (S.DUMPED, (A.PREPARE_TARGET,)),
    (S.FREEZING, E.DUMP_FAILED): (S.RESUMED, (A.REPORT_FAILED,)),
    (S.FREEZING, E.SOURCE_LOST): (S.LOST, (A.REPORT_LOST,)),
    # Nothing is frozen for good yet: refuse post-dump when it comes (FAILED + DUMP_OK).
    (S.FREEZING, E.TARGET_LOST): (S.FAILED, ()),
    (S.FREEZING, E.TIMEOUT): (S.FAILED, ()),
    (S.FREEZING, E.CANCEL): (S.FAILED, ()),
    (S.DUMPED, E.TARGET_READY): (S.SENDING, (A.SEND_IMAGES,)),
    (S.DUMPED, E.TARGET_REFUSED): (S.FAILED, (A.RESUME_SOURCE,)),
    (S.DUMPED, E.TARGET_LOST): (S.FAILED, (A.RESUME_SOURCE,)),
    (S.DUMPED, E.TIMEOUT): (S.FAILED, (A.ABORT_TARGET, A.RESUME_SOURCE)),
    (S.DUMPED, E.CANCEL): (S.FAILED, (A.ABORT_TARGET, A.RESUME_SOURCE)),
    (S.DUMPED, E.SOURCE_LOST): (S.LOST, (A.ABORT_TARGET, A.REPORT_LOST)),
    (S.SENDING, E.SENT): (S.RESTORING, (A.START_RESTORE,)),
    (S.SENDING, E.SEND_FAILED): (S.FAILED, (A.ABORT_TARGET, A.RESUME_SOURCE)),
    (S.SENDING, E.TARGET_LOST): (S.FAILED, (A.RESUME_SOURCE,)),
    (S.SENDING, E.TIMEOUT): (S.FAILED, (A.ABORT_TARGET, A.RESUME_SOURCE)),
    (S.SENDING, E.CANCEL): (S.FAILED, (A.ABORT_TARGET, A.RESUME_SOURCE)),
    (S.SENDING, E.SOURCE_LOST): (S.LOST, (A.ABORT_TARGET, A.REPORT_LOST)),
    # The commit: the target confirmed the process runs there, so the source may die.
    (S.RESTORING, E.RESTORE_OK): (S.RUNNING_THERE, (A.KILL_SOURCE, A.REPORT_MOVED)),
    (S.RESTORING, E.RESTORE_FAILED): (S.FAILED, (A.ABORT_TARGET, A.RESUME_SOURCE)),
    (S.RESTORING, E.TARGET_LOST): (S.FAILED, (A.RESUME_SOURCE,)),
    # A restore may still finish after we gave up: the target must kill what appears.
    (S.RESTORING, E.TIMEOUT): (S.FAILED, (A.ABORT_TARGET, A.RESUME_SOURCE)),
    (S.RESTORING, E.CANCEL): (S.FAILED, (A.ABORT_TARGET, A.RESUME_SOURCE)),
    (S.RESTORING, E.SOURCE_LOST): (S.LOST, (A.ABORT_TARGET, A.REPORT_LOST)),
    (S.RUNNING_THERE, E.SOURCE_KILLED): (S.RUNNING_THERE, ()),
    # The source host died after the commit: the copy that matters runs at the target.
    (S.RUNNING_THERE, E.SOURCE_LOST): (S.RUNNING_THERE, ()),
    (S.FAILED, E.FREEZE_OK): (S.FAILED, ()),
    (S.FAILED, E.DUMP_OK): (S.FAILED, (A.RESUME_SOURCE,)),
    (S.FAILED, E.DUMP_FAILED): (S.RESUMED, (A.REPORT_FAILED,)),
    (S.FAILED, E.SOURCE_RESUMED): (S.RESUMED, (A.REPORT_FAILED,)),
    (S.FAILED, E.SOURCE_LOST): (S.LOST, (A.REPORT_LOST,)),
    # Late news from a target we already gave up on changes nothing.
    (S.FAILED, E.TARGET_LOST): (S.FAILED, ()),
    (S.FAILED, E.TARGET_READY): (S.FAILED, (A.ABORT_TARGET,)),
    (S.FAILED, E.SENT): (S.FAILED, (A.ABORT_TARGET,)),
    (S.FAILED, E.RESTORE_OK): (S.FAILED, (A.ABORT_TARGET,)),
    (S.FAILED, E.RESTORE_FAILED): (S.FAILED, ()),
    (S.FAILED, E.TIMEOUT): (S.FAILED, ()),
    (S.FAILED, E.CANCEL): (S.FAILED, ()),
}

TERMINAL: frozenset[State] = frozenset({S.RUNNING_THERE, S.RESUMED, S.LOST})

_FAILURES = frozenset(
    {
        E.DUMP_FAILED,
        E.TARGET_REFUSED,
        E.SEND_FAILED,
        E.RESTORE_FAILED,
        E.TARGET_LOST,
        E.SOURCE_LOST,
        E.TIMEOUT,
        E.CANCEL,
    }
)


class Migration:
    """One move of one process, from the source's point of view.

    ``handle`` returns the actions for an event, or raises ``ProtocolError`` for an event
    the table does not allow in the current state (the state is then unchanged).
    """

    def __init__(self) -> None:
        self.state = State.RUNNING
        #: the first failure's reason; what the user is told
        self.reason: str | None = None
        #: the pid the target reported, once RESTORE_OK arrived
        self.restored_pid: int | None = None
        self.history: list[tuple[State, EventKind, State]] = []

    def handle(self, event: Event) -> tuple[Action, ...]:
        try:
            new, actions = TRANSITIONS[(self.state, event.kind)]
        except KeyError:
            raise ProtocolError(
                f"migration: event {event.kind.value} is not valid in state {self.state.value}"
            ) from None
        if event.kind in _FAILURES and self.reason is None:
            self.reason = event.reason or event.kind.value.replace("_", " ")
        if event.kind is E.RESTORE_OK and self.state is S.RESTORING:
            self.restored_pid = event.pid
        self.history.append((self.state, event.kind, new))
        self.state = new
        return actions

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    def raise_for_outcome(self) -> None:
        """Raise ``MigrationFailed`` unless the process now runs at the target."""
        if self.state is S.RUNNING_THERE:
            return
        if self.state is S.LOST:
            raise MigrationFailed(f"the process was lost with its source: {self.reason}")
        if self.state is S.RESUMED:
            raise MigrationFailed(f"not moved, still running where it was: {self.reason}")
        raise MigrationFailed(f"migration not finished (state {self.state.value})")
