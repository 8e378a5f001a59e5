"""A reopened file's offset follows the guest's back home (remote.moved_offsets and
follow_offsets), so a parent sharing the description writes on after its child."""

from __future__ import annotations

import os
from pathlib import Path

from dunix.agent.remote import follow_offsets, moved_offsets


def test_only_moved_offsets_go_home_and_the_duplicates_close(tmp_path: Path) -> None:
    guest_side = tmp_path / "peer-copy"
    guest_side.write_bytes(b"first\nsecond\n")
    moved, still = os.open(guest_side, os.O_RDWR), os.open(guest_side, os.O_RDWR)
    files = [(1, os.dup(moved), 0), (4, os.dup(still), 0)]
    os.lseek(moved, 6, os.SEEK_SET)  # the guest read or wrote 6 bytes through fd 1
    dups = [dup for _, dup, _ in files]
    assert moved_offsets(files) == ((1, 6),)
    assert files == []
    for dup in dups:
        try:
            os.fstat(dup)
        except OSError:
            continue
        raise AssertionError(f"duplicate {dup} left open")
    os.close(moved)
    os.close(still)


def test_the_home_description_takes_the_offset(tmp_path: Path) -> None:
    path = tmp_path / "out"
    parent = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)  # the script's `> out`
    os.write(parent, b"first\n")
    dup = os.dup(parent)  # the home's pidfd_getfd duplicate: the same description
    with open(path, "r+b") as peer:  # the child's copy, reopened by path elsewhere
        peer.seek(6)
        peer.write(b"second\n")
    follow_offsets({1: dup, 2: -1}, ((1, 13), (7, 99)))  # fd 7 is not one of its files
    os.write(parent, b"third\n")
    assert path.read_bytes() == b"first\nsecond\nthird\n"
    os.close(dup)
    os.close(parent)
