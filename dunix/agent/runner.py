"""Serving one `dunix run` request on the control socket.

The client is a local process (the kernel vouches for its uid and gid); its stdio comes
over the same socket by SCM_RIGHTS right after ``RunAccepted``, so the job's first process
writes to the caller's own terminal or pipes. Signals the client receives arrive as
``RunSignal`` and go to the job's process group, as a terminal's Ctrl-C would; a client
that goes away takes the job with it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from typing import TYPE_CHECKING

import trio

from dunix.agent.jobs import Job, JobService, user_groups
from dunix.agent.tracer import Started
from dunix.errors import AccessDenied, ConfigError, DunixError, ProtocolError
from dunix.wire import Channel
from dunix.wire.jobs import RunAccepted, RunExited, RunRequest, RunSignal, RunStarted

if TYPE_CHECKING:
    pass

log = logging.getLogger("dunix.agent.run")

MAX_FDS = 64


async def receive_fds(channel: Channel, count: int) -> list[int]:
    """The fds the client sends as SCM_RIGHTS on one byte, right after RunAccepted."""
    stream = channel.stream
    if not isinstance(stream, trio.SocketStream):
        raise ProtocolError("file descriptors can only come over the local control socket")
    sock = stream.socket
    data, ancdata, _, _ = await sock.recvmsg(1, socket.CMSG_SPACE(count * 4))
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds += [int.from_bytes(payload[i : i + 4], "little") for i in range(0, usable, 4)]
    if not data or len(fds) != count:
        for fd in fds:
            os.close(fd)
        raise ProtocolError(f"expected {count} file descriptors, got {len(fds)}")
    return fds


async def serve_run(jobs: JobService, channel: Channel, req: RunRequest) -> None:
    cred = channel.peer_cred
    if cred is None:
        raise AccessDenied("`dunix run` needs the local control socket (the caller's uid)")
    if not req.argv:
        raise DunixError("nothing to run")
    if not 0 <= req.nfds <= MAX_FDS:
        raise ProtocolError(f"{req.nfds} fds is outside 0..{MAX_FDS}")
    if not os.path.isdir(req.cwd):
        raise ConfigError(
            f"the working directory {req.cwd} does not exist on {jobs.name} "
            "(each host has its own /tmp): run from a folder every host sees"
        )
    uid, gid = cred.uid, cred.gid
    groups = tuple(req.groups) if uid == 0 else user_groups(uid, gid)
    mode = req.mode or jobs.default_mode
    ctx = jobs.context_for(uid, gid, groups, req.cwd, req.umask, dict(req.env), mode)
    job = Job(jobs.new_job_id(), uid, gid, groups, mode)
    await channel.send(RunAccepted(job.id))
    fds = await receive_fds(channel, req.nfds)
    try:
        tracer = jobs.start(job, ctx, list(req.argv), dict(enumerate(fds)))
    finally:
        for fd in fds:
            os.close(fd)
    await tracer.push_slots(jobs.agent.slot_table(mode))
    log.info("job %s for uid %d: %s", job.id, uid, " ".join(req.argv))
    try:
        async with trio.open_nursery() as nursery:
            started = trio.Event()

            def on_started(event: Started) -> None:
                started.set()

            jobs.on_started[job.id] = on_started
            nursery.start_soon(jobs.follow, job, tracer, req.argv[0])
            nursery.start_soon(_client_signals, jobs, job, channel, nursery.cancel_scope)
            with trio.move_on_after(30):
                await started.wait()
            if started.is_set():
                await channel.send(RunStarted(job.id, jobs.gpid(job.first_pid), jobs.name))
            await job.finished.wait()
            status = job.status if job.status is not None else 0x7F00 | signal.SIGKILL
            await channel.send(RunExited(status))
            jobs.kill_job(job)  # an exited job leaves nothing behind
            nursery.cancel_scope.cancel()
    finally:
        jobs.on_started.pop(job.id, None)
        jobs.kill_job(job)
        jobs.forget(job)
        log.info("job %s ended with status %s", job.id, job.status)


async def _client_signals(
    jobs: JobService, job: Job, channel: Channel, cancel: trio.CancelScope
) -> None:
    """Forward the client's signals to the job; a client that hangs up ends the job."""
    try:
        async for msg in channel:
            if isinstance(msg, RunSignal) and job.first_pid:
                jobs.agent.remote.signal_group(job, msg.signal)
    except DunixError:
        pass
    if job.status is None:
        log.info("client of job %s went away: ending the job", job.id)
        jobs.kill_job(job)
        job.status = 0x7F00 | signal.SIGKILL  # not a real status; the client is gone anyway
        job.finished.set()
        cancel.cancel()
