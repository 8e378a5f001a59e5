"""The peers' names this host's kernel knows, and the read-ahead of their contents.

:class:`RemoteNodes` is StorageFS's table of remote nodes: inode number (the owner's, with
the owner's node id in the high bits) to owner, tree path, kernel lookup count and last
attributes. It also remembers where a name was last seen after the kernel forgot it (a
failed revalidation makes the kernel forget), so an owner that stops answering gives EIO,
not "no such file" (see ``StorageFS._lookup_remote``).

:class:`RemoteFile` is one open file of a peer: reads are served from blocks of ``FETCH``
bytes (4 MiB), and the ``READ_AHEAD`` block(s) after the one being read are fetched in the
background. Its writes gather behind (``WRITE_BATCH`` bytes, up to ``WRITES_IN_FLIGHT`` batches
on their way at once) and reach the owner at the latest at the next flush (close), fsync,
read, stat, truncate or lock of the file from this host (see :meth:`RemoteFile.write`).
"""

from __future__ import annotations

import errno
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pyfuse3
import trio

from dunix.errors import DunixError
from dunix.storagefs.peerfiles import BLOCK, FileReply

#: how many peer names a host remembers the owner of (a dead owner then gives EIO)
LAST_OWNERS = 100_000
#: bytes per read of a peer's file (4 requests' worth of the kernel's 1 MiB: each fetch
#: costs a task and a thread hop here, which the bigger unit pays for once per 4 MiB)
FETCH = 4 * BLOCK
#: fetch units asked ahead of the one being read, so the owner works while we copy. One:
#: each fetch runs in a worker thread that takes and drops the GIL per 16 KiB TLS record,
#: and two of them besides the FUSE thread cost the reader more than they gained (fio
#: from n2, 512 MiB, A/B on alternating clusters: 1 ahead 355 / 340 / 334 MB/s with n2
#: at 0.98-1.02 s CPU, 2 ahead 303 / 297 at 1.11-1.13 s, none 315)
READ_AHEAD = 1
#: bytes of sequential writes gathered into one request to the owner (the bulk lane's
#: largest block): the kernel sends at most 1 MiB per write
WRITE_BATCH = 4 * BLOCK
#: gathered batches on their way to the owner at once (each on a lane connection of its
#: own), so the owner writes one while this host gathers the next
WRITES_IN_FLIGHT = 2
#: the longest a write waits here before it goes to the owner, full batch or not: a reader
#: on another host sees it that soon without the writer's close or fsync (on one machine
#: it would at once; a streaming writer fills a batch sooner, 4 KiB writes still go ~100
#: to a request)
WRITE_LINGER = 0.02
#: seconds an owner's "no security.capability" answer is kept (the kernel's attribute
#: timeout, fs.ATTR_TIMEOUT: an xattr set elsewhere is seen as late as a chmod)
CAPS_TIMEOUT = 1.0
#: ``0`` in the agent's environment: every write to a peer's file goes to its owner at once
WRITE_BEHIND_ENV = "DUNIX_WRITE_BEHIND"
WRITE_BEHIND = os.environ.get(WRITE_BEHIND_ENV, "1") not in ("0", "off", "no")


@dataclass
class RemoteNode:
    """A name the kernel knows that a peer owns: asked of ``owner`` by ``path``."""

    owner: int
    path: str
    lookups: int
    attrs: tuple[int, ...]
    #: its other names (hard links) seen here: asked when ``path`` is gone on the owner
    others: list[str] = field(default_factory=list)
    #: until when (time.monotonic) the owner's "no security.capability" answer stands
    no_caps_until: float = 0.0

    def caps_absent(self) -> bool:
        """Whether the file is known to have no ``security.capability`` xattr.

        Why: the kernel asks for it before every write to a FUSE file (file_remove_privs:
        a write drops file capabilities), so each 1 MiB write to a peer's file cost a
        message round trip to its owner. The owner's own kernel drops them when it does
        the write; the answer is kept as long as the kernel keeps attributes
        (``CAPS_TIMEOUT``), and forgotten when this host sets or removes an xattr.
        """
        return time.monotonic() < self.no_caps_until

    def caps_checked(self, absent: bool) -> None:
        self.no_caps_until = time.monotonic() + CAPS_TIMEOUT if absent else 0.0

    def promote(self, path: str) -> None:
        """``path`` worked where the primary did not: make it the primary."""
        if path != self.path:
            self.others = [p for p in self.others if p != path] + [self.path]
            self.path = path


class RemoteNodes:
    """The remote node table (see the module docstring)."""

    def __init__(self, remember: int = LAST_OWNERS) -> None:
        self._nodes: dict[int, RemoteNode] = {}
        self._by_path: dict[str, int] = {}
        self._last_owner: OrderedDict[str, int] = OrderedDict()
        self._remember = remember

    def get(self, ino: int) -> RemoteNode | None:
        return self._nodes.get(ino)

    def __contains__(self, ino: object) -> bool:
        return ino in self._nodes

    def by_path(self, path: str) -> RemoteNode | None:
        ino = self._by_path.get(path)
        return None if ino is None else self._nodes[ino]

    def remember(self, owner: int, path: str, attrs: tuple[int, ...]) -> None:
        """The kernel got one more reference to the peer's name ``path``."""
        ino = attrs[0]
        node = self._nodes.get(ino)
        if node is None:
            self._nodes[ino] = RemoteNode(owner, path, 1, attrs)
        else:
            node.lookups += 1
            node.owner, node.attrs = owner, attrs
            if path != node.path and path not in node.others:
                node.others.append(path)  # a hard link: one inode, several names
        self._by_path[path] = ino
        self._last_owner[path] = owner
        self._last_owner.move_to_end(path)
        if len(self._last_owner) > self._remember:
            self._last_owner.popitem(last=False)

    def forget(self, ino: int, count: int) -> bool:
        """The kernel dropped ``count`` references; False if ``ino`` is not remote."""
        node = self._nodes.get(ino)
        if node is None:
            return False
        node.lookups -= count
        if node.lookups <= 0:
            del self._nodes[ino]
            for path in (node.path, *node.others):
                if self._by_path.get(path) == ino:
                    del self._by_path[path]
        return True

    def moved(self, old: str, new: str) -> None:
        """Remote nodes at or below ``old`` are now at ``new`` (a rename)."""
        prefix = old + "/"

        def follow(path: str) -> str:
            return new + path[len(old) :] if path == old or path.startswith(prefix) else path

        for ino, node in self._nodes.items():
            for path in (node.path, *node.others):
                if follow(path) != path:
                    self._by_path.pop(path, None)
                    self._by_path[follow(path)] = ino
            node.path, node.others = follow(node.path), [follow(p) for p in node.others]
        self._last_owner.pop(old, None)

    def last_owner(self, path: str) -> int | None:
        """The owner ``path`` was last seen on, even if the kernel forgot it since."""
        return self._last_owner.get(path)

    def gone(self, path: str) -> None:
        """``path`` was removed (or its owner says it is not there)."""
        self._last_owner.pop(path, None)
        node = self.by_path(path)
        if node is not None and node.others:
            if node.path == path:
                node.path = node.others.pop(0)
            else:
                node.others = [p for p in node.others if p != path]
            del self._by_path[path]


Call = Callable[..., Awaitable[FileReply]]


@dataclass
class _Block:
    ready: trio.Event = field(default_factory=trio.Event)
    data: bytes | bytearray = b""
    error: BaseException | None = None


@dataclass
class RemoteFile:
    """A file open on its owner (``handle`` there), read in blocks with one ahead."""

    owner: int
    handle: int
    path: str
    blocks: dict[int, _Block] = field(default_factory=dict)
    flags: int = 0  # as opened (to open it again on the host that took the file over)
    #: the file became this host's own (it took it over from a dead owner): read it here
    local_fd: int | None = None
    #: the start of a short block seen (the end of the file then): nothing is read ahead
    #: past it, though a read there still asks (the file may have grown)
    eof: int | None = None
    #: the kernel's inode number of the file (its other open files wait for our writes)
    inode: int = 0
    #: written here, not sent yet: the pieces ``gathered`` (``gathered_size`` bytes in all)
    #: at ``gathered_at``, sent as they came (joining them would copy every byte once more)
    gathered: list[bytes] = field(default_factory=list)
    gathered_size: int = 0
    gathered_at: int = 0
    #: counts the batches begun, so a batch's linger timer knows it is still the same one
    batches: int = 0
    #: batches on their way to the owner, oldest first (set when each is answered)
    flying: list[trio.Event] = field(default_factory=list)
    #: why a gathered write failed, raised by the next write, flush, fsync or drain
    write_error: BaseException | None = None

    async def read(
        self, call: Call, off: int, size: int, nursery: trio.Nursery | None
    ) -> bytes | memoryview:
        """``size`` bytes at ``off``; ``call`` is ``OwnerFiles.call``; read-ahead runs in
        ``nursery`` (none: no read-ahead). A piece of one block is a view of it, not a copy
        (pyfuse3 takes any buffer)."""
        start = off - off % FETCH
        data = await self._block(call, start)
        piece: bytes | memoryview = memoryview(data)[off - start : off - start + size]
        if len(piece) < size and len(data) == FETCH:
            piece = bytes(piece) + (await self._block(call, start + FETCH))[: size - len(piece)]
        for old in [b for b in self.blocks if b < start]:
            del self.blocks[old]
        if len(data) == FETCH and nursery is not None:  # a short block is the end of file
            for n in range(1, READ_AHEAD + 1):
                ahead = start + n * FETCH
                if self.eof is not None and ahead > self.eof:
                    break
                if ahead not in self.blocks:
                    block = self.blocks[ahead] = _Block()
                    nursery.start_soon(self._fetch, call, ahead, block)
        return piece

    def behind(self) -> bool:
        """Whether writes made here have not all reached the owner yet."""
        return bool(self.gathered or self.flying)

    async def write(self, call: Call, off: int, data: bytes, nursery: trio.Nursery | None) -> int:
        """Write ``data`` at ``off``: gathered, and sent in batches of ``WRITE_BATCH``.

        Why: one 1 MiB request to the owner per write kept the writing host waiting for
        each answer, and each cost the owner a request of its own (a thread hop and an
        invalidation of its kernel's cache). The data is at the owner after flush (every
        close), fsync, a lock request, before this host reads or stats the file, and at
        most ``WRITE_LINGER`` after the write in any case (other hosts see it then); a
        failed batch's error comes back from the next write, flush or fsync.
        Writes go one by one (after the gathered ones) for an ``O_APPEND`` open (each
        append lands at the owner's end of file, which may be another host's), without a
        nursery for background sends, and when not sequential (so overlapping writes land
        in order), and with ``DUNIX_WRITE_BEHIND=0``.
        """
        self._raise_write_error()
        self.changed()
        if nursery is None or self.flags & os.O_APPEND or not WRITE_BEHIND:
            await self.drain(call)
            reply = await call(self.owner, "write", handle=self.handle, offset=off, data=data)
            return int(reply.size)
        while self.gathered:  # checked again after each wait: other writes run meanwhile
            if off != self.gathered_at + self.gathered_size:
                await self.drain(call)
            elif self.gathered_size + len(data) > WRITE_BATCH:  # one lane request per batch
                await self._launch(call, nursery)
            else:
                break
        if not self.gathered:
            self.gathered_at = off
            self.batches += 1
            nursery.start_soon(self._linger, call, nursery, self.batches)
        self.gathered.append(data)
        self.gathered_size += len(data)
        if self.gathered_size >= WRITE_BATCH:
            await self._launch(call, nursery)
        return len(data)

    async def _launch(self, call: Call, nursery: trio.Nursery) -> None:
        """What is gathered goes to the owner in the background, once fewer than
        ``WRITES_IN_FLIGHT`` batches are on their way."""
        while len(self.flying) >= WRITES_IN_FLIGHT:
            await self.flying[0].wait()
        if self.gathered:  # another write may have sent it meanwhile
            nursery.start_soon(self._send, call, *self._take())

    async def _linger(self, call: Call, nursery: trio.Nursery, batch: int) -> None:
        """Send batch ``batch`` after ``WRITE_LINGER`` if it is still being gathered."""
        await trio.sleep(WRITE_LINGER)
        if self.batches == batch and self.gathered:
            await self._launch(call, nursery)

    async def drain(self, call: Call, *, report: bool = True) -> None:
        """Every write made here is at the owner when this returns; raises the error of a
        failed one (once) unless ``report`` is False (another file of the inode waits)."""
        if self.gathered:
            await self._send(call, *self._take())
        while self.flying:
            await self.flying[0].wait()
        if report:
            self._raise_write_error()

    def _take(self) -> tuple[int, tuple[bytes, ...], trio.Event]:
        at, data = self.gathered_at, tuple(self.gathered)
        self.gathered, self.gathered_size = [], 0
        done = trio.Event()
        self.flying.append(done)
        return at, data, done

    async def _send(self, call: Call, at: int, data: tuple[bytes, ...], done: trio.Event) -> None:
        """One batch to the owner: its pieces as they are (bulk.Pieces; the message path
        joins them)."""
        size = sum(len(piece) for piece in data)
        try:
            reply = await call(self.owner, "write", handle=self.handle, offset=at, data=data)
            if reply.size != size:  # a regular file writes short only when full
                raise OSError(errno.ENOSPC, f"the owner wrote {reply.size} of {size} bytes")
        except (OSError, DunixError, pyfuse3.FUSEError) as exc:
            if self.write_error is None:
                self.write_error = exc
        except trio.Cancelled:  # the mount is going away: a drain waiting for it must fail
            if self.write_error is None:
                self.write_error = OSError(errno.EIO, "a gathered write was cancelled")
            raise
        finally:
            self.flying.remove(done)
            done.set()

    def _raise_write_error(self) -> None:
        error, self.write_error = self.write_error, None
        if error is not None:
            raise error

    def changed(self) -> None:
        """This host wrote or truncated the file: the blocks read so far are stale."""
        self.blocks.clear()
        self.eof = None

    async def _block(self, call: Call, start: int) -> bytes | bytearray:
        block = self.blocks.get(start)
        if block is None:
            block = self.blocks[start] = _Block()
            await self._fetch(call, start, block)
        else:
            await block.ready.wait()
        if block.error is not None:
            raise block.error
        return block.data

    async def _fetch(self, call: Call, start: int, block: _Block) -> None:
        try:
            reply = await call(self.owner, "read", handle=self.handle, offset=start, size=FETCH)
            block.data = reply.data
            if len(reply.data) < FETCH and (self.eof is None or start < self.eof):
                self.eof = start
            elif len(reply.data) == FETCH and self.eof is not None and start >= self.eof:
                self.eof = None  # it grew
        except (OSError, DunixError, pyfuse3.FUSEError) as exc:
            block.error = exc
            if self.blocks.get(start) is block:
                del self.blocks[start]  # the next read asks again
        finally:
            block.ready.set()
