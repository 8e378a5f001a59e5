"""Post-copy (lazy pages): the pieces around CRIU's page server and lazy-pages daemon.

How a post-copy move runs (CRIU 4.2.1, criu/cr-dump.c ``cr_dump_finish``, criu/uffd.c):

1. the source dumps with ``lazy_pages`` and a page-server port: every image but the pages
   is written, then the ``post-dump`` notify comes. Answered with success, CRIU starts a
   page server on that port (all addresses: over RPC ``ps.address`` is ignored when
   ``lazy_pages`` is set, criu/cr-service.c) and keeps the tree frozen, its memory held in
   page pipes, until one client has pulled every page; then the tree is killed. Until a
   client connects, killing that criu is a rollback: it never reaches the kill, its
   ptrace detach lets the tree go, as the release left it (stopped);
2. the target starts ``criu lazy-pages`` on the received images (it reads pstree.img at
   start, then listens on ``lazy-pages.socket`` in its work folder), then restores with
   ``lazy_pages``: the restore hands the daemon one userfaultfd per task and the process
   runs at once; the daemon connects to the source's page server, serves faults first
   and pulls the rest in the background, and exits 0 when every page is in;
3. if the connection breaks before that (source host dead), the daemon exits non-zero:
   the pages it did not get are lost, so the process is lost too, and the target kills it
   (reported to its parent as killed by SIGKILL).

The daemon is CRIU's own with patches of ours (scripts/criu-patches/*.patch, built by
scripts/build_criu.sh): stock 4.2.1 asks for one range of at most 4 MiB at a time and
spins on epoll meanwhile, and its page server sends every 16 KiB TLS record with a
send() of its own; patched, up to 8 MiB (16 requests) per task stay in flight, the
daemon sleeps, a fault fetches 64 KiB, the page server sends 256 KiB at a time, the TLS
handshake no longer waits for a delayed ACK and prefers AES-128-GCM (1 GiB: every page
in ~1.0-1.05 s instead of ~3.8 s, bench/migrate_bench.py). The wire protocol is unchanged.

The page server speaks plain TCP unless CRIU's TLS is on. It is: every move makes a
throw-away self-signed certificate and key (:func:`make_keys`) that the source hands the
target over the agents' mutual-TLS link, and both criu processes use it as their only CA,
certificate and key (gnutls, ``GNUTLS_CERT_REQUIRE`` on the server side, criu/tls.c).
So only the agent that was told over an authenticated link can connect or serve, and the
page data is encrypted between the hosts' addresses. CN checks are off: the certificate
names no host, it is trusted only because it came over the agents' link.

Kernel needs: userfaultfd for a root criu (``vm.unprivileged_userfaultfd`` does not
matter to root) and ``fs.pipe-max-size`` of at least 4 MiB (CRIU grows its page pipes to
that; below it the lazy dump fails). :func:`unusable_reason` checks what it can cheaply.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dunix.errors import MigrationFailed
from dunix.migrate import swrk

#: CRIU grows page pipes to 4 MiB for lazy dumps (criu/page-pipe.c); less fails the dump
PIPE_MAX_NEEDED = 4 << 20
#: below this resident size a plain dump is as quick (measured: bench/migrate_bench.py)
LAZY_MIN_RSS = 64 << 20
#: file names in the TLS folder handed to criu
CERT, KEY = "page-server.pem", "page-server.key"
#: how long the target waits for its lazy-pages daemon to listen
DAEMON_READY_TIMEOUT = 30.0


@dataclass(frozen=True)
class PageServerKeys:
    """A one-move certificate and key (PEM): CA, server and client identity at once."""

    cert_pem: bytes
    key_pem: bytes


def make_keys(days: int = 1) -> PageServerKeys:
    """A fresh self-signed EC certificate usable as its own CA (gnutls trusts a peer
    certificate that is itself in the trust list)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dunix page server")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return PageServerKeys(cert.public_bytes(serialization.Encoding.PEM), key_pem)


def write_keys(keys: PageServerKeys, dir_fd: int) -> None:
    """Write ``keys`` into the folder ``dir_fd`` (0600): criu reads them by path."""
    for name, data in ((CERT, keys.cert_pem), (KEY, keys.key_pem)):
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600,
                     dir_fd=dir_fd)  # fmt: skip
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


def tls_files(dir_fd: int) -> swrk.TlsFiles:
    """The criu TLS options for keys written by :func:`write_keys` into ``dir_fd`` (an fd
    criu inherits, so the paths work in any mount namespace criu runs in)."""
    base = f"/proc/self/fd/{dir_fd}"
    return swrk.TlsFiles(f"{base}/{CERT}", f"{base}/{CERT}", f"{base}/{KEY}", dir_fd)


def unusable_reason(proc_sys: Path = Path("/proc/sys")) -> str | None:
    """Why post-copy cannot work on this host, or None (userfaultfd itself is checked
    by CRIU: a restore without it fails, and the caller falls back to a plain dump)."""
    try:
        pipe_max = int((proc_sys / "fs" / "pipe-max-size").read_text())
    except (OSError, ValueError):
        return "fs.pipe-max-size is unreadable"
    if pipe_max < PIPE_MAX_NEEDED:
        return f"fs.pipe-max-size is {pipe_max}, lazy pages need {PIPE_MAX_NEEDED}"
    if not Path("/proc/sys/vm/unprivileged_userfaultfd").exists():
        return "this kernel has no userfaultfd"
    return None


def free_port() -> int:
    """A TCP port free on all addresses now (criu binds it a moment later)."""
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.bind(("::", 0))
        return int(s.getsockname()[1])


class LazyDaemon:
    """``criu lazy-pages`` for one restore, fetching from a page server over TLS.

    There is no RPC for it (criu/cr-service.c has none), so it runs as a command with
    ``--status-fd``: CRIU writes one byte there once its socket listens (``status_ready``).
    """

    def __init__(self, proc: trio.Process, images_dir_fd: int, log_file: str) -> None:
        self.proc = proc
        self.images_dir_fd = images_dir_fd
        self.log_file = log_file
        #: time.monotonic() when it was started: its log's clock starts about then
        self.started = time.monotonic()

    @classmethod
    async def start(
        cls,
        images_dir_fd: int,
        address: str,
        port: int,
        tls: swrk.TlsFiles | None,
        *,
        command: swrk.CriuCommand | None = None,
        log_file: str = "lazy-pages.log",
        log_level: int = swrk.LOG_LEVEL,
    ) -> LazyDaemon:
        command = command or swrk.CriuCommand()
        await swrk.ensure_kdat_cache(command.binary)
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        argv = [
            *command.prefix, command.binary, "lazy-pages",
            "-D", f"/proc/self/fd/{images_dir_fd}", "-o", log_file, f"-v{log_level}",
            "--page-server", "--address", address, "--port", str(port),
            *(tls.argv() if tls else ()), "--status-fd", str(ready_w),
        ]  # fmt: skip
        fds: Sequence[int] = (images_dir_fd, ready_w, *((tls.dir_fd,) if tls else ()))
        try:
            proc = await trio.lowlevel.open_process(
                argv,
                pass_fds=fds,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=command.preexec_fn,
            )
        except OSError as e:
            os.close(ready_r)
            os.close(ready_w)
            raise MigrationFailed(f"cannot start criu lazy-pages: {e}") from e
        os.close(ready_w)
        daemon = cls(proc, images_dir_fd, log_file)
        try:
            with trio.move_on_after(DAEMON_READY_TIMEOUT):
                await trio.lowlevel.wait_readable(ready_r)
            got = os.read(ready_r, 1) if _readable(ready_r) else b""
        finally:
            os.close(ready_r)
        if not got:
            await daemon.kill()
            raise daemon.failure("it did not get ready")
        return daemon

    def failure(self, detail: str) -> MigrationFailed:
        lines = swrk.criu_errors(self.images_dir_fd, self.log_file)
        text = f"criu lazy-pages failed: {detail}"
        if lines:
            text += "\n" + "\n".join(lines)
        return MigrationFailed(text)

    def pages_in_after(self) -> float | None:
        """Seconds from the daemon's start until its last page was copied in, from its
        log: "Disconnect from the page server" (info, criu/page-xfer.c), logged once every
        page is in, or the debug-level "UFFD transferred pages" (criu/uffd.c). Its exit
        comes a little later (the goodbye to the page server; stock CRIU waited out
        TCP_CORK there, ~0.2 s each way, which scripts/criu-patches/ removes)."""
        try:
            fd = os.open(self.log_file, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.images_dir_fd)
        except OSError:
            return None
        last = None
        with os.fdopen(fd, "r", errors="replace") as f:
            for ln in f:
                if ln.startswith("(") and (
                    "UFFD transferred pages" in ln or "Disconnect from the page server" in ln
                ):
                    last = float(ln[1 : ln.index(")")])
        return last

    async def wait(self) -> int:
        """The daemon's exit code: 0 once every page arrived."""
        return await self.proc.wait()

    async def kill(self) -> None:
        with trio.CancelScope(shield=True):
            if self.proc.returncode is None:
                self.proc.kill()
            await self.proc.wait()


def _readable(fd: int) -> bool:
    import select

    return bool(select.select([fd], [], [], 0)[0])
