"""The bulk lane: contents of a peer's open file over a TLS connection of their own.

Why: a 1 MiB read of a peer's file as a :class:`~dunix.storagefs.peerfiles.FileRequest`
crosses the agent's loop on both hosts, msgpack (a copy of the block each way), the frame
join, trio's TLS over memory BIOs and two thread hops; profiled with py-spy on the
0.5-CPU hosts, the owner spent a quarter of its time in ``msgpack.packb`` alone and both
agents' loops ran at the quota (peer reads 130-150 MB/s against iperf3's ~1,000).

Here a read or write is one fixed binary header and the raw block, over blocking
``ssl.SSLSocket`` connections (OpenSSL reads and writes the socket itself, releasing the
GIL) served by one thread per connection on the owner, which ``preadv``s straight into the
reply buffer. The caller's storagefs thread hands each request to a worker thread with a
connection from a per-owner pool, so read-ahead blocks are fetched in parallel.

Trust is the agents' own: mutual TLS with the cluster CA (``TLSIdentity``); the owner maps
the client certificate's CN to a node id and serves only handles that node opened
(``FileServer.dup_handle``). Everything that is not plain contents (open, stat, fsync,
locks, and writes to replicated files: the owner's ``after`` hook replicates them) stays on
the message path; a caller that cannot use the lane (no connection, a refused handshake,
an owner without it) falls back to messages, which report the owner's real state.

Wire (big-endian): request ``op:u8 handle:u64 offset:u64 size:u32`` then ``size`` bytes for
a write; reply ``error:i32 size:u32`` then ``size`` bytes for a read. ``error`` is an errno,
or ``BY_MESSAGE``: ask that one by message instead.

Native frames: when ``native/build/libdunixlane.so`` is built (and ``DUNIX_LANE_FRAMES`` is
not 0), a new connection's first request is ``NATIVE`` with fresh keys inside TLS; then both
ends close TLS and each request and reply above is one AES-128-GCM frame
(``lane_frames.py``). Same 0.5-CPU hosts, A/B in alternating clusters: a peer's file read
548 / 548 MB/s on TLS records, 625 / 628 on frames (the reading host 0.65 -> 0.53 s of CPU
per 512 MiB); writes within the noise. An owner without the library answers ENOSYS and the
connection stays on TLS.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import mmap
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from typing import cast

import trio

from dunix.errors import DunixError
from dunix.storagefs import lane_frames
from dunix.storagefs.lane_frames import HEAD, TAG, Frames
from dunix.storagefs.peerfiles import FileReply
from dunix.wire import peer_identity

log = logging.getLogger(__name__)

REQUEST = struct.Struct(">BQQI")
REPLY = struct.Struct(">iI")
READ, WRITE = 1, 2
#: the caller's first request on a connection may be this, with lane_frames.KEYS bytes of
#: keys: answered 0, both ends leave TLS for native frames (lane_frames.py); ENOSYS: not here
NATIVE = 3
#: the largest block one request moves (peerfiles serves reads of up to 4 blocks too)
MAX_BLOCK = 4 << 20
#: the alignment of direct reads (a page; the block size of any usual file system)
ALIGN = mmap.PAGESIZE
#: an error code telling the caller to send this request as a message instead
BY_MESSAGE = -1
HANDSHAKE_TIMEOUT = 5.0
#: after a failed connection to an owner, how long the lane to it is not tried again
RETRY_AFTER = 10.0
#: idle connections kept per owner (read-ahead and concurrent files use several)
POOL = 8
#: a write's data: one buffer, or pieces written one after the other
Pieces = tuple[bytes | bytearray | memoryview, ...]


class LaneError(DunixError):
    """The bulk connection itself failed (not the owner's answer): use messages."""


def _recv_exact(sock: ssl.SSLSocket, view: memoryview) -> bool:
    """Fill ``view``; False on a clean EOF before the first byte, LaneError mid-way."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:], len(view) - got)
        if n == 0:
            if got == 0:
                return False
            raise LaneError("the peer hung up mid-message")
        got += n
    return True


# --- owner side --------------------------------------------------------------------------


class BulkServer:
    """Serves the bulk lane of this host's files.

    ``dup_handle(origin, handle)`` gives a duplicate descriptor and the tree path of a file
    ``origin`` opened here (``FileServer.dup_handle``); ``node_of(name)`` the node id of a
    certificate's CN (None: not a live member); ``plain_write(path)``: whether a write may
    bypass the message path (False for replicated files); ``wrote(path)`` is called after
    each write (drop the owner kernel's cache of it).
    """

    def __init__(
        self,
        context: ssl.SSLContext,
        dup_handle: Callable[[int, int], tuple[int, str] | None],
        node_of: Callable[[str], int | None],
        plain_write: Callable[[str], bool] = lambda path: True,
        wrote: Callable[[str], None] = lambda path: None,
    ) -> None:
        self._ctx = context
        self._dup = dup_handle
        self._node_of = node_of
        self._plain_write = plain_write
        self._wrote = wrote
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False

    def start(self, host: str) -> int:
        """Listen on ``host`` (any port) and accept in a thread; returns the port."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, 0))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, name="storagefs-bulk", daemon=True).start()
        port: int = listener.getsockname()[1]
        return port

    def close(self) -> None:
        self._closed = True
        with self._lock:
            socks = [*self._conns, *([self._listener] if self._listener else [])]
            self._conns.clear()
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._closed:
            try:
                raw, _ = self._listener.accept()
            except OSError:
                return  # closed
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.add(raw)
            threading.Thread(target=self._serve, args=(raw,), name="storagefs-bulk",
                             daemon=True).start()  # fmt: skip

    def _serve(self, raw: socket.socket) -> None:
        sock = raw  # the TLS socket takes the descriptor over (raw is detached then)
        try:
            raw.settimeout(HANDSHAKE_TIMEOUT)
            tls = self._ctx.wrap_socket(raw, server_side=True)
            with self._lock:
                self._conns.discard(raw)
                self._conns.add(tls)
            sock = tls
            if self._closed:
                return
            name, role = peer_identity(tls.getpeercert())
            origin = self._node_of(name) if role == "node" else None
            if origin is None:
                log.warning("storagefs: bulk connection from %r (%s) refused: not a member",
                            name, role)  # fmt: skip
                return
            log.info("storagefs: bulk lane from %s (node %d)", name, origin)
            tls.settimeout(None)  # an idle pooled connection waits for its next request
            self._requests(tls, origin)
        except (OSError, ssl.SSLError, DunixError) as exc:
            if not self._closed:
                log.debug("storagefs: bulk connection ended: %s", exc)
        finally:
            with self._lock:
                self._conns.discard(sock)
            sock.close()

    def _requests(self, tls: ssl.SSLSocket, origin: int) -> None:
        head = memoryview(bytearray(REQUEST.size))
        # page-aligned (O_DIRECT reads land in it): the block starts at ALIGN, the reply
        # header just before it, so header and block go out in one write
        buf = mmap.mmap(-1, ALIGN + MAX_BLOCK)  # unmapped when the thread ends
        view = memoryview(buf)
        while _recv_exact(tls, head):
            op, handle, offset, size = REQUEST.unpack(head)
            if op == NATIVE and size == lane_frames.KEYS:
                keys = bytearray(size)
                if not _recv_exact(tls, memoryview(keys)):
                    raise LaneError("the peer hung up mid-keys")
                if not lane_frames.available():
                    tls.sendall(REPLY.pack(errno.ENOSYS, 0))
                    continue
                tls.sendall(REPLY.pack(0, 0))
                log.info("storagefs: bulk lane from node %d: native frames", origin)
                frames = Frames.pair(bytes(keys), caller=False)
                try:
                    self._frame_requests(tls.unwrap(), frames, origin)
                finally:
                    frames.close()
                return
            if size > MAX_BLOCK or op not in (READ, WRITE):
                raise LaneError(f"bad request: op {op}, {size} bytes")
            block = view[ALIGN : ALIGN + size]
            if op == WRITE and not _recv_exact(tls, block):
                raise LaneError("the peer hung up mid-write")
            error, done = self._carry_out(origin, op, handle, offset, block)
            REPLY.pack_into(buf, ALIGN - REPLY.size, error, done)
            sent = done if op == READ and not error else 0
            tls.sendall(view[ALIGN - REPLY.size : ALIGN + sent])

    def _frame_requests(self, sock: socket.socket, frames: Frames, origin: int) -> None:
        """``_requests`` over native frames: a request's block is decrypted in place where
        an O_DIRECT write takes it (page-aligned), a read lands there and is encrypted in
        place around it, so no byte is copied in user space."""
        # [room | frame: length, REQUEST or REPLY header, block at ALIGN, tag | room]
        buf = mmap.mmap(-1, 2 * ALIGN + MAX_BLOCK)
        view = memoryview(buf)
        at, keeper = lane_frames.address(buf)
        request_at, reply_at = ALIGN - REQUEST.size - HEAD, ALIGN - REPLY.size - HEAD
        fd = sock.fileno()
        try:
            while True:
                try:
                    got = frames.recv_at(fd, at + request_at,
                                         HEAD + REQUEST.size + MAX_BLOCK + TAG, None)  # fmt: skip
                except lane_frames.EndOfLane:
                    return
                op, handle, offset, size = REQUEST.unpack_from(buf, request_at + HEAD)
                if size > MAX_BLOCK or op not in (READ, WRITE):
                    raise LaneError(f"bad request: op {op}, {size} bytes")
                if got != REQUEST.size + (size if op == WRITE else 0):
                    raise LaneError(f"a request of {got} bytes for op {op}, {size} bytes")
                block = view[ALIGN : ALIGN + size]
                error, done = self._carry_out(origin, op, handle, offset, block)
                del block
                REPLY.pack_into(buf, reply_at + HEAD, error, done)
                sent = done if op == READ and not error else 0
                frames.seal_send(fd, at + reply_at, REPLY.size + sent, None)
        finally:
            del keeper, view

    def _carry_out(
        self, origin: int, op: int, handle: int, offset: int, block: memoryview
    ) -> tuple[int, int]:
        """(errno or BY_MESSAGE or 0, bytes read or written)."""
        opened = self._dup(origin, handle)
        if opened is None:
            return errno.EBADF, 0
        fd, path = opened
        try:
            if op == READ:
                return 0, _read(fd, block, offset)
            if not self._plain_write(path):
                return BY_MESSAGE, 0
            written = _write(fd, block, offset)
            self._wrote(path)
            return 0, written
        except OSError as exc:
            return exc.errno or errno.EIO, 0
        finally:
            os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: blocks up to this size come from the heap and stay there when freed (see keep_blocks)
HEAP_BLOCKS = 4 * MAX_BLOCK


def keep_blocks() -> None:
    """Have glibc serve block-sized buffers from its heap and keep freed ones there.

    Why: every 1 MiB write the kernel hands pyfuse3 becomes a new bytes object, and every
    4 MiB block fetched a new bytearray; above glibc's mmap threshold (128 KiB, raised only
    as far as the largest block freed so far) or past its trim threshold, each came from
    fresh pages: a page fault and a zeroed page per 4 KiB (perf on the host writing a peer's
    file: its storagefs thread 1,343 samples, 91 of them in exc_page_fault and more in
    clear_page and memcg charging; with this 1,180 and 12).
    Process-wide: the agent keeps up to ``2 * HEAP_BLOCKS`` of freed heap instead of
    returning it at once.
    """
    _libc.mallopt(_M_MMAP_THRESHOLD, HEAP_BLOCKS)
    _libc.mallopt(_M_TRIM_THRESHOLD, 2 * HEAP_BLOCKS)


_NR_CACHESTAT = 451  # x86_64 and the generic table alike (Linux 6.5)


def _cached_pages(fd: int, offset: int, length: int) -> int | None:
    """How many pages of the range the page cache holds (cachestat(2)), without reading
    or starting read-ahead as a probing read would; None where the call is missing."""
    span = (ctypes.c_uint64 * 2)(offset, length)
    stat = (ctypes.c_uint64 * 5)()
    if _libc.syscall(_NR_CACHESTAT, fd, ctypes.byref(span), ctypes.byref(stat), 0) != 0:
        return None
    return int(stat[0])


def _read(fd: int, block: memoryview, offset: int) -> int:
    """Read into ``block`` (page-aligned) at ``offset``: from the page cache when it holds
    the range, else with ``O_DIRECT`` straight from the device into our buffer.

    Why: the serving agent ran at its quota, most of it (perf: ``_copy_to_iter`` under
    ``filemap_read``, 61-67 %) copying freshly read pages out of the page cache. A direct
    read skips that copy and does not fill the cache with a file a peer streams through.
    Probing with ``preadv2(RWF_NOWAIT)`` does not do: its EAGAIN starts the read-ahead
    (filemap_get_pages), so the next blocks came through the page cache anyway; hence
    cachestat(2). A direct read writes the range's dirty pages back first, so it never sees
    stale data. Only a readable descriptor is reopened, and only at aligned offsets.
    """
    size = len(block)
    cached = _cached_pages(fd, offset, size)
    aligned = offset % ALIGN == 0 and size % ALIGN == 0
    readable = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_WRONLY
    if cached is not None and cached * ALIGN < size and aligned and readable:
        done = _direct(fd, os.O_RDONLY, lambda direct: os.preadv(direct, [block], offset))
        if done is not None:
            return done
    return os.preadv(fd, [block], offset)


def _write(fd: int, block: memoryview, offset: int) -> int:
    """Write ``block`` (page-aligned) at ``offset``: with ``O_DIRECT`` when aligned.

    Why: the owner ran at its quota during a peer's sequential write, most of it in ext4's
    buffered write path and the writeback after it (a 512 MiB ``dd``: 0.74-1.1 s of system
    time buffered with its sync, 0.05 s with ``oflag=direct``, on this VM's disk). The
    kernel keeps a direct write coherent with the page cache: it writes the range's dirty
    pages back first and drops the range's cached pages after (``kiocb_invalidate_pages``).
    Not for an ``O_APPEND`` descriptor (the reopened one would write at ``offset``, not at
    the end) nor a write-only-through-the-cache file system (EINVAL): then a plain pwrite.
    """
    size = len(block)
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if offset % ALIGN == 0 and size % ALIGN == 0 and size and not flags & os.O_APPEND:
        done = _direct(fd, os.O_WRONLY, lambda direct: os.pwritev(direct, [block], offset))
        if done is not None:
            return done
    return os.pwritev(fd, [block], offset)


def _direct(fd: int, mode: int, io: Callable[[int], int]) -> int | None:
    """``io`` on ``fd`` reopened with ``O_DIRECT``; None where the file system refuses it
    (EINVAL, at the open or the transfer: then the caller goes through the page cache)."""
    try:
        direct = os.open(f"/proc/self/fd/{fd}", mode | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return io(direct)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return None
    finally:
        os.close(direct)


# --- caller side -------------------------------------------------------------------------

#: asks an owner where its lane listens: (owner's name, host, port), None if it has none
Locate = Callable[[int], Awaitable[tuple[str, str, int] | None]]


def locator(by_message: Callable[..., Awaitable[FileReply]]) -> Locate:
    """A :data:`Locate` asking the owner by message (``op="bulk"``, peerfiles.py)."""

    async def locate(peer: int) -> tuple[str, str, int] | None:
        try:
            reply = await by_message(peer, "bulk")
        except OSError:  # EOPNOTSUPP: it has no lane; ENOSYS: it does not know the op
            return None
        name, host, port = reply.bulk.split()
        return name, host, int(port)

    return locate


class _Conn:
    def __init__(self, tls: ssl.SSLSocket) -> None:
        self.tls = tls
        self.head = memoryview(bytearray(max(REQUEST.size, REPLY.size)))
        #: native frames instead of TLS records, once both ends agreed (lane_frames.py)
        self.frames: Frames | None = None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.tls.close()
        if self.frames is not None:
            self.frames.close()
            self.frames = None


class BulkClient:
    """The caller's side of the lane: a pool of connections per owner, used from worker
    threads of the storagefs loop. ``read``/``write`` return None when the request must
    go by message instead (no lane to that owner, or the connection failed)."""

    def __init__(self, context: ssl.SSLContext, locate: Locate, timeout: float = 10.0) -> None:
        self._ctx = context
        self._locate = locate
        self.timeout = timeout
        self._where: dict[int, tuple[str, str, int]] = {}
        self._idle: dict[int, list[_Conn]] = {}
        self._not_before: dict[int, float] = {}
        self.used = 0  # requests the lane carried (tests, logs)
        keep_blocks()

    def forget(self, peer: int) -> None:
        """``peer`` left or restarted: its address and connections are stale."""
        self._where.pop(peer, None)
        for conn in self._idle.pop(peer, []):
            conn.close()

    def close(self) -> None:
        for peer in list(self._idle):
            self.forget(peer)

    async def carry(self, peer: int, op: str, fields: dict[str, object]) -> FileReply | None:
        """A ``read`` or ``write`` FileRequest's fields carried over the lane; None: send
        it by message."""
        handle, offset = fields.get("handle"), fields.get("offset", 0)
        if not isinstance(handle, int) or not isinstance(offset, int):
            return None
        if op == "read":
            size = fields.get("size", 0)
            data = await self.read(peer, handle, offset, size if isinstance(size, int) else 0)
            # a bytearray where bytes are declared: its only reader (RemoteFile) slices
            # it through a memoryview, and a copy per block is what this lane saves
            return None if data is None else FileReply(0, peer, data=cast(bytes, data))
        if op == "write":
            buf = fields.get("data", b"")
            if not isinstance(buf, bytes | bytearray | memoryview | tuple):
                return None
            written = await self.write(peer, handle, offset, buf)
            return None if written is None else FileReply(0, peer, size=written)
        return None

    async def read(
        self, peer: int, handle: int, offset: int, size: int
    ) -> bytearray | memoryview | None:
        """Up to ``size`` bytes at ``offset`` of ``peer``'s open ``handle``; OSError is the
        owner's errno."""
        if not 0 < size <= MAX_BLOCK:
            return None
        done = await self._request(peer, READ, handle, offset, size)
        return None if done is None else done[1]

    async def write(
        self, peer: int, handle: int, offset: int, data: bytes | bytearray | memoryview | Pieces
    ) -> int | None:
        """Write ``data``, pieces sent one after the other (no join: a copy per byte)."""
        pieces = tuple(memoryview(p) for p in (data if isinstance(data, tuple) else (data,)))
        if not 0 < sum(len(piece) for piece in pieces) <= MAX_BLOCK:
            return None
        done = await self._request(peer, WRITE, handle, offset, pieces)
        return None if done is None else done[0]

    async def _request(
        self, peer: int, op: int, handle: int, offset: int, block: tuple[memoryview, ...] | int
    ) -> tuple[int, bytearray | memoryview] | None:
        """(bytes read or written, the bytes read); ``block`` is a write's data or a
        read's size."""
        if time.monotonic() < self._not_before.get(peer, 0.0):
            return None
        where = self._where.get(peer)
        if where is None:
            try:
                found = await self._locate(peer)
            except (OSError, DunixError) as exc:
                log.info("storagefs: no bulk lane to node %d: %s", peer, exc)
                found = None
            if found is None:
                self._not_before[peer] = time.monotonic() + RETRY_AFTER
                return None
            where = self._where[peer] = found
        idle = self._idle.get(peer)
        pooled = idle.pop() if idle else None
        try:
            conn, error, done, got = await trio.to_thread.run_sync(
                self._blocking, pooled, where, op, handle, offset, block
            )
        except (OSError, ssl.SSLError, DunixError) as exc:
            if pooled is not None:
                pooled.close()
            log.info("storagefs: bulk lane to node %d (%s) failed: %s; by message", peer,
                     where[0], exc)  # fmt: skip
            self._where.pop(peer, None)
            self._not_before[peer] = time.monotonic() + RETRY_AFTER
            return None
        pool = self._idle.setdefault(peer, [])
        if self._where.get(peer) == where and len(pool) < POOL:
            pool.append(conn)
        else:
            conn.close()
        if error == BY_MESSAGE:
            return None
        if error:
            raise OSError(error, os.strerror(error))
        self.used += 1
        return done, got

    def _connect(self, where: tuple[str, str, int]) -> _Conn:
        name, host, port = where
        raw = socket.create_connection((host, port), timeout=HANDSHAKE_TIMEOUT)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = self._ctx.wrap_socket(raw)
            if peer_identity(tls.getpeercert()) != (name, "node"):
                raise LaneError(f"{host}:{port} is not node {name}")
            conn = _Conn(tls)
            if lane_frames.available():
                conn.frames = self._leave_tls(tls)
        except BaseException:
            raw.close()
            raise
        return conn

    def _leave_tls(self, tls: ssl.SSLSocket) -> Frames | None:
        """Fresh keys to the owner inside TLS, then both ends close TLS and the connection
        carries native frames (lane_frames.py); None: the owner cannot, TLS stays."""
        keys = os.urandom(lane_frames.KEYS)
        tls.sendall(REQUEST.pack(NATIVE, 0, 0, len(keys)) + keys)
        reply = bytearray(REPLY.size)
        if not _recv_exact(tls, memoryview(reply)):
            raise LaneError("the owner hung up")
        error, _ = REPLY.unpack(reply)
        if error:
            return None
        frames = Frames.pair(keys, caller=True)
        try:
            tls.unwrap()  # close_notify both ways; the TCP connection stays
        except BaseException:
            frames.close()
            raise
        return frames

    def _by_frames(
        self, conn: _Conn, op: int, handle: int, offset: int, block: tuple[memoryview, ...] | int
    ) -> tuple[int, int, bytearray | memoryview]:
        """``_blocking``'s request and reply as native frames: a write's pieces are
        encrypted straight into the frame sent, a read's block decrypted in place."""
        assert conn.frames is not None
        fd, frames = conn.tls.fileno(), conn.frames
        size = block if isinstance(block, int) else sum(len(piece) for piece in block)
        head = REQUEST.pack(op, handle, offset, size)
        frames.send(fd, (head,) if isinstance(block, int) else (head, *block), self.timeout)
        length = frames.recv_len(fd, self.timeout)
        if not REPLY.size <= length <= REPLY.size + (size if op == READ else 0):
            raise LaneError(f"a reply of {length} bytes to op {op} of {size} bytes")
        frame = bytearray(HEAD + length + TAG)
        frames.recv(fd, frame, self.timeout)
        error, done = REPLY.unpack_from(frame, HEAD)
        if op == READ and not error:
            if length != REPLY.size + done:
                raise LaneError(f"the owner sent {length - REPLY.size} bytes for {done}")
            return error, done, memoryview(frame)[HEAD + REPLY.size : HEAD + length]
        return error, done, bytearray()

    def _blocking(
        self,
        conn: _Conn | None,
        where: tuple[str, str, int],
        op: int,
        handle: int,
        offset: int,
        block: tuple[memoryview, ...] | int,
    ) -> tuple[_Conn, int, int, bytearray | memoryview]:
        """One request and its reply, in a worker thread (connecting first if needed).
        A read's buffer is made once the reply says its size: a short read of a small
        file does not pay for zeroing a whole block."""
        if conn is None:
            conn = self._connect(where)
        tls = conn.tls
        tls.settimeout(self.timeout)
        got: bytearray | memoryview = bytearray()
        size = block if isinstance(block, int) else sum(len(piece) for piece in block)
        try:
            if conn.frames is not None:
                return (conn, *self._by_frames(conn, op, handle, offset, block))
            tls.sendall(REQUEST.pack(op, handle, offset, size))
            for piece in () if isinstance(block, int) else block:
                tls.sendall(piece)
            reply = conn.head[: REPLY.size]
            if not _recv_exact(tls, reply):
                raise LaneError("the owner hung up")
            error, done = REPLY.unpack(reply)
            if op == READ and not error and done:
                if done > size:
                    raise LaneError(f"the owner sent {done} bytes for {size}")
                got = bytearray(done)
                if not _recv_exact(tls, memoryview(got)):
                    raise LaneError("the owner hung up mid-block")
        except BaseException:
            conn.close()
            raise
        return conn, error, done, got
