"""trio relays between local fds and the streams of one peer link.

A :class:`StreamHub` serves one agent-to-agent channel. For every relayed fd the agent
opens a :class:`StreamEndpoint`: a *sender* reads its fd and sends ``StreamData``, a
*receiver* writes what arrives into its fd. The hub sends through the callable it was
given and is fed the peer's messages through :meth:`StreamHub.deliver`, which never
blocks (flow control bounds what a stream can hold to its window), so one slow reader
never stalls the channel for the others.

The endpoint owns its fd and closes it at the moment the far side's process must notice:
a sender when its fd reached EOF or the far reader went away (then the local writer's
next write fails with EPIPE/SIGPIPE), a receiver once it has written everything before the
far end (the local reader sees EOF) or when its write failed with EPIPE. The agent
ignores SIGPIPE (Python's default), so a failed write is an ``EPIPE`` error, never a
signal.

Pull mode (``open_receiver(..., pull=demand)``, for a pipe's read end held by a process
elsewhere): the receiver asks ``demand((st_dev, st_ino))`` how much a reader blocked on
its pipe wants (dunix.fdmove.inventory.blocked_readers) once the sender said it has data
waiting, looking again after 0.5, 1, 2 ... up to ``PROBE_MAX`` seconds, and the sender
reads only what is wanted (see dunix.fdmove.streams). A sender waiting for its fd with a
grant is itself such a reader of that pipe: it is counted too (a process that went on to
a third host reads through it). Readiness travels the other way: while a pull receiver
of this agent has data waiting upstream for a pipe, a pulled sender of the same pipe that
waits idle says ``StreamReady`` to its own peer, so that peer looks for its readers (a
chain home -> n2 -> n3, where the pipe on n2 stays empty until someone two hops away
asks for data).

The fd's open file description may be shared with other processes (the home side's
duplicates from ``pidfd_getfd``). Setting ``O_NONBLOCK`` on a shared description would
change it for them too (a user's terminal left non-blocking), so with ``shared=True`` a
pipe, FIFO or tty is reopened through ``/proc/self/fd/N``, which gives a new description
of the same pipe or device (proc(5)), and sockets are used with ``MSG_DONTWAIT``.

A hub given a ``BulkRelay`` hands a pipe's stream that has carried ``BulkRelay.after``
bytes to the native relay (``dunix.fdmove.bulk``): the endpoint then only waits for its
relay process, keeping its own copy of the fd until it exits.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import errno
import fcntl
import logging
import os
import select
import signal
import socket
import stat
import struct
import termios
from collections.abc import Awaitable, Callable, Iterable, Iterator

import trio

from dunix.errors import DunixError
from dunix.fdmove import bulk as _bulk
from dunix.fdmove.bulk import BulkRelay
from dunix.fdmove.streams import (
    DEFAULT_WINDOW,
    STREAM_MESSAGES,
    State,
    StreamBulk,
    StreamData,
    StreamMessage,
    StreamMux,
    fresh_first,
)

log = logging.getLogger("dunix.fdmove")

#: largest read from a local fd, and so the largest StreamData payload. Each frame costs
#: fixed Python work in both agents (trio's TLS send and receive loops): on 0.5-CPU hosts
#: 1 MiB frames carried a cross-host pipe at ~300 MB/s against ~210 with 256 KiB (agent
#: CPU per 256 MiB ~400 ms against ~600); 2 MiB gained nothing more. One frame holds up
#: the shared channel (a terminal's keys) that long: ~3 ms.
DEFAULT_CHUNK = 1024 * 1024
#: pipe buffer asked for with F_SETPIPE_SZ (the default 64 KiB costs a wakeup per 64 KiB)
PIPE_SIZE = 1024 * 1024

#: pull mode: the longest pause between two looks for a blocked reader
PROBE_MAX = 0.05
PROBE_FIRST = 0.0005
#: a handed-over sender whose receiver said it is gone: how long its relay may take to
#: notice by itself before it is killed (it never got a connection, say)
RELAY_GRACE = 1.0
#: a handed-over sender ended with ``end()``: how long its relay may take to deliver what
#: it read (its receiver's reader may be slow) before it is killed
END_GRACE = 10.0

Send = Callable[[StreamMessage], Awaitable[None]]
#: pull mode: bytes wanted by readers blocked on the pipe ``(st_dev, st_ino)``
Demand = Callable[[tuple[int, int]], int]

#: senders waiting for their fd with a grant, per pipe (st_dev, st_ino): bytes wanted
_waiting_senders: dict[tuple[int, int], list[int]] = {}


#: pulled senders waiting idle (no grant, empty pipe), per pipe: told when data waits upstream
_idle_pulled: dict[tuple[int, int], set[StreamEndpoint]] = {}


def _data_upstream(key: tuple[int, int]) -> None:
    """A pull receiver of the pipe ``key`` has data waiting at its peer: wake the idle
    pulled senders of that pipe so that each says so to its own peer."""
    for endpoint in _idle_pulled.get(key, ()):
        if not endpoint._upstream and not endpoint.hub.mux.info(endpoint.stream).ready:
            endpoint._upstream = True
            endpoint._poke(cancel_io=True)


def waiting_senders(key: tuple[int, int]) -> int:
    """The largest grant a sender of this agent waits to fill from the pipe ``key``."""
    return max(_waiting_senders.get(key, ()), default=0)


_BROKEN = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN)


class Outcome(enum.Enum):
    EOF = "eof"  # sender: its fd reached EOF and the end went out; receiver: all written
    PEER_GONE = "peer-gone"  # sender: the far reader went away; the fd is closed
    BROKEN = "broken"  # receiver: its local reader went away (EPIPE)
    STOPPED = "stopped"  # the agent stopped the endpoint
    LOST = "lost"  # the link to the peer failed; the fd is closed, nothing more was said


class _LocalFd:
    """Non-blocking reads and writes on one fd, without changing a shared description."""

    def __init__(self, fd: int, *, writing: bool, shared: bool) -> None:
        self.sock: socket.socket | None = None
        self.refused = False  # a FIFO write end whose reader is already gone
        self.shared = shared
        mode = os.fstat(fd).st_mode
        if stat.S_ISSOCK(mode):
            self.sock = socket.socket(fileno=fd)
        elif shared and (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
            fd = self._reopen(fd, writing)
        elif not stat.S_ISREG(mode):  # a regular file's writes block: see write_file
            os.set_blocking(fd, False)
        self.fd = fd
        self.regular = stat.S_ISREG(mode)
        self.key = (-1, -1)
        self.fifo = stat.S_ISFIFO(mode)
        if self.fifo and fd >= 0:
            st = os.fstat(fd)
            self.key = (st.st_dev, st.st_ino)
            with contextlib.suppress(OSError):  # capped by fs.pipe-max-size; best effort
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)

    def _reopen(self, fd: int, writing: bool) -> int:
        flags = (os.O_WRONLY if writing else os.O_RDONLY) | os.O_NONBLOCK | os.O_NOCTTY
        try:
            new = os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: a FIFO opened for writing has no reader
                os.close(fd)
                raise
            self.refused = True
            log.info("fd %d: reopening for writing found no reader (ENXIO)", fd)
            new = -1
        os.close(fd)
        return new

    def queued(self) -> int:
        """Bytes in the pipe (FIONREAD), 0 when it cannot tell."""
        try:
            raw = fcntl.ioctl(self.fd, termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return 0
        return int(struct.unpack("i", raw)[0])

    def at_eof(self) -> bool:
        """A pipe with no writers and nothing left: a read would return EOF. Readable
        alone is not enough: another reader may have taken the data since."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        events = poller.poll(0)
        hangup = bool(events and events[0][1] & (select.POLLHUP | select.POLLERR))
        return hangup and not self.queued()

    def read(self, size: int) -> bytes | None:
        """Up to ``size`` bytes; ``b""`` at EOF, None if nothing is ready."""
        try:
            if self.sock is not None:
                return self.sock.recv(size, socket.MSG_DONTWAIT)
            return os.read(self.fd, size)
        except BlockingIOError:
            return None
        except OSError as exc:  # EIO: a tty hung up; ECONNRESET: a socket peer died
            log.info("reading fd %d: %s; taken as EOF", self.fd, exc)
            return b""

    def write(self, data: memoryview) -> int | None:
        """Bytes written (maybe fewer than given); None if the fd is full.

        Raises ``BrokenPipeError`` (and its socket cousins) when the reader is gone.
        """
        try:
            if self.sock is not None:
                return self.sock.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            return os.write(self.fd, data)
        except BlockingIOError:
            return None

    async def write_file(self, data: memoryview) -> int:
        """Write into a regular file, in a thread: the file may be on /dunix/fs, which
        this agent serves (a write from its own loop could wait for itself), and epoll
        cannot wait for a regular file anyway."""
        return await trio.to_thread.run_sync(os.write, self.fd, data)

    async def wait_readable(self) -> None:
        await trio.lowlevel.wait_readable(self.sock if self.sock is not None else self.fd)

    async def wait_writable(self) -> None:
        await trio.lowlevel.wait_writable(self.sock if self.sock is not None else self.fd)

    def hangup_poller(self) -> select.epoll | None:
        """An epoll instance watching the fd for an error or hang-up, None if it cannot.

        It reports a pipe whose last reader went away (``pipe_poll`` sets EPOLLERR without
        readers, fs/pipe.c) or a socket shut down. trio only waits for readable or
        writable, and an idle pipe is always writable, so the epoll instance, which turns
        readable when the fd has an event (epoll(7)), is what trio waits on. EPOLLERR and
        EPOLLHUP need no request (events 0).
        """
        poller = select.epoll()
        try:
            poller.register(self.sock.fileno() if self.sock is not None else self.fd, 0)
        except OSError:  # EPERM: a regular file; it has no reader to lose
            poller.close()
            return None
        return poller

    def shutdown(self, how: int) -> None:
        """Say EOF (or refuse more data) on a socket that other fds of ours also hold."""
        if self.sock is not None and not self.shared:
            with contextlib.suppress(OSError):
                self.sock.shutdown(how)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        elif self.fd >= 0:
            os.close(self.fd)
        self.fd = -1


class StreamEndpoint:
    """One local fd relayed as one stream; created by :class:`StreamHub`.

    ``finished`` is set once the endpoint is done with its fd (closed) and has said what
    it had to say; ``outcome`` then says how it ended.
    """

    def __init__(self, hub: StreamHub, stream: int, io: _LocalFd, *, sending: bool) -> None:
        self.hub = hub
        self.stream = stream
        self.sending = sending
        self.outcome: Outcome | None = None
        self.finished = trio.Event()
        self._io = io
        self._chunks: collections.deque[memoryview] = collections.deque()
        self._changed = trio.Event()
        self._io_scope: trio.CancelScope | None = None
        self._stopping = False
        self._hangup = False  # receiver: the local reader went away
        self._lost = False
        self._opening: list[StreamMessage] = []  # a receiver's opening credit
        self._demand: Demand | None = None  # a pull-mode receiver's look at its readers
        self._idle = False  # a pulled sender waits for data or a grant, whichever is first
        self._upstream = False  # idle pulled sender: a pull receiver of its pipe has data
        self._handover: StreamBulk | None = None  # receiver: the sender's StreamBulk
        self._ending = False  # stopped by end(): a native relay finishes, not killed

    def __repr__(self) -> str:
        kind = "sender" if self.sending else "receiver"
        return f"<StreamEndpoint {kind} {self.stream} fd {self._io.fd} {self.outcome}>"

    async def wait(self) -> Outcome:
        """Wait until the endpoint is done with its fd; how it ended."""
        await self.finished.wait()
        assert self.outcome is not None
        return self.outcome

    @property
    def running(self) -> bool:
        """True until the endpoint is done with its fd."""
        return not self.finished.is_set() and (self._io.sock is not None or self._io.fd >= 0)

    def duplicate(self) -> int:
        """A close-on-exec duplicate of the local fd, e.g. to relay it again elsewhere once
        this endpoint has ended (a migrated process's stream, dunix/agent/migration.py)."""
        fd = self._io.sock.fileno() if self._io.sock is not None else self._io.fd
        if fd < 0:  # closed already: the endpoint is ending
            raise OSError(errno.EBADF, f"stream {self.stream}: its fd is closed")
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0)

    def stop(self) -> None:
        """Stop relaying: a sender closes its fd and ends the stream, a receiver drops
        what it holds, closes its fd and tells the sender it is gone."""
        self._stopping = True
        self._poke(cancel_io=True)

    def take_opening(self) -> list[StreamMessage]:
        """A new receiver's opening (its window as credit, or its pull), for the caller
        to send itself with the message that names the stream (a remote exec's
        ``RemoteExec`` and its credits in one write); only right after opening it,
        before its task ran."""
        opening, self._opening = self._opening, []
        return opening

    def end(self) -> None:
        """Stop a sender so that all it read from its fd still arrives (a native relay
        sends what it holds and ends its stream; ``stop`` kills it), so the receiver's
        side can hand those bytes on (a moved reader, dunix/agent/migration.py); a
        receiver stops as with ``stop``."""
        self._ending = True
        self.stop()

    # -- called by the hub -------------------------------------------------------------

    def _poke(self, *, cancel_io: bool = False) -> None:
        self._changed.set()
        if cancel_io and self._io_scope is not None:
            self._io_scope.cancel()

    def _lose(self) -> None:
        self._lost = True
        self._poke(cancel_io=True)

    def _data(self, data: bytes) -> None:
        if data:
            self._chunks.append(memoryview(data))
        self._poke()

    async def _wait_changed(self) -> None:
        self._changed = trio.Event()
        await self._changed.wait()

    async def _wait_io(self, wait: Callable[[], Awaitable[None]]) -> None:
        with trio.CancelScope() as self._io_scope:
            await wait()
        self._io_scope = None

    async def _send_all(self, msgs: Iterable[StreamMessage]) -> None:
        for msg in msgs:
            if self._lost:
                return
            try:
                await self.hub.send(msg)
            except DunixError as exc:  # PeerUnreachable: the whole link is gone
                log.info("stream %d: link lost: %s", self.stream, exc)
                self.hub.link_lost()

    def _close(self) -> None:
        if self._io.fd >= 0:
            self._io.close()

    # -- the tasks ---------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            if self.sending:
                self.outcome = await self._run_sender()
            else:
                self.outcome = await self._run_receiver()
        finally:
            self._close()
            if self.outcome is None:
                self.outcome = Outcome.LOST
            self._chunks.clear()
            self.hub._forget(self)
            self.finished.set()

    async def _run_sender(self) -> Outcome:
        mux, stream = self.hub.mux, self.stream
        info = mux.info(stream)
        chunk = self.hub.chunk
        while info.state is State.WAITING and not self._lost:
            if self._stopping:
                self._close()  # the local writer learns now; the end waits for the credit
            await self._wait_changed()
        while not (self._lost or self._stopping) and info.state is State.OPEN:
            credit = mux.sendable(stream)
            if not credit:
                if info.pull and not info.ready and self._io.fd >= 0:
                    if await self._wait_pulled():
                        self._close()
                        await self._send_all(mux.local_eof(stream))
                        return Outcome.LOST if self._lost else Outcome.EOF
                    continue
                await self._wait_changed()
                continue
            data = self._io.read(min(credit, chunk))
            if data is None:
                await self._wait_filling(credit)
                continue
            if not data:
                self._close()
                await self._send_all(mux.local_eof(stream))
                return Outcome.LOST if self._lost else Outcome.EOF
            await self._send_all(mux.read(stream, data))
            if self._may_hand_over():
                outcome = await self._run_bulk_sender()
                if outcome is not None:
                    return outcome
        if info.state is State.PEER_GONE:
            self._io.shutdown(socket.SHUT_RD)  # before the close: our other fd may hold it
        self._close()
        if self._lost:
            return Outcome.LOST
        if info.state is State.PEER_GONE:
            await self._send_all(mux.finish(stream))
            return Outcome.PEER_GONE
        await self._send_all(mux.local_eof(stream))  # stopped by the agent
        return Outcome.STOPPED

    def _may_hand_over(self) -> bool:
        bulk, info = self.hub.bulk, self.hub.mux.info(self.stream)
        return (
            bulk is not None and self._io.fifo and self._io.sock is None and self._io.fd >= 0
            and info.sent >= bulk.after and info.state is State.OPEN and not info.want
            and (not info.pull or info.served > 0) and not (self._lost or self._stopping)
        )  # fmt: skip

    async def _run_bulk_sender(self) -> Outcome | None:
        """Hand the rest of the stream to the native relay; None if it could not start
        (the stream goes on here)."""
        assert self.hub.bulk is not None
        mux, stream = self.hub.mux, self.stream
        try:
            proc, address, key = await self.hub.bulk.start_sender(stream, self._io.fd)
        except OSError as exc:
            log.warning("stream %d: the native relay did not start: %s", stream, exc)
            return None
        if not self._may_hand_over():  # the peer went away, or we stop, while it started
            await _bulk.stop(proc)
            return None
        log.info("stream %d: handed over to the native relay %d at %s", stream, proc.pid, address)
        await self._send_all(mux.bulk(stream, address, key))
        # the relay reads the pipe whenever it can: a steady reader of it, for a pull
        # receiver of this agent that fills the same pipe (a process two hops away)
        with self._reading(self.hub.chunk):
            status = await self._wait_relay(proc)
        self._close()
        info = mux.info(stream)
        if self._lost:
            return Outcome.LOST
        if info.state is State.PEER_GONE:  # its final word may come before our relay's exit
            await self._send_all(mux.finish(stream))
        else:
            await self._send_all(mux.local_eof(stream))
        if self._stopping:
            return Outcome.STOPPED
        if status not in (_bulk.DONE, _bulk.PEER_GONE):
            log.warning("stream %d: relay %d ended with %s", stream, proc.pid, status)
        return Outcome.EOF if status == _bulk.DONE else Outcome.PEER_GONE

    async def _wait_relay(self, proc: trio.Process) -> int:
        """Wait for a relay's exit; kill it when the agent stops the endpoint, the link is
        lost, or (a sender) the receiver is gone and the relay did not notice in time."""
        status: list[int] = []
        async with trio.open_nursery() as nursery:

            async def reap() -> None:
                status.append(await proc.wait())
                nursery.cancel_scope.cancel()

            nursery.start_soon(reap)
            info = self.hub.mux.info(self.stream)
            while not (self._stopping or self._lost or info.state is State.PEER_GONE):
                await self._wait_changed()
            if not (self._stopping or self._lost):
                await trio.sleep(RELAY_GRACE)
            elif self._ending and self.sending and not self._lost:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGUSR1)  # the relay ends after what it read
                await trio.sleep(END_GRACE)  # its exit (reap) ends this sooner
            nursery.cancel_scope.cancel()
        if not status:
            status.append(await _bulk.stop(proc))
        return status[0]

    async def _wait_pulled(self) -> bool:
        """A pulled sender with no grant: wait for data (then say ``StreamReady``), EOF
        (True: the end needs no grant) or a message from the peer, whichever is first."""
        self._idle = True
        idle = _idle_pulled.setdefault(self._io.key, set()) if self._io.fifo else None
        if idle is not None:
            idle.add(self)
        try:
            await self._wait_io(self._io.wait_readable)
        finally:
            self._idle = False
            if idle is not None:
                idle.discard(self)
                if not idle:
                    _idle_pulled.pop(self._io.key, None)
        info = self.hub.mux.info(self.stream)
        if info.state is not State.OPEN or self.hub.mux.sendable(self.stream):
            return False  # woken by the peer
        if self._upstream:  # data waits upstream: our peer should look for its readers
            self._upstream = False
            await self._send_all(self.hub.mux.ready(self.stream))
            return False
        if self._io.at_eof():
            return True
        if self._io.queued():
            await self._send_all(self.hub.mux.ready(self.stream))
        else:
            await trio.sleep(PROBE_FIRST)  # readable, yet another reader took it: no spin
        return False

    async def _wait_filling(self, credit: int) -> None:
        """Wait for the fd with a grant: meanwhile this relay is a reader of its pipe."""
        with self._reading(credit):
            await self._wait_io(self._io.wait_readable)

    @contextlib.contextmanager
    def _reading(self, nbytes: int) -> Iterator[None]:
        """Count this endpoint as a reader of its pipe wanting ``nbytes`` meanwhile."""
        waiting = _waiting_senders.setdefault(self._io.key, []) if self._io.fifo else None
        if waiting is not None:
            waiting.append(nbytes)
        try:
            yield
        finally:
            if waiting is not None:
                waiting.remove(nbytes)
                if not waiting:
                    _waiting_senders.pop(self._io.key, None)

    async def _run_receiver(self) -> Outcome:
        """Write what arrives; meanwhile watch for the local reader going away, so the far
        writer learns it even while nothing is being written (a writer to a local pipe
        would learn it at its next write; here that write is the far one)."""
        if self._io.refused:
            await self._send_all(self.hub.mux.local_gone(self.stream))
            return Outcome.BROKEN
        poller = self._io.hangup_poller()
        try:
            async with trio.open_nursery() as nursery:
                if poller is not None:
                    nursery.start_soon(self._watch_hangup, poller)
                outcome = await self._receive()
                nursery.cancel_scope.cancel()
        finally:
            if poller is not None:
                poller.close()
        return outcome

    async def _watch_hangup(self, poller: select.epoll) -> None:
        while not poller.poll(0):
            await trio.lowlevel.wait_readable(poller.fileno())
        self._hangup = True
        self._poke(cancel_io=True)

    async def _receive(self) -> Outcome:
        mux, stream = self.hub.mux, self.stream
        info = mux.info(stream)
        await self._send_all(self._opening)
        pause = 0.0  # pull mode: how long to wait before looking for a reader again
        while not self._lost:
            if self._stopping or self._hangup:
                self._close()
                await self._send_all(mux.local_gone(stream))
                return Outcome.STOPPED if self._stopping else Outcome.BROKEN
            if self._chunks:
                head = self._chunks[0]
                written: int | None
                try:
                    if self._io.regular:  # a home's `> out` for a guest (agent/remote.py)
                        written = await self._io.write_file(head)
                    else:
                        written = self._io.write(head)
                except OSError as exc:
                    if exc.errno not in _BROKEN:
                        log.warning("stream %d: writing fd %d: %s", stream, self._io.fd, exc)
                    self._io.shutdown(socket.SHUT_WR)
                    self._close()
                    await self._send_all(mux.local_gone(stream))
                    return Outcome.BROKEN
                if written is None:
                    await self._wait_io(self._io.wait_writable)
                    continue
                if written == len(head):
                    self._chunks.popleft()
                else:
                    self._chunks[0] = head[written:]
                await self._send_all(mux.written(stream, written))
                continue
            if info.state is State.BULK:
                return await self._run_bulk_receiver()
            if info.state is State.DRAINING:
                self._io.shutdown(socket.SHUT_WR)
                self._close()
                await self._send_all(mux.flushed(stream))
                return Outcome.EOF
            if info.probing and self._demand is not None:
                if self._io.fifo:
                    _data_upstream(self._io.key)
                wanted = self._look_for_readers()
                if wanted:
                    pause = 0.0
                    await self._send_all(mux.demand(stream, wanted))
                    continue
                pause = min(PROBE_MAX, max(PROBE_FIRST, 2 * pause))
                with trio.move_on_after(pause):
                    await self._wait_changed()
                continue
            pause = 0.0
            await self._wait_changed()
        return Outcome.LOST

    async def _run_bulk_receiver(self) -> Outcome:
        """All that came before the hand-over is written: the relay takes it from here."""
        mux, stream, msg = self.hub.mux, self.stream, self._handover
        assert msg is not None
        bulk = self.hub.bulk or BulkRelay("")
        try:
            proc = await bulk.start_receiver(stream, self._io.fd, msg.address, msg.key)
        except (OSError, DunixError) as exc:
            log.warning("stream %d: the native relay did not start: %s", stream, exc)
            self._close()
            await self._send_all(mux.local_gone(stream))
            return Outcome.LOST
        status = await self._wait_relay(proc)
        self._close()
        if self._lost:
            return Outcome.LOST
        if mux.info(stream).state is State.DRAINING:
            await self._send_all(mux.flushed(stream))
        else:
            await self._send_all(mux.local_gone(stream))
        if self._stopping:
            return Outcome.STOPPED
        if status not in (_bulk.DONE, _bulk.BROKEN):
            log.warning("stream %d: relay %d ended with %s", stream, proc.pid, status)
        return {_bulk.DONE: Outcome.EOF, _bulk.BROKEN: Outcome.BROKEN}.get(status, Outcome.LOST)

    def _look_for_readers(self) -> int:
        """What a reader blocked on our pipe wants; 0 while the pipe still holds data
        (a reader would not be blocked then, whatever /proc says)."""
        assert self._demand is not None
        if self._io.queued():
            return 0
        key = self._io.key
        return max(self._demand(key), waiting_senders(key))


class StreamHub:
    """The streams of one peer link: opens endpoints, routes the peer's messages to them.

    ``send(msg)`` puts a message on the link to the peer (``Channel.send``); it may
    block, and raises ``DunixError`` (``PeerUnreachable``) if the link broke. The
    agent starts :meth:`run` in a nursery (``await nursery.start(hub.run)``) and feeds
    every message it receives on the link to :meth:`deliver`.
    """

    def __init__(
        self,
        send: Send,
        *,
        odd: bool,
        window: int = DEFAULT_WINDOW,
        chunk: int = DEFAULT_CHUNK,
        first: int | None = None,
        bulk: BulkRelay | None = None,
    ) -> None:
        self.send = send
        self.bulk = bulk  # None: every stream stays on the channel
        # a random start: a hub made after a lost link must not reuse the old hub's ids
        start = fresh_first(odd) if first is None else first
        self.mux = StreamMux(odd=odd, window=window, first=start)
        self.chunk = chunk
        self.endpoints: dict[int, StreamEndpoint] = {}
        self._nursery: trio.Nursery | None = None
        self._lost = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the endpoints' tasks until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def allocate(self) -> int:
        """A new stream id for this link (this side's parity); tell the peer in RemoteExec."""
        return self.mux.allocate()

    def open_sender(self, stream: int, fd: int, *, shared: bool = False) -> StreamEndpoint:
        """Relay what can be read from ``fd`` to the peer's receiver of ``stream``.

        The endpoint owns ``fd`` (closes it when done). ``shared``: the fd's open file
        description may be held by other processes (a duplicate taken from the deputy).
        """
        return self._open(stream, fd, sending=True, shared=shared)

    def open_receiver(
        self, stream: int, fd: int, *, shared: bool = False, pull: Demand | None = None
    ) -> StreamEndpoint:
        """Write what the peer's sender of ``stream`` sends into ``fd`` (owned, see above).

        ``pull``: ``fd`` is the write end of a pipe whose readers are local processes that
        may never read it; the peer reads its fd only for what they wait for (see the
        module docstring). ``pull(key)`` says how many bytes they wait for.
        """
        return self._open(stream, fd, sending=False, shared=shared, pull=pull)

    def _open(
        self, stream: int, fd: int, *, sending: bool, shared: bool, pull: Demand | None = None
    ) -> StreamEndpoint:
        if self._nursery is None:
            raise RuntimeError("StreamHub.run is not running")
        if self._lost:
            os.close(fd)
            raise RuntimeError("the link of this StreamHub is lost")
        if stream in self.mux:
            raise ValueError(f"stream {stream} is already open")
        io = _LocalFd(fd, writing=not sending, shared=shared)
        try:
            if pull is not None and not io.fifo:
                raise ValueError("only a pipe or FIFO can be pulled")
            opening = [] if sending else self.mux.open_receiver(stream, pull=pull is not None)
            if sending:
                self.mux.open_sender(stream)
        except BaseException:
            io.close()
            raise
        endpoint = self.endpoints[stream] = StreamEndpoint(self, stream, io, sending=sending)
        endpoint._opening = opening
        endpoint._demand = pull
        self._nursery.start_soon(endpoint._run, name=repr(endpoint))
        return endpoint

    def deliver(self, msg: object) -> bool:
        """Apply one message from the peer; False if it is not a stream message.

        Never blocks. Raises ``ProtocolError`` if the peer broke the protocol: the agent
        must then close the channel and call :meth:`link_lost`.
        """
        if not isinstance(msg, STREAM_MESSAGES):
            return False
        info = self.mux.receive(msg)
        if info is None:
            return True
        endpoint = self.endpoints.get(msg.stream)
        if endpoint is None:
            return True  # its relay already finished; the mux only needed the final word
        if isinstance(msg, StreamData):
            endpoint._data(msg.data if info.state is State.OPEN else b"")
        elif isinstance(msg, StreamBulk):
            endpoint._handover = msg
            endpoint._poke()
        else:
            endpoint._poke(cancel_io=info.state is State.PEER_GONE or endpoint._idle)
        return True

    def link_lost(self) -> None:
        """The channel broke: every endpoint closes its fd and ends as ``LOST``."""
        self._lost = True
        for endpoint in list(self.endpoints.values()):
            endpoint._lose()

    def _forget(self, endpoint: StreamEndpoint) -> None:
        if self.endpoints.get(endpoint.stream) is endpoint:
            del self.endpoints[endpoint.stream]
