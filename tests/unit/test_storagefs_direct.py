"""Which opens of a peer's file go direct_io (storagefs.fs.peer_direct_io)."""

from __future__ import annotations

import os

import pytest

from dunix.storagefs.fs import peer_direct_io


@pytest.mark.parametrize(
    ("flags", "mode", "direct"),
    [
        (os.O_RDONLY, "writes", False),  # small reads keep the kernel's readahead
        (os.O_WRONLY | os.O_TRUNC, "writes", True),
        (os.O_RDWR, "writes", True),  # fio's write job opens O_RDWR
        (os.O_RDONLY, "all", True),
        (os.O_WRONLY, "none", False),
    ],
)
def test_by_access_mode_and_setting(flags: int, mode: str, direct: bool) -> None:
    assert peer_direct_io(flags, mode) is direct


def test_the_default_is_all(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DUNIX_PEER_DIRECT_IO", raising=False)
    assert peer_direct_io(os.O_RDONLY) is True
    assert peer_direct_io(os.O_WRONLY) is True
