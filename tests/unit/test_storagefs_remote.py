"""StorageFS serving files a peer owns, without a mount: two hosts' stores wired in memory.

Host 2's StorageFS asks host 1's FileServer (through PeerFiles) for everything host 1 owns;
the e2e test (tests/e2e/test_storagefs_cluster.py) does the same through real mounts.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyfuse3
import pytest
import trio

from dunix.pid.devino import split_ino
from dunix.storagefs.fs import ROOT, StorageFS
from dunix.storagefs.lookup import LookupQuery, LookupReply, reply_for
from dunix.storagefs.peerfiles import BLOCK, FileMessage, FileReply, FileServer, PeerFiles
from dunix.storagefs.remote_nodes import FETCH, READ_AHEAD
from dunix.storagefs.store import LocalStore

CTX: Any = SimpleNamespace(uid=0, gid=0, pid=1, umask=0o022)


class Net:
    """Host 1 (owner) and host 2 (asker), each a store, a file server and a StorageFS."""

    def __init__(self, tmp: Path) -> None:
        self.stores = {n: LocalStore(tmp / f"n{n}", n) for n in (1, 2)}
        self.servers = {n: FileServer(s) for n, s in self.stores.items()}
        self.files = {n: PeerFiles(n, self._sender(n), timeout=5) for n in (1, 2)}
        self.up = {1, 2}
        self.fs = {
            n: StorageFS(self.stores[n], Finder(self, n), files=self.files[n], peers=self.peers)
            for n in (1, 2)
        }

    def peers(self) -> list[int]:
        return sorted(self.up)

    def _sender(self, me: int) -> Any:
        async def send(peer: int, msg: FileMessage) -> None:
            if peer not in self.up:
                raise OSError(errno.ECONNREFUSED, "down")
            assert not isinstance(msg, FileReply)
            reply = await self.servers[peer].handle(msg)
            self.files[me].received(reply)

        return send

    def close(self) -> None:
        for store in self.stores.values():
            store.close()


class Finder:
    def __init__(self, net: Net, me: int) -> None:
        self.net, self.me = net, me

    async def lookup(self, path: str) -> LookupReply | None:
        for node, store in self.net.stores.items():
            if node == self.me or node not in self.net.up:
                continue
            try:
                st = os.lstat(store.backing_path(path))
            except FileNotFoundError:
                continue
            return reply_for(LookupQuery(1, self.me, path), node, st, store.inode_number(st))
        return None

    def created(self, path: str) -> None:
        pass


@pytest.fixture
def net(tmp_path: Path) -> Any:
    n = Net(tmp_path)
    yield n
    n.close()


def run(fn: Any, *args: Any) -> Any:
    async def call() -> Any:
        return await fn(*args)

    return trio.run(call)


def owned_by_1(net: Net, path: str, data: bytes) -> None:
    backing = net.stores[1].backing_path(path)
    backing.parent.mkdir(parents=True, exist_ok=True)
    backing.write_bytes(data)


def test_read_and_write_a_peer_file_in_blocks(net: Net) -> None:
    data = os.urandom(BLOCK * 2 + 123)
    owned_by_1(net, "d/big", data)
    fs = net.fs[2]
    d = run(fs.lookup, ROOT, b"d", CTX)
    assert split_ino(d.st_ino).node_id == 1
    f = run(fs.lookup, d.st_ino, b"big", CTX)
    assert split_ino(f.st_ino).node_id == 1 and f.st_size == len(data)
    info = run(fs.open, f.st_ino, os.O_RDWR, CTX)
    got = b"".join(run(fs.read, info.fh, off, 131072) for off in range(0, len(data), 131072))
    assert got == data
    assert run(fs.read, info.fh, BLOCK - 10, 20) == data[BLOCK - 10 : BLOCK + 10]
    assert run(fs.write, info.fh, 5, b"XYZ") == 3
    assert run(fs.read, info.fh, 0, 10) == data[:5] + b"XYZ" + data[8:10]
    run(fs.release, info.fh)
    assert net.servers[1].open_handles() == 0
    assert net.stores[1].backing_path("d/big").read_bytes()[5:8] == b"XYZ"


def test_metadata_of_a_peer_file(net: Net) -> None:
    owned_by_1(net, "f", b"hello")
    fs = net.fs[2]
    f = run(fs.lookup, ROOT, b"f", CTX)
    fields: Any = SimpleNamespace(
        update_size=True, update_mode=True, update_uid=False, update_gid=False,
        update_atime=False, update_mtime=False,
    )  # fmt: skip
    attr = pyfuse3.EntryAttributes()
    attr.st_mode = 0o100600
    attr.st_size = 2
    out = run(fs.setattr, f.st_ino, attr, fields, None, CTX)
    assert out.st_mode & 0o777 == 0o600 and out.st_size == 2
    assert net.stores[1].backing_path("f").read_bytes() == b"he"
    assert run(fs.getattr, f.st_ino, CTX).st_size == 2


def test_listing_merges_hosts_and_create_in_a_peer_folder_stays_here(net: Net) -> None:
    owned_by_1(net, "d/one", b"1")
    fs = net.fs[2]
    d = run(fs.lookup, ROOT, b"d", CTX)
    info, entry = run(fs.create, d.st_ino, b"two", 0o100644, os.O_WRONLY, CTX)
    run(fs.release, info.fh)
    assert split_ino(entry.st_ino).node_id == 2
    assert net.stores[2].backing_path("d/two").exists()
    names = sorted(listing(fs, d.st_ino))
    assert names == [b".", b"..", b"one", b"two"]
    assert sorted(listing(net.fs[1], run(net.fs[1].lookup, ROOT, b"d", CTX).st_ino)) == names


def listing(fs: StorageFS, ino: int) -> list[bytes]:
    names: list[bytes] = []

    def reply(token: Any, name: bytes, attr: Any, next_id: int) -> bool:
        names.append(name)
        return True

    async def go() -> None:
        fh = await fs.opendir(ino, CTX)
        original = pyfuse3.readdir_reply
        pyfuse3.readdir_reply = reply
        try:
            await fs.readdir(fh, 0, None)  # type: ignore[arg-type]
        finally:
            pyfuse3.readdir_reply = original
            await fs.releasedir(fh)

    trio.run(go)
    return names


def test_unlink_rename_and_rmdir_go_to_the_owner(net: Net) -> None:
    owned_by_1(net, "d/a", b"A")
    (net.stores[2].tree / "b").write_bytes(b"old b on node 2")
    fs = net.fs[2]
    d = run(fs.lookup, ROOT, b"d", CTX)
    run(fs.lookup, d.st_ino, b"a", CTX)
    run(fs.rename, d.st_ino, b"a", ROOT, b"b", 0, CTX)
    assert net.stores[1].backing_path("b").read_bytes() == b"A"  # stays with its owner
    assert not net.stores[2].backing_path("b").exists()  # the replaced target is gone
    run(fs.unlink, ROOT, b"b", CTX)
    assert not net.stores[1].backing_path("b").exists()
    run(fs.rmdir, ROOT, b"d", CTX)
    assert not net.stores[1].backing_path("d").exists()
    with pytest.raises(pyfuse3.FUSEError) as err:
        run(fs.lookup, ROOT, b"d", CTX)
    assert err.value.errno == errno.ENOENT


def test_rmdir_of_a_folder_not_empty_on_a_peer(net: Net) -> None:
    owned_by_1(net, "d/a", b"A")
    (net.stores[2].tree / "d").mkdir()
    with pytest.raises(pyfuse3.FUSEError) as err:
        run(net.fs[2].rmdir, ROOT, b"d", CTX)
    assert err.value.errno == errno.ENOTEMPTY
    assert net.stores[2].backing_path("d").exists()


def test_an_unreachable_owner_gives_eio(net: Net) -> None:
    owned_by_1(net, "f", b"x")
    fs = net.fs[2]
    f = run(fs.lookup, ROOT, b"f", CTX)
    net.up.discard(1)
    with pytest.raises(pyfuse3.FUSEError) as err:
        run(fs.getattr, f.st_ino, CTX)
    assert err.value.errno == errno.EIO
    with pytest.raises(pyfuse3.FUSEError) as err:
        run(fs.open, f.st_ino, os.O_RDONLY, CTX)
    assert err.value.errno == errno.EIO
    # the kernel forgot it (a failed revalidation does): a new lookup is still EIO
    run(fs.forget, [(f.st_ino, 1)])
    with pytest.raises(pyfuse3.FUSEError) as err:
        run(fs.lookup, ROOT, b"f", CTX)
    assert err.value.errno == errno.EIO
    net.up.add(1)
    (net.stores[1].tree / "f").unlink()  # gone for real: now it is ENOENT
    with pytest.raises(pyfuse3.FUSEError) as err:
        run(fs.lookup, ROOT, b"f", CTX)
    assert err.value.errno == errno.ENOENT


def test_peer_gone_ends_a_waiting_call() -> None:
    async def main() -> None:
        async def never(peer: int, msg: FileMessage) -> None:
            pass

        files = PeerFiles(2, never, timeout=60)
        async with trio.open_nursery() as nursery:

            async def ask() -> None:
                with pytest.raises(Exception, match="left"):
                    await files.call(1, "stat", path="x")

            nursery.start_soon(ask)
            await trio.sleep(0.01)
            files.peer_gone(1)

    trio.run(main)


def test_server_refuses_paths_leaving_the_tree(tmp_path: Path) -> None:
    from dunix.storagefs.peerfiles import FileRequest

    with LocalStore(tmp_path, 1) as store:
        reply = trio.run(FileServer(store).handle, FileRequest(1, 2, "stat", path="../etc"))
        assert reply.error == errno.EINVAL
        reply = trio.run(FileServer(store).handle, FileRequest(1, 2, "nope"))
        assert reply.error == errno.ENOSYS


def test_xattrs_of_a_peer_file(net: Net) -> None:
    owned_by_1(net, "x", b"data")
    try:
        os.setxattr(net.stores[1].backing_path("x"), "user.probe", b"1")
    except OSError as exc:
        pytest.skip(f"no user xattrs on {net.stores[1].root}: {exc.strerror}")
    fs = net.fs[2]
    x = run(fs.lookup, ROOT, b"x", CTX)
    run(fs.setxattr, x.st_ino, b"user.color", b"blue", CTX)
    assert os.getxattr(net.stores[1].backing_path("x"), "user.color") == b"blue"
    assert run(fs.getxattr, x.st_ino, b"user.color", CTX) == b"blue"
    assert sorted(run(fs.listxattr, x.st_ino, CTX)) == [b"user.color", b"user.probe"]
    run(fs.removexattr, x.st_ino, b"user.color", CTX)
    with pytest.raises(pyfuse3.FUSEError) as err:
        run(fs.getxattr, x.st_ino, b"user.color", CTX)
    assert err.value.errno == errno.ENODATA


def test_read_ahead_fetches_the_next_blocks_in_the_background(net: Net) -> None:
    data = os.urandom(FETCH * 4 + 5)
    owned_by_1(net, "ra", data)
    fs = net.fs[2]
    reads: list[int] = []
    handle = net.servers[1].handle

    async def counting(req: Any) -> FileReply:
        if req.op == "read":
            reads.append(req.offset // FETCH)
        return await handle(req)

    net.servers[1].handle = counting  # type: ignore[method-assign]

    async def main() -> bytes:
        f = await fs.lookup(ROOT, b"ra", CTX)
        info = await fs.open(f.st_ino, os.O_RDONLY, CTX)
        out = []
        async with trio.open_nursery() as nursery:
            fs.nursery = nursery
            await fs.read(info.fh, 0, 1000)
            await trio.sleep(0.05)  # the read-ahead runs while nobody reads
            assert sorted(reads) == list(range(READ_AHEAD + 1))
            for off in range(0, len(data), 131072):
                out.append(await fs.read(info.fh, off, 131072))
            await fs.release(info.fh)
            fs.nursery = None
        return b"".join(out)

    assert trio.run(main) == data
    # each block asked for once; the one past the end only if asked ahead before the short
    # one (the end) was seen, none further
    assert len(reads) == len(set(reads)) and sorted(reads)[:5] == [0, 1, 2, 3, 4]
    assert max(reads) <= 5


def test_server_refuses_a_path_through_a_symlink_out_of_the_tree(tmp_path: Path) -> None:
    from dunix.storagefs.peerfiles import FileRequest

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("no")
    with LocalStore(tmp_path / "store", 1) as store:
        (store.tree / "escape").symlink_to(outside)
        (store.tree / "link-to-file").symlink_to(outside / "secret")
        server = FileServer(store)
        for op, path in (("stat", "escape/secret"), ("open", "escape/secret")):
            reply = trio.run(server.handle, FileRequest(1, 2, op, path=path))
            assert reply.error == errno.EINVAL, (op, reply)
        reply = trio.run(server.handle, FileRequest(1, 2, "open", path="link-to-file"))
        assert reply.error == errno.ELOOP
        reply = trio.run(server.handle, FileRequest(1, 2, "readlink", path="link-to-file"))
        assert reply.data == os.fsencode(outside / "secret")


def test_a_hard_linked_peer_file_survives_the_removal_of_one_name(net: Net) -> None:
    owned_by_1(net, "h1", b"linked")
    os.link(net.stores[1].backing_path("h1"), net.stores[1].backing_path("h2"))
    fs = net.fs[2]
    first = run(fs.lookup, ROOT, b"h1", CTX)
    assert run(fs.lookup, ROOT, b"h2", CTX).st_ino == first.st_ino
    net.stores[1].backing_path("h1").unlink()  # another host removed the first name
    assert run(fs.getattr, first.st_ino, CTX).st_nlink == 1
    info = run(fs.open, first.st_ino, os.O_RDONLY, CTX)
    assert run(fs.read, info.fh, 0, 100) == b"linked"
    run(fs.release, info.fh)


def test_a_folder_renamed_on_its_owner_is_asked_by_its_new_name(net: Net) -> None:
    """The owner renamed a folder (or its disk gave the number to a new one): host 2 finds
    the same inode number under the new name, so that name, and the paths of what it
    knows below it, are what it asks from now on (the kernel moved its cached entries)."""
    owned_by_1(net, "src/sub/f", b"one")
    fs = net.fs[2]
    src = run(fs.lookup, ROOT, b"src", CTX)
    sub = run(fs.lookup, src.st_ino, b"sub", CTX)
    f = run(fs.lookup, sub.st_ino, b"f", CTX)
    os.rename(net.stores[1].backing_path("src/sub"), net.stores[1].backing_path("dst"))
    assert run(fs.lookup, ROOT, b"dst", CTX).st_ino == sub.st_ino
    # the file's entry, cached under the folder the kernel moved, opens by its new path
    info = run(fs.open, f.st_ino, os.O_RDONLY, CTX)
    assert run(fs.read, info.fh, 0, 10) == b"one"
    run(fs.release, info.fh)
    assert run(fs.lookup, sub.st_ino, b"f", CTX).st_ino == f.st_ino
    # a new file in it is made under the new name (here: this host creates its part)
    created, _ = run(fs.create, sub.st_ino, b"g", 0o100644, os.O_WRONLY, CTX)
    run(fs.release, created.fh)
    assert net.stores[2].backing_path("dst/g").exists()
    assert not net.stores[2].backing_path("src").exists()
    with pytest.raises(pyfuse3.FUSEError):
        run(fs.lookup, src.st_ino, b"sub", CTX)
