"""Serving one `dunix run` request on the control socket.

The client is a local process (the kernel vouches for its uid and gid); its stdio comes
over the same socket by SCM_RIGHTS right after ``RunAccepted``, so the job's first process
writes to the caller's own terminal or pipes. Signals the client receives arrive as
``RunSignal`` and go to the job's process group, as a terminal's Ctrl-C would; a client
that goes away takes the job with it. When the caller's fd 0 is a terminal, the job gets
a pty of its own relayed to it (see ``dunix.agent.pty``); the first process stopping
(Ctrl-Z) is sent as ``RunStopped`` so `dunix run` stops too, and its SIGCONT continues
the job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
from collections.abc import Callable

import trio

from dunix.agent.jobs import Job, JobService, user_groups
from dunix.agent.pty import JobTerminal, same_terminal
from dunix.agent.storage import JOB_TMP_ENV
from dunix.agent.tracer import Started, Stopped, Tracer
from dunix.errors import AccessDenied, ConfigError, DunixError, ProtocolError
from dunix.wire import Channel
from dunix.wire.jobs import (
    RunAccepted,
    RunExited,
    RunRequest,
    RunSignal,
    RunStarted,
    RunStopped,
)

log = logging.getLogger("dunix.agent.run")

MAX_FDS = 64


async def receive_fds(channel: Channel, count: int) -> list[int]:
    """The fds the client sends as SCM_RIGHTS on one byte, right after RunAccepted."""
    stream = channel.stream
    if not isinstance(stream, trio.SocketStream):
        raise ProtocolError("file descriptors can only come over the local control socket")
    sock = stream.socket
    # close-on-exec: else every tracer (and so the job's first process) would inherit
    # the client's fds at whatever numbers they got here, besides its 0, 1, 2
    data, ancdata, _, _ = await sock.recvmsg(
        1, socket.CMSG_SPACE(count * 4), socket.MSG_CMSG_CLOEXEC
    )
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
    job_tmp = await jobs.agent.storage.job_tmp(job.id, ctx.env, ctx.cwd)  # one /tmp
    if job_tmp is not None:
        ctx = dataclasses.replace(ctx, env={**ctx.env, JOB_TMP_ENV: job_tmp})
    await channel.send(RunAccepted(job.id))
    fds = await receive_fds(channel, req.nfds)
    terminal: JobTerminal | None = None
    try:
        child_fds = dict(enumerate(fds))
        if fds and os.isatty(fds[0]):
            terminal = JobTerminal(fds[0])
            for n, fd in enumerate(fds):
                if same_terminal(fds[0], fd):
                    child_fds[n] = terminal.slave
            ctx = dataclasses.replace(ctx, extra=(*ctx.extra, "--ctty", "0"))
        tracer = jobs.start(job, ctx, list(req.argv), child_fds)
    except BaseException:
        if terminal is not None:
            terminal.close()
        raise
    finally:
        for fd in fds:
            os.close(fd)
        if terminal is not None:
            terminal.slave_given()
    slots = jobs.agent.slot_table(mode)
    await tracer.push_slots(slots)
    if mode == "auto":
        await tracer.push_spill(*jobs.agent.spill_table(slots))
    log.info("job %s for uid %d: %s", job.id, uid, " ".join(req.argv))
    try:
        async with trio.open_nursery() as nursery:
            started = trio.Event()  # the program started, or never will (its tracer ended)

            def on_started(event: Started) -> None:
                started.set()

            jobs.on_started[job.id] = on_started
            if terminal is not None:
                jobs.on_first_stopped[job.id] = _stopper(terminal, channel, nursery)
                nursery.start_soon(terminal.run)
            nursery.start_soon(_follow_home, jobs, job, tracer, req.argv[0], started)
            nursery.start_soon(_client_signals, jobs, job, channel, nursery.cancel_scope, terminal)
            with trio.move_on_after(30):
                await started.wait()
            if started.is_set() and job.first_pid:
                await channel.send(RunStarted(job.id, jobs.gpid(job.first_pid), jobs.name))
            await job.finished.wait()
            if terminal is not None:
                await terminal.drained()
            status = job.status if job.status is not None else 0x7F00 | signal.SIGKILL
            await channel.send(RunExited(status))
            jobs.kill_job(job)  # an exited job leaves nothing behind
            nursery.cancel_scope.cancel()
    finally:
        jobs.on_started.pop(job.id, None)
        jobs.on_first_stopped.pop(job.id, None)
        if terminal is not None:
            terminal.close()
        jobs.kill_job(job)
        jobs.forget(job)
        await jobs.agent.storage.drop_job_tmp(job_tmp)
        log.info("job %s ended with status %s", job.id, job.status)


async def _follow_home(
    jobs: JobService, job: Job, tracer: Tracer, argv0: str, started: trio.Event
) -> None:
    """Follow the job's home tracer; a tracer that ended without its first process's status
    (it could not start, or died) ends the job: nothing is left to wait for."""
    await jobs.follow(job, tracer, argv0)
    if job.status is None:
        log.warning("job %s: its tracer ended without the program's status", job.id)
        job.status = 127 << 8  # what a shell reports for a program it could not run
        job.finished.set()
        started.set()


def _stopper(
    terminal: JobTerminal, channel: Channel, nursery: trio.Nursery
) -> Callable[[Stopped], None]:
    """What to do when the job's first process stops: leave the caller's terminal to its
    shell and tell the client, which stops itself (a shell then shows `dunix run` stopped)."""

    def stopped(event: Stopped) -> None:
        terminal.pause()

        async def tell() -> None:
            with contextlib.suppress(DunixError):
                await channel.send(RunStopped(event.signal))

        nursery.start_soon(tell)

    return stopped


async def _client_signals(
    jobs: JobService,
    job: Job,
    channel: Channel,
    cancel: trio.CancelScope,
    terminal: JobTerminal | None = None,
) -> None:
    """Forward the client's signals to the job; a client that hangs up ends the job."""
    try:
        async for msg in channel:
            if not isinstance(msg, RunSignal) or not job.first_pid:
                continue
            if terminal is not None and msg.signal == signal.SIGWINCH:
                terminal.resize()  # the kernel signals the job's foreground group
                continue
            if terminal is not None and msg.signal == signal.SIGCONT:
                terminal.resume()
            jobs.agent.remote.signal_group(job, msg.signal)
            if msg.signal == signal.SIGCONT:  # deputies stopped with their guests go on too
                for proc in jobs.of(job):
                    if proc.state == "deputy":
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(proc.pid, signal.SIGCONT)
    except DunixError:
        pass
    if job.status is None:
        log.info("client of job %s went away: ending the job", job.id)
        jobs.kill_job(job)
        job.status = 0x7F00 | signal.SIGKILL  # not a real status; the client is gone anyway
        job.finished.set()
        cancel.cancel()
