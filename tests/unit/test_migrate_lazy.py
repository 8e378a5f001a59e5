"""Post-copy: the one-move keys, the host checks, and ``driver.move_lazy`` against a fake
criu that serves "pages" until the test lets it finish."""

from __future__ import annotations

import os
import stat
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pycriu  # noqa: F401  (make setup builds it: a missing one fails)
import pytest
import trio
from cryptography import x509

from dunix.errors import MigrationFailed
from dunix.migrate import driver, lazy, swrk
from dunix.migrate.lifecycle import State
from tests.unit.test_migrate_driver import FakeTarget

# A lazy dump: notifies like criu (cr-dump.c), then after a yes to post-dump "serves"
# (status-ready) until the file ``release`` appears in the images folder; its content
# "fail" makes the transfer fail. After a refused post-dump it serves too (as criu
# does): only killing it ends it.
FAKE_LAZY = textwrap.dedent(
    """\
    import os, socket, sys, time
    from pycriu import rpc_pb2 as rpc

    sk = socket.socket(fileno=int(sys.argv[2]))
    req = rpc.criu_req()
    req.ParseFromString(sk.recv(1 << 16))
    assert req.type == rpc.DUMP and req.opts.lazy_pages and req.opts.ps.port == 4242
    assert req.opts.tls and req.opts.tls_no_cn_verify
    assert os.path.exists(req.opts.tls_cert) and os.path.exists(req.opts.tls_key)
    images = req.opts.images_dir

    def notify(script):
        msg = rpc.criu_resp(type=rpc.NOTIFY, success=True)
        msg.notify.script = script
        sk.send(msg.SerializeToString())
        data = sk.recv(1 << 16)
        ans = rpc.criu_req()
        ans.ParseFromString(data)
        return ans.notify_success

    notify("pre-dump")
    notify("query-ext-files")
    notify("post-dump")
    assert notify("status-ready")
    release = os.path.join(images, "release")
    while not os.path.exists(release):
        time.sleep(0.01)
    ok = open(release).read() != "fail"
    why = "" if ok else "Lazy pages transfer FAILED."
    sk.send(rpc.criu_resp(type=rpc.DUMP, success=ok, cr_errmsg=why).SerializeToString())
    """
)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[swrk.CriuCommand, int, driver.LazyPlan, Path]]:
    script = tmp_path / "criu"
    script.write_text(f"#!{sys.executable}\n{FAKE_LAZY}")
    script.chmod(0o755)
    images = tmp_path / "images"
    keys = tmp_path / "keys"
    images.mkdir()
    keys.mkdir()
    fd = os.open(images, os.O_RDONLY | os.O_DIRECTORY)
    kfd = os.open(keys, os.O_RDONLY | os.O_DIRECTORY)
    lazy.write_keys(lazy.make_keys(), kfd)
    plan = driver.LazyPlan(4242, lazy.tls_files(kfd), source_proc=tmp_path / "noproc")
    yield swrk.CriuCommand(str(script)), fd, plan, images
    os.close(fd)
    os.close(kfd)


Setup = tuple[swrk.CriuCommand, int, driver.LazyPlan, Path]


def test_keys_are_a_self_signed_ca_written_private(tmp_path: Path) -> None:
    keys = lazy.make_keys()
    cert = x509.load_pem_x509_certificate(keys.cert_pem)
    assert cert.issuer == cert.subject
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        lazy.write_keys(keys, fd)
        files = lazy.tls_files(fd)
        assert files.cacert == files.cert == f"/proc/self/fd/{fd}/{lazy.CERT}"
        assert Path(files.key).read_bytes() == keys.key_pem
    finally:
        os.close(fd)
    assert stat.S_IMODE((tmp_path / lazy.KEY).stat().st_mode) == 0o600
    assert lazy.make_keys().cert_pem != keys.cert_pem  # one per move


def test_a_small_pipe_max_size_is_a_reason(tmp_path: Path) -> None:
    (tmp_path / "fs").mkdir()
    (tmp_path / "fs" / "pipe-max-size").write_text("1048576\n")
    assert "pipe-max-size" in (lazy.unusable_reason(tmp_path) or "")
    (tmp_path / "fs" / "pipe-max-size").write_text(str(4 << 20))
    assert lazy.unusable_reason(tmp_path) is None or "userfaultfd" in str(
        lazy.unusable_reason(tmp_path)
    )


def test_it_runs_there_before_the_pages_are_in(setup: Setup) -> None:
    command, fd, plan, images = setup
    target = FakeTarget()

    async def main() -> driver.MoveReport:
        async with trio.open_nursery() as background:
            report = await driver.move_lazy(77, fd, target, plan, background, source=command)
            assert report.transfer is not None and not report.transfer.done.is_set()
            assert target.calls == ["prepare", "send", "restore"]  # restored while serving
            (images / "release").write_text("ok")
            await report.transfer.done.wait()
        return report

    report = trio.run(main)
    assert report.restored_pid == 4321 and report.history[-1][2] is State.RUNNING_THERE
    assert report.transfer is not None and report.transfer.error is None
    assert (report.transfer.seconds or 0) >= report.total_seconds


@pytest.mark.parametrize("fail", ["prepare", "restore"])
def test_a_failed_step_kills_the_serving_criu_and_raises(setup: Setup, fail: str) -> None:
    command, fd, plan, _ = setup
    target = FakeTarget(fail=fail)

    async def main() -> None:
        async with trio.open_nursery() as background:
            with trio.fail_after(10), pytest.raises(MigrationFailed, match=f"{fail} refused"):
                await driver.move_lazy(77, fd, target, plan, background, source=command)

    trio.run(main)  # the fake never ends on its own: it was killed
    assert target.calls[-1] == "abort" or fail == "prepare"


def test_a_broken_transfer_is_reported(setup: Setup) -> None:
    command, fd, plan, images = setup

    async def main() -> driver.PageTransfer:
        async with trio.open_nursery() as background:
            report = await driver.move_lazy(77, fd, FakeTarget(), plan, background,
                                            source=command)  # fmt: skip
            (images / "release").write_text("fail")
            assert report.transfer is not None
            await report.transfer.done.wait()
            return report.transfer

    transfer = trio.run(main)
    assert transfer.error is not None and "transfer FAILED" in transfer.error


@pytest.mark.parametrize(
    "line",
    [
        "(12.490528) page-xfer: Disconnect from the page server",  # info (-v3)
        "(12.490528) uffd: 4-13: UFFD transferred pages: (262453/262453)",  # debug (-v4)
    ],
)
def test_last_page_time_from_the_daemon_log(tmp_path: Path, line: str) -> None:
    (tmp_path / "lazy-pages.log").write_text(f"(00.000001) CRIU run id\n{line}\n(12.9) Exit\n")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        daemon = lazy.LazyDaemon(None, fd, "lazy-pages.log")  # type: ignore[arg-type]
        assert daemon.pages_in_after() == pytest.approx(12.490528)
    finally:
        os.close(fd)
