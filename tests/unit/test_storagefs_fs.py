"""StorageFS operations called directly (no mount): the inode table and the resolver hook.

The e2e test (tests/e2e/test_storagefs_local.py) covers the same through a real mount.
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
from dunix.storagefs.fs import ROOT, NoPeers, StorageFS
from dunix.storagefs.lookup import LookupReply
from dunix.storagefs.store import LocalStore

CTX: Any = SimpleNamespace(uid=1234, gid=5678, pid=1, umask=0o022)


class Finder:
    def __init__(self) -> None:
        self.asked: list[str] = []
        self.new_names: list[str] = []

    async def lookup(self, path: str) -> LookupReply | None:
        self.asked.append(path)
        return LookupReply(1, 9, path, True, 5, 0o100644, 3, 0) if path == "d/remote" else None

    def created(self, path: str) -> None:
        self.new_names.append(path)


@pytest.fixture
def fs(tmp_path: Path) -> Any:
    store = LocalStore(tmp_path, 7)
    yield StorageFS(store, Finder())
    store.close()


def run(fn: Any, *args: Any) -> Any:
    async def call() -> Any:
        return await fn(*args)

    return trio.run(call)


def test_create_write_read(fs: StorageFS) -> None:
    info, entry = run(fs.create, ROOT, b"f", 0o100640, os.O_RDWR, CTX)
    assert split_ino(entry.st_ino).node_id == 7
    assert entry.st_uid == 1234 and entry.st_gid == 5678 and entry.st_mode & 0o777 == 0o640
    assert run(fs.write, info.fh, 0, b"hello") == 5
    assert run(fs.read, info.fh, 1, 3) == b"ell"
    run(fs.fsync, info.fh, True)
    run(fs.release, info.fh)
    assert (fs.store.tree / "f").read_bytes() == b"hello"
    again = run(fs.lookup, ROOT, b"f", CTX)
    assert again.st_ino == entry.st_ino
    assert run(fs.getattr, entry.st_ino, CTX).st_size == 5


def test_folders_links_and_rename(fs: StorageFS) -> None:
    d = run(fs.mkdir, ROOT, b"d", 0o40755, CTX)
    assert d.st_uid == 1234
    _, f = run(fs.create, d.st_ino, b"a", 0o100644, os.O_WRONLY, CTX)
    linked = run(fs.link, f.st_ino, ROOT, b"b", CTX)
    assert linked.st_ino == f.st_ino and linked.st_nlink == 2
    s = run(fs.symlink, ROOT, b"s", b"d/a", CTX)
    assert run(fs.readlink, s.st_ino, CTX) == b"d/a"
    run(fs.rename, d.st_ino, b"a", ROOT, b"c", 0, CTX)
    assert run(fs.lookup, ROOT, b"c", CTX).st_ino == f.st_ino
    with pytest.raises(pyfuse3.FUSEError) as err:
        run(fs.rename, ROOT, b"c", ROOT, b"b", pyfuse3.RENAME_NOREPLACE, CTX)
    assert err.value.errno == errno.EEXIST
    run(fs.unlink, ROOT, b"c", CTX)
    run(fs.rmdir, ROOT, b"d", CTX)
    assert sorted(os.listdir(fs.store.tree)) == ["b", "s"]
    # every new name reaches the resolver, which tells the peers
    assert isinstance(fs.resolver, Finder)
    assert fs.resolver.new_names == ["d", "d/a", "b", "s", "c"]


def test_setgid_folder_gives_its_group(fs: StorageFS) -> None:
    d = run(fs.mkdir, ROOT, b"g", 0o42775, CTX)
    os.chown(fs.store.tree / "g", 0, 4242)
    os.chmod(fs.store.tree / "g", 0o2775)
    _, f = run(fs.create, d.st_ino, b"x", 0o100644, os.O_WRONLY, CTX)
    assert f.st_gid == 4242 and f.st_uid == 1234
    sub = run(fs.mkdir, d.st_ino, b"sub", 0o40755, CTX)  # and its subfolders are setgid too
    assert sub.st_gid == 4242 and sub.st_mode & 0o7777 == 0o2755


def test_missing_name_asks_the_resolver(fs: StorageFS) -> None:
    d = run(fs.mkdir, ROOT, b"d", 0o40755, CTX)
    with pytest.raises(pyfuse3.FUSEError) as err:
        run(fs.lookup, d.st_ino, b"nothing", CTX)
    assert err.value.errno == errno.ENOENT
    with pytest.raises(pyfuse3.FUSEError) as err:
        run(fs.lookup, d.st_ino, b"remote", CTX)
    assert err.value.errno == errno.EREMOTE  # found on node 9; serving it is the next step
    assert isinstance(fs.resolver, Finder) and fs.resolver.asked == ["d/nothing", "d/remote"]


def test_no_peers_resolver() -> None:
    assert trio.run(NoPeers().lookup, "x") is None


def test_forget_closes_descriptors(fs: StorageFS) -> None:
    _, f = run(fs.create, ROOT, b"f", 0o100644, os.O_WRONLY, CTX)
    run(fs.lookup, ROOT, b"f", CTX)
    fd = fs._nodes[f.st_ino].fd
    run(fs.forget, [(f.st_ino, 1)])
    assert f.st_ino in fs._nodes
    run(fs.forget, [(f.st_ino, 1), (ROOT, 5)])
    assert f.st_ino not in fs._nodes and ROOT in fs._nodes
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(pyfuse3.FUSEError) as err:
        run(fs.getattr, f.st_ino, CTX)
    assert err.value.errno == errno.ESTALE


def test_dot_dot_of_root_is_root(fs: StorageFS) -> None:
    assert run(fs.lookup, ROOT, b"..", CTX).st_ino == ROOT


def test_statfs(fs: StorageFS) -> None:
    assert run(fs.statfs, CTX).f_namemax > 0


def test_lookup_in_a_removed_folder_asks_nobody(fs: StorageFS) -> None:
    d = run(fs.mkdir, ROOT, b"d", 0o40755, CTX)
    run(fs.rmdir, ROOT, b"d", CTX)
    with pytest.raises(pyfuse3.FUSEError) as err:
        run(fs.lookup, d.st_ino, b"x", CTX)
    assert err.value.errno == errno.ENOENT
    assert isinstance(fs.resolver, Finder) and fs.resolver.asked == []


def test_unexpected_errors_become_eio(fs: StorageFS) -> None:
    class Broken(Finder):
        async def lookup(self, path: str) -> LookupReply | None:
            raise KeyError(path)

    fs.resolver = Broken()
    with pytest.raises(pyfuse3.FUSEError) as err:
        run(fs.lookup, ROOT, b"x", CTX)
    assert err.value.errno == errno.EIO
