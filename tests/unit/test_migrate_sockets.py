"""dunix.migrate.sockets: which sockets are relayed, and the files.img rewrite."""

from __future__ import annotations

import os
import socket
import struct

from pycriu.images import pb

from dunix.migrate import images, sockets
from dunix.migrate.sockets import RelayedSocket, classify, dump_externals, rewrite_tcp_as_unix

FILES_MAGIC = 0x56303138  # criu/include/magic.h


def _image(*entries: object) -> bytes:
    out = struct.pack("<II", images.IMG_COMMON, FILES_MAGIC)
    for e in entries:
        body = e.SerializeToString()  # type: ignore[attr-defined]
        out += struct.pack("<I", len(body)) + body
    return out


def _entries(data: bytes) -> list[object]:
    pos, found = 8, []
    while pos < len(data):
        (size,) = struct.unpack_from("<I", data, pos)
        e = pb.file_entry()
        e.ParseFromString(data[pos + 4 : pos + 4 + size])
        found.append(e)
        pos += 4 + size
    return found


def _fown(fown: object, uid: int) -> None:
    for name in ("uid", "euid", "signum", "pid_type", "pid"):
        setattr(fown, name, uid if name.endswith("uid") else 0)


def _inet(file_id: int, ino: int) -> object:
    e = pb.file_entry(type=sockets.FD_INETSK, id=file_id)
    isk = e.isk
    isk.id, isk.ino, isk.family, isk.type, isk.proto = file_id, ino, 2, 1, 6
    isk.state, isk.src_port, isk.dst_port, isk.flags, isk.backlog = 1, 40000, 80, 0o4002, 0
    _fown(isk.fown, 1000)
    isk.opts.so_sndbuf, isk.opts.so_rcvbuf = 4096, 8192
    for name in ("so_snd_tmo_sec", "so_snd_tmo_usec", "so_rcv_tmo_sec", "so_rcv_tmo_usec"):
        setattr(isk.opts, name, 0)
    return e


def test_only_the_named_tcp_sockets_become_unix_stream_entries() -> None:
    reg = pb.file_entry(type=1, id=3)
    reg.reg.id, reg.reg.flags, reg.reg.pos, reg.reg.name = 3, 0, 0, "/etc/hosts"
    _fown(reg.reg.fown, 0)
    data = _image(reg, _inet(7, 777), _inet(8, 888))
    new, found = rewrite_tcp_as_unix(data, {777, 999})
    assert found == {7: 777}
    assert new[:8] == data[:8]
    first, moved, kept = _entries(new)
    assert first == reg and kept == _inet(8, 888)
    assert moved.type == sockets.FD_UNIXSK and moved.id == 7
    usk = moved.usk
    assert (usk.id, usk.ino, usk.type, usk.state, usk.peer) == (7, 777, socket.SOCK_STREAM, 1, 0)
    assert usk.flags == 0o4002 and usk.fown.uid == 1000 and usk.opts.so_rcvbuf == 8192
    assert usk.name == b"" and not moved.HasField("isk")
    assert usk.uflags == sockets.USK_CALLBACK  # no fake queuer waiting for a second end


def test_fdinfo_entries_of_rewritten_files_name_the_unix_type() -> None:
    def fd(file_id: int, kind: int, num: int) -> object:
        return pb.fdinfo_entry(id=file_id, flags=0, type=kind, fd=num)

    data = _image(fd(3, 1, 0), fd(7, sockets.FD_INETSK, 4), fd(8, sockets.FD_INETSK, 5))
    new = sockets.rewrite_fdinfo(data, {7})
    pos, kinds = 8, []
    while pos < len(new):
        (size,) = struct.unpack_from("<I", new, pos)
        e = pb.fdinfo_entry()
        e.ParseFromString(new[pos + 4 : pos + 4 + size])
        kinds.append((e.id, e.type, e.fd))
        pos += 4 + size
    assert kinds == [(3, 1, 0), (7, sockets.FD_UNIXSK, 4), (8, sockets.FD_INETSK, 5)]


def test_connected_stream_sockets_are_relayed_and_others_refused() -> None:
    a, b = socket.socketpair()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    client = socket.create_connection(server.getsockname())
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        plan = classify(5, a.fileno(), os.O_RDWR | os.O_NONBLOCK)
        assert plan == RelayedSocket(5, os.fstat(a.fileno()).st_ino, False, True)
        tcp = classify(6, client.fileno(), os.O_RDWR)
        assert isinstance(tcp, RelayedSocket) and tcp.tcp and not tcp.nonblock
        assert "listening" in str(classify(7, server.fileno(), os.O_RDWR))
        assert "SOCK_DGRAM" in str(classify(8, udp.fileno(), os.O_RDWR))
        assert isinstance(plan, RelayedSocket)
        assert dump_externals([plan, tcp]) == (f"unix[{plan.inode}]",)
    finally:
        for s in (a, b, server, client, udp):
            s.close()


def test_a_socket_another_process_holds_is_found() -> None:
    a, b = socket.socketpair()
    try:
        inode = os.fstat(a.fileno()).st_ino
        assert sockets.socket_holders([inode], skip=os.getpid()) == {}
        assert sockets.socket_holders([inode], skip=-1) == {inode: os.getpid()}
        assert sockets.socket_holders([], skip=-1) == {}
    finally:
        a.close()
        b.close()
