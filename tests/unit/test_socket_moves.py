"""Which sockets of a guest may move on with it (agent/migration.py ``_relayed_sockets``)."""

from __future__ import annotations

import os

import pytest

from dunix.agent.migration import _relayed_sockets
from dunix.agent.remote import Guest
from dunix.errors import MigrationFailed
from dunix.fdmove.inventory import FdInfo
from dunix.wire.migrate import MigrateSocket


def sock(fd: int, inode: int, flags: int = os.O_RDWR) -> FdInfo:
    return FdInfo(fd, "socket", f"socket:[{inode}]", None, inode, 0, flags)


def guest() -> Guest:
    g = Guest("n1-1-abc", "n1", 40)
    g.sockets.append((777, 11, 13, False))  # restored here from home, relayed
    return g


def test_a_relayed_socket_moves_on_with_its_streams_and_current_flags() -> None:
    fds = [sock(3, 777, os.O_RDWR | os.O_NONBLOCK)]
    assert _relayed_sockets(guest(), fds, "n1", "n3") == [
        (MigrateSocket(777, False, True, 11, 13), 3)
    ]
    assert _relayed_sockets(guest(), [], "n1", "n1") == []  # none held: home is fine


def test_a_socket_made_here_is_refused() -> None:
    with pytest.raises(MigrationFailed, match="holds a socket away from home"):
        _relayed_sockets(guest(), [sock(3, 777), sock(4, 888)], "n1", "n3")


def test_back_home_is_refused_with_the_reason() -> None:
    with pytest.raises(MigrationFailed, match=r"cannot move home.*cannot be put back"):
        _relayed_sockets(guest(), [sock(3, 777)], "n1", "n1")
