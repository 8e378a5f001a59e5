"""The swrk driver against a fake ``criu swrk`` that speaks CRIU's RPC (no root needed).

The fake checks what the real criu relies on (the socket fd, the images folder as
``/proc/self/fd/N``, inherited fds at their numbers) and plays scripted conversations.
"""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pycriu  # noqa: F401  (make setup builds it: a missing one fails)
import pytest
import trio

from dunix.errors import MigrationFailed
from dunix.migrate import swrk

FAKE = textwrap.dedent(
    """\
    import os, socket, sys
    from pycriu import rpc_pb2 as rpc

    assert sys.argv[1] == "swrk"
    if "FAKE_CRIU_MARK" in os.environ:  # "criu runs" before it reads the request
        open(os.environ["FAKE_CRIU_MARK"], "w").close()
    sk = socket.socket(fileno=int(sys.argv[2]))
    mode = os.environ["FAKE_CRIU"]
    req = rpc.criu_req()
    req.ParseFromString(sk.recv(1 << 16))
    images = req.opts.images_dir
    assert req.opts.images_dir_fd == -1 and images.startswith("/proc/self/fd/"), images
    assert os.path.isdir(images)
    log = os.path.join(images, req.opts.log_file)

    def notify(script, pid=None):
        msg = rpc.criu_resp(type=rpc.NOTIFY, success=True)
        msg.notify.script = script
        if pid is not None:
            msg.notify.pid = pid
        sk.send(msg.SerializeToString())
        ans = rpc.criu_req()
        data = sk.recv(1 << 16)
        if not data:
            return False
        ans.ParseFromString(data)
        return ans.type == rpc.NOTIFY and ans.notify_success

    def fail(kind, *lines):
        with open(log, "w") as f:
            for line in lines:
                f.write(f"(00.001) Error (criu/x.c:1): {line}\\n")
            f.write("(00.002) Error (criu/x.c:2): Dumping FAILED.\\n")
        sk.send(rpc.criu_resp(type=kind, success=False, cr_errmsg=lines[0]).SerializeToString())

    if mode == "dump":
        assert req.type == rpc.DUMP and req.opts.notify_scripts
        ok = notify("pre-dump") and notify("query-ext-files") and notify("post-dump")
        if ok:
            sk.send(rpc.criu_resp(type=rpc.DUMP, success=True).SerializeToString())
        else:
            fail(rpc.DUMP, "RPC client reported script error")
    elif mode == "dump-fails":
        notify("pre-dump")
        fail(rpc.DUMP, "noise first", "Can't seize 77: Operation not permitted")
    elif mode == "dies":
        with open(log, "w") as f:
            f.write("(00.001) Error (criu/y.c:3): parasite crashed\\n")
        sys.exit(1)
    elif mode == "restore":
        assert req.type == rpc.RESTORE and req.opts.rst_sibling
        for item in req.opts.inherit_fd:
            os.fstat(item.fd)
            assert item.key.startswith("pipe:[")
        assert notify("post-restore", 77)
        msg = rpc.criu_resp(type=rpc.RESTORE, success=True)
        msg.restore.pid = 77
        sk.send(msg.SerializeToString())
    """
)


@pytest.fixture
def fake_criu(tmp_path: Path) -> Iterator[swrk.CriuCommand]:
    script = tmp_path / "criu"
    script.write_text(f"#!{sys.executable}\n{FAKE}")
    script.chmod(0o755)
    yield swrk.CriuCommand(str(script))


@pytest.fixture
def images(tmp_path: Path) -> Iterator[int]:
    folder = tmp_path / "images"
    folder.mkdir()
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def test_dump_answers_notifications(
    fake_criu: swrk.CriuCommand, images: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CRIU", "dump")
    seen: list[str] = []

    async def notify(note: swrk.Notification) -> bool:
        seen.append(note.script)
        return True

    result = trio.run(lambda: swrk.dump(77, images, notify=notify, command=fake_criu))
    assert seen == ["pre-dump", "query-ext-files", "post-dump"]
    assert not result.resumed and result.pid == 77
    assert result.dumped_after is not None and result.notifications == tuple(seen)


def test_refused_post_dump_returns_resumed(
    fake_criu: swrk.CriuCommand, images: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CRIU", "dump")

    async def notify(note: swrk.Notification) -> bool:
        return note.script != "post-dump"

    result = trio.run(lambda: swrk.dump(77, images, notify=notify, command=fake_criu))
    assert result.resumed


def test_criu_failure_carries_the_specific_log_line(
    fake_criu: swrk.CriuCommand, images: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CRIU", "dump-fails")
    with pytest.raises(MigrationFailed) as info:
        trio.run(lambda: swrk.dump(77, images, command=fake_criu))
    first = str(info.value).splitlines()[0]
    assert first == "criu dump of pid 77 failed: Can't seize 77: Operation not permitted"
    assert "noise first" in str(info.value)


def test_criu_dying_is_a_migration_failure(
    fake_criu: swrk.CriuCommand, images: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CRIU", "dies")
    with pytest.raises(MigrationFailed, match="parasite crashed"):
        trio.run(lambda: swrk.restore(images, command=fake_criu))


def test_restore_passes_inherited_fds(
    fake_criu: swrk.CriuCommand, images: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CRIU", "restore")
    r, w = os.pipe()  # non-inheritable here: the driver must hand them over
    try:
        key = f"pipe:[{os.fstat(r).st_ino}]"
        result = trio.run(
            lambda: swrk.restore(images, inherit_fd=[(key, r)], rst_sibling=True, command=fake_criu)
        )
    finally:
        os.close(r)
        os.close(w)
    assert result.pid == 77 and result.notifications == ("post-restore",)


def test_restore_awaits_ready_with_criu_running_before_the_request(
    fake_criu: swrk.CriuCommand, images: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CRIU", "restore")
    mark = tmp_path / "criu-runs"
    monkeypatch.setenv("FAKE_CRIU_MARK", str(mark))
    seen: list[bool] = []

    async def ready() -> None:  # e.g. the lazy-pages daemon starting meanwhile
        with trio.move_on_after(10):
            while not mark.exists():
                await trio.sleep(0.01)
        seen.append(mark.exists())

    result = trio.run(
        lambda: swrk.restore(images, rst_sibling=True, command=fake_criu, ready=ready)
    )
    assert seen == [True] and result.pid == 77


def test_a_failing_ready_fails_the_restore_and_ends_criu(
    fake_criu: swrk.CriuCommand, images: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CRIU", "restore")

    async def ready() -> None:
        raise MigrationFailed("criu lazy-pages failed: it did not get ready")

    async def go() -> None:
        with trio.fail_after(10):  # criu, given EOF instead of a request, ends
            await swrk.restore(images, rst_sibling=True, command=fake_criu, ready=ready)

    with pytest.raises(MigrationFailed, match="did not get ready"):
        trio.run(go)


def test_missing_binary_is_a_migration_failure(images: int) -> None:
    command = swrk.CriuCommand("/nonexistent/criu")
    with pytest.raises(MigrationFailed, match="cannot start criu"):
        trio.run(lambda: swrk.dump(1, images, command=command))


def test_in_host_enters_the_hosts_namespaces() -> None:
    argv = swrk.CriuCommand.in_host(4242, binary="/x/criu").argv(9)
    assert argv == ["nsenter", "-t", "4242", "-p", "-m", "-u", "-n", "--", "/x/criu", "swrk", "9"]


def test_cancelling_at_post_dump_makes_criu_roll_back(
    fake_criu: swrk.CriuCommand, images: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancelled caller closes the socket: CRIU reads that as a refused notify."""
    monkeypatch.setenv("FAKE_CRIU", "dump")

    async def hang(note: swrk.Notification) -> bool:
        if note.script == "post-dump":
            await trio.sleep_forever()
        return True

    async def main() -> bool:
        with trio.move_on_after(0.5) as scope:
            await swrk.dump(77, images, notify=hang, command=fake_criu)
        return scope.cancelled_caught

    assert trio.run(main)
    log = os.open("dump.log", os.O_RDONLY, dir_fd=images)
    with os.fdopen(log) as f:
        assert "RPC client reported script error" in f.read()


# A criu whose `check` saves a kernel-feature cache the way criu does: into its /run,
# which prime_kdat_cache has made a private tmpfs (here: the folder given as kdat's).
FAKE_KDAT = textwrap.dedent(
    """\
    import struct, sys
    assert sys.argv[1] == "check"
    with open(sys.argv[0].rsplit("/", 1)[0] + "/run/criu.kdat", "wb") as f:
        f.write(struct.pack("<II", 0x57023458, 7) + bytes(24))
    """
)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs in a mount namespace")
def test_kdat_cache_is_made_in_a_private_tmpfs_and_copied_out(tmp_path: Path) -> None:
    script = tmp_path / "criu"
    script.write_text(f"#!{sys.executable}\n{FAKE_KDAT}")
    script.chmod(0o755)
    run = tmp_path / "run"
    run.mkdir()
    kdat = run / "criu.kdat"
    assert not swrk.kdat_cache_fresh(kdat)
    assert swrk.prime_kdat_cache(str(script), kdat)
    assert kdat.read_bytes()[:4] == (0x57023458).to_bytes(4, "little")
    assert swrk.kdat_cache_fresh(kdat)
    assert list(run.iterdir()) == [kdat]  # written by rename; the tmpfs is gone
    os.utime(kdat, (0, 0))  # from before the boot: made again
    assert not swrk.kdat_cache_fresh(kdat)
    assert swrk.prime_kdat_cache(str(script), kdat) and swrk.kdat_cache_fresh(kdat)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs in a mount namespace")
def test_kdat_cache_is_not_made_from_what_is_not_criu(tmp_path: Path) -> None:
    script = tmp_path / "criu"
    script.write_text(f"#!{sys.executable}\nprint('hello')\n")
    script.chmod(0o755)
    (tmp_path / "run").mkdir()
    kdat = tmp_path / "run" / "criu.kdat"
    assert not swrk.prime_kdat_cache(str(script), kdat)
    assert not kdat.exists()
