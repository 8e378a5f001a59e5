import os
import sqlite3
from pathlib import Path

import pytest

from dunix.errors import ConfigError
from dunix.pid.devino import is_allocated, split_ino
from dunix.storagefs.store import FileMeta, LocalStore, StoreError, clean_relpath


def test_clean_relpath() -> None:
    assert clean_relpath("/a//b/./c/") == "a/b/c"
    assert clean_relpath("/") == ""
    for bad in ("a/../b", "..", "a\0b"):
        with pytest.raises(StoreError):
            clean_relpath(bad)


def test_layout_and_wal(tmp_path: Path) -> None:
    with LocalStore(tmp_path, 3) as store:
        assert store.tree.is_dir() and store.incoming.is_dir()
        assert store.backing_path("/x/y") == store.tree / "x/y"
        assert store.relpath_of(store.tree / "x/y") == "x/y"
        assert store.relpath_of(store.tree) == ""
        with pytest.raises(StoreError):
            store.relpath_of("/etc/passwd")
    db = sqlite3.connect(tmp_path / "meta.sqlite3")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_store_belongs_to_one_node(tmp_path: Path) -> None:
    LocalStore(tmp_path, 3).close()
    LocalStore(tmp_path, 3).close()
    with pytest.raises(StoreError, match="belongs to node 3"):
        LocalStore(tmp_path, 4)
    with pytest.raises(ConfigError):
        LocalStore(tmp_path, 0)


def test_inode_numbers_stable_and_shared_by_hard_links(tmp_path: Path) -> None:
    with LocalStore(tmp_path, 5) as store:
        a = store.tree / "a"
        a.write_bytes(b"x")
        os.link(a, store.tree / "b")
        ino = store.inode_number(a.stat())
        assert ino == store.inode_number((store.tree / "b").stat())
        assert split_ino(ino).node_id == 5
    with LocalStore(tmp_path, 5) as store:
        assert store.inode_number(a.stat()) == ino


def test_big_backing_inode_gets_a_persisted_counter(tmp_path: Path) -> None:
    with LocalStore(tmp_path, 2) as store:
        big = os.stat_result((0o100644, 2**60, store.tree_dev, 1, 0, 0, 0, 0, 0, 0))
        other = os.stat_result((0o100644, 2**63 + 7, store.tree_dev, 1, 0, 0, 0, 0, 0, 0))
        first = store.local_ino(big)
        second = store.local_ino(other)
        assert is_allocated(first) and is_allocated(second) and first != second
        assert store.local_ino(big) == first
    with LocalStore(tmp_path, 2) as store:
        assert store.local_ino(big) == first
        store.forget(big)
        assert store.local_ino(big) not in (first, second)


def test_incoming_file_invisible_until_commit(tmp_path: Path) -> None:
    with LocalStore(tmp_path, 1) as store:
        incoming = store.receive("d/e/f.bin", mode=0o640, mtime_ns=10**18)
        incoming.write(0, b"hello ")
        assert not store.backing_path("d/e/f.bin").exists()
        incoming.write(6, b"world")
        incoming.truncate(1 << 20)
        incoming.commit()
        target = store.backing_path("d/e/f.bin")
        st = target.stat()
        assert target.read_bytes()[:11] == b"hello world"
        assert st.st_size == 1 << 20 and st.st_mode & 0o777 == 0o640
        assert st.st_mtime_ns == 10**18
        assert not list(store.incoming.iterdir())
        with pytest.raises(StoreError):
            incoming.commit()


def test_incoming_aborted_by_exception(tmp_path: Path) -> None:
    with LocalStore(tmp_path, 1) as store:
        store.backing_path("f").write_bytes(b"old")
        with pytest.raises(RuntimeError), store.receive("f") as incoming:
            incoming.write(0, b"half of the new")
            raise RuntimeError("peer went away")
        assert store.backing_path("f").read_bytes() == b"old"
        assert not list(store.incoming.iterdir())


def test_interrupted_transfer_cleared_at_restart(tmp_path: Path) -> None:
    with LocalStore(tmp_path, 1) as store:
        incoming = store.receive("f")
        incoming.write(0, b"partial")
        # a crash: the process dies without commit or abort
        os.close(incoming.fd)
    with LocalStore(tmp_path, 1) as store:
        assert len(store.discarded) == 1
        assert not list(store.incoming.iterdir())
        assert not store.backing_path("f").exists()


def test_file_meta_defaults_rows_and_renames(tmp_path: Path) -> None:
    with LocalStore(tmp_path, 1) as store:
        assert store.file_meta("a/b") == FileMeta("a/b", 1)
        with store.receive("a/b", owner=4, replicas=(1, 2)) as incoming:
            incoming.write(0, b"replica")
        assert store.file_meta("a/b") == FileMeta("a/b", 4, (1, 2))
        store.renamed("a", "z")
        assert store.file_meta("z/b") == FileMeta("z/b", 4, (1, 2))
        assert store.file_meta("a/b") == FileMeta("a/b", 1)
        store.removed("z/b")
        assert store.file_meta("z/b").owner == 1


def test_folder_replication_factor(tmp_path: Path) -> None:
    with LocalStore(tmp_path, 1) as store:
        assert store.meta.folder_replicas("home/u/f") == 1
        store.meta.set_folder_replicas("home", 2)
        assert store.meta.folder_replicas("home/u/f") == 2
        assert store.meta.folder_replicas("homework") == 1
        with pytest.raises(ConfigError):
            store.meta.set_folder_replicas("x", 0)
    with LocalStore(tmp_path, 1) as store:
        assert store.meta.folder_replicas("home/u") == 2
