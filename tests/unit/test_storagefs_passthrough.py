"""storagefs passthrough bookkeeping (dunix/storagefs/passthrough.py) against a fake library.

The kernel's rules it must keep: one backing id per inode while any of its files is open,
closed only after the last handle given it is released; an inode opened the plain way stays
plain while open (the kernel fails a mixed open with EIO); a refused backing id turns
passthrough off for the mount.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from dunix.storagefs.passthrough import Passthrough

HOOKED_OFFERED_ASKED = 7


class FakeLibrary:
    """The C side's exported functions, recording what Python asked."""

    def __init__(self, state: int = HOOKED_OFFERED_ASKED, refuse: int = 0) -> None:
        self.state = state
        self.refuse = refuse
        self.next_id = 1
        self.open_ids: set[int] = set()
        self.given: list[tuple[int, int]] = []
        self.nocaps: set[int] = set()

    def dunix_pt_state(self) -> int:
        return self.state

    def dunix_pt_open(self, fd: int) -> int:
        os.fstat(fd)  # a live descriptor
        if self.refuse:
            return -self.refuse
        backing_id, self.next_id = self.next_id, self.next_id + 1
        self.open_ids.add(backing_id)
        return backing_id

    def dunix_pt_close(self, backing_id: int) -> int:
        self.open_ids.remove(backing_id)
        return 0

    def dunix_pt_give(self, fh: int, backing_id: int) -> None:
        assert backing_id in self.open_ids
        self.given.append((fh, backing_id))

    def dunix_pt_nocaps(self, ino: int, on: int) -> None:
        (self.nocaps.add if on else self.nocaps.discard)(ino)


@pytest.fixture
def backing(tmp_path: Path) -> str:
    path = tmp_path / "f"
    path.write_bytes(b"x")
    return str(path)


def test_one_backing_id_per_inode_while_open(backing: str) -> None:
    lib = FakeLibrary()
    pt = Passthrough(lib)  # type: ignore[arg-type]
    assert pt.open(10, 100, backing) and pt.open(10, 101, backing)
    assert lib.given == [(100, 1), (101, 1)]
    assert 10 in lib.nocaps  # no security.capability on a fresh file
    pt.released(100)
    assert lib.open_ids == {1}  # 101 still open: the kernel still uses it
    pt.released(101)
    assert lib.open_ids == set() and 10 not in lib.nocaps
    assert pt.open(10, 102, backing)  # a new open cycle gets a new id
    assert lib.given[-1] == (102, 2)
    assert pt.direct(10) and not pt.direct(11)


def test_plain_inode_stays_plain_while_open(backing: str) -> None:
    lib = FakeLibrary()
    pt = Passthrough(lib)  # type: ignore[arg-type]
    pt.plain(20, 200)  # a replicated file: Python's path
    assert not pt.open(20, 201, backing)  # mixing would be EIO in the kernel
    assert lib.given == []
    pt.released(200)
    assert not pt.open(20, 202, backing)  # 201 is still open the plain way
    pt.released(201)
    pt.released(202)
    assert pt.open(20, 203, backing)


def test_open_passthrough_inode_keeps_its_id_even_if_refused_later(backing: str) -> None:
    lib = FakeLibrary()
    pt = Passthrough(lib)  # type: ignore[arg-type]
    assert pt.open(30, 300, backing)
    pt._disabled = "test"  # refused meanwhile: an inode already open must not go plain
    assert pt.open(30, 301, backing)
    assert not pt.open(31, 310, backing)


def test_refused_backing_turns_it_off_and_says_why(backing: str) -> None:
    lib = FakeLibrary(refuse=errno.EPERM)
    pt = Passthrough(lib)  # type: ignore[arg-type]
    assert not pt.open(40, 400, backing)
    assert "refused" in pt.describe() and os.strerror(errno.EPERM) in pt.describe()
    lib.refuse = 0
    assert not pt.open(41, 410, backing)  # the whole mount stays on the Python path


def test_not_asked_at_init_means_python_path(backing: str) -> None:
    for state, words in ((0, "loaded before"), (1, "offers no FUSE passthrough")):
        lib = FakeLibrary(state=state)
        pt = Passthrough(lib)  # type: ignore[arg-type]
        assert not pt.open(50, 500, backing)
        assert words in pt.describe()


def test_unopenable_backing_file_stays_plain(tmp_path: Path) -> None:
    lib = FakeLibrary()
    pt = Passthrough(lib)  # type: ignore[arg-type]
    assert not pt.open(60, 600, str(tmp_path / "gone"))
    assert lib.given == [] and "pass through" in pt.describe()  # still on for others


def test_turned_off_it_loads_nothing_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    from dunix.storagefs import passthrough

    monkeypatch.setattr(passthrough, "_off", None)
    monkeypatch.setattr(passthrough, "_library", None)
    passthrough.turn_off("DUNIX_FUSE_PASSTHROUGH=0")
    assert passthrough.preload() is None
    pt = Passthrough()
    assert "turned off: DUNIX_FUSE_PASSTHROUGH=0" in pt.describe()
    assert not pt.open(5, 10, "/proc/self/fd/0") and not pt.direct(5)


def test_peers_files_go_direct_io_only_when_shared_mmaps_still_work() -> None:
    """FUSE_DIRECT_IO_ALLOW_MMAP asked at INIT (state bit 16): else a MAP_SHARED mmap of a
    direct_io file fails with ENODEV, so peers' files keep the page cache."""
    assert not Passthrough(FakeLibrary()).shared_mmap_direct()  # type: ignore[arg-type]
    assert Passthrough(FakeLibrary(state=7 | 16)).shared_mmap_direct()  # type: ignore[arg-type]
    assert Passthrough(FakeLibrary(state=1 | 8 | 16)).shared_mmap_direct()  # type: ignore[arg-type]
