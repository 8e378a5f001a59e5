"""Replicated storagefs files without a mount: three hosts' stores wired in memory.

Host 1 owns files created through its StorageFS; its replicas get every change before the
call returns; when host 1 is gone, its first live replica takes the file over. The e2e test
(tests/e2e/test_storagefs_replicas.py) does the same through real mounts and a killed agent.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from dunix.storagefs.fs import ROOT, StorageFS
from dunix.storagefs.lookup import LookupQuery, LookupReply, reply_for
from dunix.storagefs.peerfiles import FileMessage, FileReply, FileServer, PeerFiles
from dunix.storagefs.replicas import (
    FACTOR_XATTR,
    OPS,
    WHERE_XATTR,
    Replicas,
    choose,
    parse_where,
    successor,
)
from dunix.storagefs.store import FileMeta, LocalStore

CTX: Any = SimpleNamespace(uid=0, gid=0, pid=1, umask=0o022)
HOSTS = (1, 2, 3)


class Net:
    """Three hosts, each a store, a file server with its replicas, and a StorageFS."""

    def __init__(self, tmp: Path) -> None:
        self.up = set(HOSTS)
        self.stores = {n: LocalStore(tmp / f"n{n}", n) for n in HOSTS}
        self.files = {n: PeerFiles(n, self._sender(n), timeout=5) for n in HOSTS}
        self.servers = {n: FileServer(s) for n, s in self.stores.items()}
        self.replicas = {}
        self.fs = {}
        for n in HOSTS:
            rep = Replicas(self.stores[n], self.peers, self.files[n].call)
            self.replicas[n] = rep
            self.servers[n].extra_ops.update(dict.fromkeys(OPS, rep.serve))
            self.servers[n].after = rep.server_hook(self.servers[n])
            self.fs[n] = StorageFS(self.stores[n], Finder(self, n), files=self.files[n],
                                   peers=self.peers, replicas=rep)  # fmt: skip

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

    def kill(self, node: int) -> None:
        self.up.discard(node)
        for n in self.up:
            self.files[n].peer_gone(node)
            self.replicas[n].peer_gone(node)

    def close(self) -> None:
        for store in self.stores.values():
            store.close()


class Finder:
    """The lookup over the alive hosts' trees (what PeerResolver does over the network)."""

    def __init__(self, net: Net, me: int) -> None:
        self.net, self.me = net, me

    async def lookup(self, path: str) -> LookupReply | None:
        for node in sorted(self.net.up - {self.me}):
            store = self.net.stores[node]
            try:
                st = os.lstat(store.backing_path(path))
            except FileNotFoundError:
                continue
            return reply_for(LookupQuery(1, self.me, path), node, st, store.inode_number(st))
        return None

    def created(self, path: str) -> None:
        pass


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    n = Net(tmp_path)
    yield n
    n.close()


def run(fn: Any, *args: Any, **kwargs: Any) -> Any:
    async def call() -> Any:
        return await fn(*args, **kwargs)

    return trio.run(call)


def make_replicated_folder(net: Net, factor: int = 2) -> int:
    fs = net.fs[1]
    folder = run(fs.mkdir, ROOT, b"rep", 0o40755, CTX)
    run(fs.setxattr, folder.st_ino, FACTOR_XATTR.encode(), str(factor).encode(), CTX)
    return int(folder.st_ino)


def test_choose_and_successor_are_deterministic() -> None:
    picked = choose("a/b", 1, 3, [1, 2, 3, 4, 5])
    assert len(picked) == 2 and 1 not in picked
    assert picked == choose("a/b", 1, 3, [5, 4, 3, 2, 1])
    assert choose("a/b", 1, 1, [2, 3]) == ()
    assert choose("a/b", 1, 4, [1, 2]) == (2,)
    meta = FileMeta("a/b", 1, (3, 2))
    assert successor(meta, {2, 3}) == 3 and successor(meta, {2}) == 2
    assert successor(meta, {4}) is None


def test_factor_reaches_every_host_and_is_inherited(net: Net) -> None:
    folder = make_replicated_folder(net, 2)
    for n in HOSTS:
        assert net.replicas[n].factor_at("rep") == 2
        assert net.replicas[n].factor_at("rep/sub/deeper") == 2
        assert net.replicas[n].factor_at("other") == 1
    assert run(net.fs[1].getxattr, folder, FACTOR_XATTR.encode(), CTX) == b"2"


def test_writes_reach_the_replica_and_it_takes_over(net: Net) -> None:
    folder = make_replicated_folder(net, 2)
    fs = net.fs[1]
    info, entry = run(fs.create, folder, b"f", stat.S_IFREG | 0o640, os.O_RDWR, CTX)
    data = os.urandom(300_000)
    assert run(fs.write, info.fh, 0, data) == len(data)
    assert run(fs.write, info.fh, 10, b"XYZ") == 3
    run(fs.fsync, info.fh, False)
    run(fs.release, info.fh)
    expect = data[:10] + b"XYZ" + data[13:]
    where = parse_where(run(fs.getxattr, entry.st_ino, WHERE_XATTR.encode(), CTX))
    assert where[0] == 1 and len(where) == 2
    replica = where[1]
    copy = net.stores[replica].replica_path("rep/f")
    assert copy.read_bytes() == expect
    assert copy.stat().st_mtime_ns == net.stores[1].backing_path("rep/f").stat().st_mtime_ns
    assert stat.S_IMODE(copy.stat().st_mode) == 0o640
    assert not net.stores[replica].backing_path("rep/f").exists()  # not its file yet
    net.kill(1)
    assert net.stores[replica].backing_path("rep/f").read_bytes() == expect
    assert not copy.exists()
    assert net.replicas[replica].where("rep/f") == (replica,)


def test_peer_writes_truncate_rename_and_unlink_follow(net: Net) -> None:
    folder = make_replicated_folder(net, 3)
    info, _ = run(net.fs[1].create, folder, b"g", stat.S_IFREG | 0o644, os.O_RDWR, CTX)
    run(net.fs[1].write, info.fh, 0, b"hello world")
    run(net.fs[1].release, info.fh)
    # host 2 writes host 1's file through host 1's file server
    opened = run(net.files[2].call, 1, "open", path="rep/g", flags=os.O_RDWR)
    run(net.files[2].call, 1, "write", handle=opened.handle, offset=0, data=b"J")
    run(net.files[2].call, 1, "release", handle=opened.handle)
    for n in (2, 3):
        assert net.stores[n].replica_path("rep/g").read_bytes() == b"Jello world"
    run(net.files[3].call, 1, "setattr", path="rep/g",
        setattr=(5, None, None, None, None, None))  # fmt: skip
    run(net.files[2].call, 1, "rename", path="rep/g", path2="rep/h")
    for n in (2, 3):
        assert net.stores[n].replica_path("rep/h").read_bytes() == b"Jello"
        assert not net.stores[n].replica_path("rep/g").exists()
    run(net.files[2].call, 1, "unlink", path="rep/h")
    for n in (2, 3):
        assert not net.stores[n].replica_path("rep/h").exists()
        assert net.stores[n].meta.all_file_meta() == []


def test_an_unreplicated_folder_stays_local_and_a_returning_owner_drops_its_copy(
    net: Net,
) -> None:
    info, _ = run(net.fs[1].create, ROOT, b"plain", stat.S_IFREG | 0o644, os.O_RDWR, CTX)
    run(net.fs[1].release, info.fh)
    assert all(not list(net.stores[n].replicas.iterdir()) for n in (2, 3))
    folder = make_replicated_folder(net, 2)
    info, _ = run(net.fs[1].create, folder, b"k", stat.S_IFREG | 0o644, os.O_RDWR, CTX)
    run(net.fs[1].write, info.fh, 0, b"v1")
    run(net.fs[1].release, info.fh)
    replica = net.replicas[1].copies("rep/k")[0]
    net.kill(1)
    assert net.stores[replica].backing_path("rep/k").read_bytes() == b"v1"
    # host 1 comes back (a new Replicas from its store, as a restarted agent has)
    net.up.add(1)
    back = Replicas(net.stores[1], net.peers, net.files[1].call)
    assert back.copies("rep/k") == (replica,)
    run(back.reconcile)
    assert not net.stores[1].backing_path("rep/k").exists()
    assert back.copies("rep/k") == ()


def test_the_heir_refills_the_set_with_a_whole_copy(net: Net) -> None:
    folder = make_replicated_folder(net, 2)
    info, _ = run(net.fs[1].create, folder, b"big", stat.S_IFREG | 0o600, os.O_RDWR, CTX)
    data = os.urandom(2 * (1 << 20) + 77)
    run(net.fs[1].write, info.fh, 0, data)
    run(net.fs[1].release, info.fh)
    heir = net.replicas[1].copies("rep/big")[0]
    other = ({2, 3} - {heir}).pop()
    net.kill(1)
    assert net.replicas[heir].copies("rep/big") == ()
    run(net.replicas[heir].refill)
    assert net.replicas[heir].copies("rep/big") == (other,)
    copy = net.stores[other].replica_path("rep/big")
    assert copy.read_bytes() == data and stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert net.stores[other].file_meta("rep/big") == FileMeta("rep/big", heir, (other,))
    assert not list(net.stores[other].incoming.iterdir())
    # and it is a full replica: the heir's writes reach it
    run(net.replicas[heir].wrote, "rep/big", 0, b"new")
    assert copy.read_bytes()[:3] == b"new"


def test_an_interrupted_copy_never_appears(net: Net) -> None:
    make_replicated_folder(net, 2)
    net.stores[1].backing_path("rep/half").write_bytes(b"x" * 100)
    first = run(net.files[1].call, 2, "rfill", path="rep/half", path2="2", offset=0,
                data=b"x" * 50, size=100, flags=1, setattr=(1, 0o100644, 0, 0, 0))  # fmt: skip
    assert first.error == 0
    assert len(list(net.stores[2].incoming.iterdir())) == 1
    assert not net.stores[2].replica_path("rep/half").exists()
    net.kill(1)  # the owner died in the middle of the copy
    assert not list(net.stores[2].incoming.iterdir())
    assert not net.stores[2].replica_path("rep/half").exists()
    assert net.stores[2].meta.all_file_meta() == []


def test_a_rename_over_a_replicated_file_drops_its_copies(net: Net) -> None:
    folder = make_replicated_folder(net, 2)
    names = [f"f{i}".encode() for i in range(12)]  # some pairs have different replicas
    for name in names:
        info, _ = run(net.fs[1].create, folder, name, stat.S_IFREG | 0o644, os.O_RDWR, CTX)
        run(net.fs[1].write, info.fh, 0, name)
        run(net.fs[1].release, info.fh)
    assert len({net.replicas[1].copies(f"rep/{n.decode()}") for n in names}) == 2
    for old, new in zip(names[::2], names[1::2], strict=True):
        run(net.fs[1].rename, folder, old, folder, new, 0, CTX)
        path = f"rep/{new.decode()}"
        held = {n for n in (2, 3) if net.stores[n].replica_path(path).exists()}
        assert held == set(net.replicas[1].copies(path))
        for n in held:
            assert net.stores[n].replica_path(path).read_bytes() == old
    for n in (2, 3):
        rows = {m.path for m in net.stores[n].meta.all_file_meta()}
        assert rows == {f"rep/{p.relative_to(net.stores[n].replicas / 'rep')}"
                        for p in (net.stores[n].replicas / "rep").iterdir()}  # fmt: skip


@pytest.mark.parametrize("reader_is_heir", [False, True])
def test_an_open_file_reads_on_from_the_host_that_took_it_over(
    net: Net, reader_is_heir: bool
) -> None:
    folder = make_replicated_folder(net, 2)
    data = os.urandom(3 * (1 << 20))
    info, _ = run(net.fs[1].create, folder, b"r", stat.S_IFREG | 0o644, os.O_RDWR, CTX)
    run(net.fs[1].write, info.fh, 0, data)
    run(net.fs[1].release, info.fh)
    heir = net.replicas[1].copies("rep/r")[0]
    reader = heir if reader_is_heir else ({2, 3} - {heir}).pop()
    fs = net.fs[reader]
    d = run(fs.lookup, ROOT, b"rep", CTX)
    f = run(fs.lookup, d.st_ino, b"r", CTX)
    opened = run(fs.open, f.st_ino, os.O_RDONLY, CTX)
    assert run(fs.read, opened.fh, 0, 1000) == data[:1000]
    net.kill(1)
    # the next read finds the owner gone and goes on from the heir, with the same handle
    assert run(fs.read, opened.fh, 2 << 20, 4096) == data[2 << 20 : (2 << 20) + 4096]
    attrs = run(fs.getattr, f.st_ino, CTX)  # (Python's read() of the rest fstats first)
    assert (attrs.st_ino, attrs.st_size) == (f.st_ino, len(data))
    run(fs.release, opened.fh)


def test_files_already_there_get_replicas_when_the_folder_gets_a_factor(net: Net) -> None:
    folder = run(net.fs[1].mkdir, ROOT, b"old", 0o40755, CTX)
    sub = run(net.fs[1].mkdir, folder.st_ino, b"sub", 0o40755, CTX)
    contents = {}
    for parent, name in ((folder, b"a"), (sub, b"b")):
        info, _ = run(net.fs[1].create, parent.st_ino, name, stat.S_IFREG | 0o640, os.O_RDWR,
                      CTX)  # fmt: skip
        contents[name] = os.urandom(3000)
        run(net.fs[1].write, info.fh, 0, contents[name])
        run(net.fs[1].release, info.fh)
    run(net.fs[1].symlink, folder.st_ino, b"link", b"a", CTX)
    rep = net.replicas[1]
    assert rep.copies("old/a") == () and rep.copies("old/sub/b") == ()
    run(net.fs[1].setxattr, folder.st_ino, FACTOR_XATTR.encode(), b"2", CTX)
    run(rep._scan_folders)
    run(rep.refill)
    for path, name in (("old/a", b"a"), ("old/sub/b", b"b")):
        (copy,) = rep.copies(path)
        assert net.stores[copy].replica_path(path).read_bytes() == contents[name]
        assert net.stores[copy].file_meta(path) == FileMeta(path, 1, (copy,))
    assert rep.copies("old/link") == ()  # symlinks are not replicated
    run(rep._scan_folders)  # nothing left to do: a second walk finds nothing
    assert not rep._s.short


def test_a_dead_replica_is_replaced_by_an_alive_host(net: Net) -> None:
    folder = make_replicated_folder(net, 2)
    info, _ = run(net.fs[1].create, folder, b"kept", stat.S_IFREG | 0o600, os.O_RDWR, CTX)
    run(net.fs[1].write, info.fh, 0, b"twice")
    run(net.fs[1].release, info.fh)
    (dead,) = net.replicas[1].copies("rep/kept")
    other = ({2, 3} - {dead}).pop()
    net.kill(dead)
    run(net.replicas[1].refill)
    # the dead one stays listed (asked when it comes back), an alive host holds a copy
    assert net.replicas[1].copies("rep/kept") == (dead, other)
    assert net.stores[other].replica_path("rep/kept").read_bytes() == b"twice"
