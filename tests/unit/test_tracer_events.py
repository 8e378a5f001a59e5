"""dunix.agent.tracer: the tracer's packets as events, batches included (docs/run.md,
"Tracer protocol")."""

from __future__ import annotations

import os
import shutil
import socket
import sys

import pytest
import trio

from dunix.agent.tracer import (
    Done,
    Execed,
    Exited,
    Forked,
    JobContext,
    Started,
    Tracer,
    WarmTracer,
    WentRemote,
    parse_event,
    parse_events,
)
from dunix.errors import DunixError
from tests.unit.tracer_harness import build_native


def test_a_plain_packet_is_one_event() -> None:
    assert parse_events(b"fork\x0012\x0013") == [Forked(12, 13)]
    assert parse_event(b"remote\x0013\x00n2\x00/bin/true\x00") == WentRemote(13, "n2", "/bin/true")


def test_a_batch_holds_counted_messages_in_order_empty_fields_kept() -> None:
    data = b"\x00".join(
        [b"batch", b"3", b"fork", b"12", b"13", b"3", b"exec", b"13", b"", b"3", b"exit",
         b"13", b"0"]
    )  # fmt: skip
    assert parse_events(data) == [Forked(12, 13), Execed(13, ""), Exited(13, 0)]


@pytest.mark.parametrize(
    "data",
    [b"batch\x005\x00fork\x0012", b"batch\x00x\x00done", b"batch\x000", b"batch\x001\x00nope"],
)
def test_an_unreadable_batch_is_a_dunix_error(data: bytes) -> None:
    with pytest.raises(DunixError):
        parse_events(data)


def test_next_event_hands_out_a_batch_one_event_at_a_time() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    async def main() -> list[object]:
        tracer = Tracer(os.getpid(), ours)
        theirs.send(b"started\x0012")
        theirs.send(b"batch\x003\x00fork\x0012\x0013\x003\x00exit\x0013\x00256")
        theirs.send(b"exit\x0012\x000")
        theirs.send(b"done")
        theirs.close()
        got = []
        while (event := await tracer.next_event()) is not None:
            got.append(event)
        tracer.close()
        return got

    assert trio.run(main) == [Started(12), Forked(12, 13), Exited(13, 256), Exited(12, 0), Done()]


needs_root = pytest.mark.skipif(
    sys.platform != "linux" or os.geteuid() != 0 or shutil.which("cc") is None,
    reason="needs Linux, root and a C compiler (the tracer sets ids and seccomp)",
)


def _context(**env: str) -> JobContext:
    return JobContext(
        uid=os.getuid(), gid=os.getgid(), groups=(os.getgid(),), umask=0o022, cwd="/",
        env={"PATH": "/usr/bin:/bin", **env}, mode="local", extra=("--keep-pgrp",),
    )  # fmt: skip


async def _run_out(tracer: Tracer) -> list[object]:
    got = []
    while (event := await tracer.next_event()) is not None:
        got.append(event)
        if isinstance(event, Done):
            break
    await tracer.wait()
    tracer.close()
    return got


@needs_root
def test_a_warm_tracer_runs_the_job_it_is_handed_as_a_new_one_would() -> None:
    build_native()
    warm = WarmTracer()
    r, w = os.pipe()
    try:
        script = 'echo "$GREETING from $$ in $(pwd)" >&5; exit 3'
        tracer = Tracer.spawn(_context(GREETING="hello"), ["sh", "-c", script], {5: w}, warm=warm)
    finally:
        os.close(w)
    assert warm.used and tracer.pid == warm.pid
    events = trio.run(_run_out, tracer)
    with os.fdopen(r) as f:
        out = f.read()
    first = next(e for e in events if isinstance(e, Started)).pid
    assert out == f"hello from {first} in /\n"
    assert Exited(first, 3 << 8) in events and isinstance(events[-1], Done)


@needs_root
def test_a_job_with_its_own_tmp_gets_a_new_tracer_and_the_warm_one_waits() -> None:
    build_native()
    warm = WarmTracer()
    try:
        tracer = Tracer.spawn(_context(DUNIX_JOB_TMP="/nonexistent"), ["true"], {}, warm=warm)
        assert not warm.used and tracer.pid != warm.pid
        trio.run(_run_out, tracer)  # the wrapper fails to bind: its exit is all we need
        assert os.waitpid(warm.pid, os.WNOHANG) == (0, 0)  # still waiting for a job
    finally:
        warm.close()
    with pytest.raises(ChildProcessError):
        os.waitpid(warm.pid, os.WNOHANG)  # reaped by close()
