"""CRIU's RPC, driven by hand over ``criu swrk`` so notify callbacks can be answered.

``pycriu.criu`` sends one request and reads one response, so it cannot answer CRIU's
notifications (``pre-dump``, ``post-dump``, ``post-restore``, ...). Here the request, the
notifications and their answers are exchanged on a SOCK_SEQPACKET socketpair whose other
end criu gets as ``criu swrk FD`` (criu/crtools.c, CR_SWRK). One criu process serves one
dump or restore and exits.

Why the options look as they do:

- images go by path, ``/proc/self/fd/N``, never as ``images_dir_fd``: for a number CRIU
  opens ``/proc/PEER/fd/N`` with the peer pid from SO_PEERCRED (criu/cr-service.c,
  resolve_images_dir_path), which is 0 when criu runs in another host's PID namespace;
- to act inside a simulated host, criu itself runs under ``nsenter -t INIT -p -m -u -n``
  (``CriuCommand.in_host``): ``join_ns`` cannot join a PID namespace;
- every criu start loads CRIU's kernel-feature cache, ``/run/criu.kdat``
  (:func:`prime_kdat_cache`): without it each criu call probes the kernel for ~20-50 ms,
  twice inside a post-copy move's downtime (lazy-pages daemon and restore);
- the log goes into the images folder, and a failure comes out as ``MigrationFailed``
  carrying CRIU's first error (``cr_errmsg``) and the error lines of that log. This module
  is the only edge where CRIU's errors are translated.

A ``post-dump`` answered with failure makes CRIU thaw the source (criu/cr-dump.c,
cr_dump_finish): ``dump`` then returns ``DumpResult(resumed=True)`` instead of raising,
since the caller chose it. That is the commit point of ``lifecycle.Migration``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from dunix.errors import MigrationFailed

#: CRIU's RPC messages are small; notify packets carry at most one fd
_RECV_SIZE = 1 << 16
#: how long a criu told to stop (socket closed) may take to roll back before SIGKILL
_EXIT_GRACE = 30.0
_STDERR_KEEP = 4096
#: criu's log level for dumps, restores and lazy-pages (1 errors .. 4 debug); debug
#: logs a line per page-pipe iov while frozen and per page fault in the lazy-pages
#: daemon, yet level 3 made no measurable difference (bench/migrate_bench.py, README)
LOG_LEVEL = int(os.environ.get("DUNIX_CRIU_LOG_LEVEL", "4"))


def default_binary() -> str:
    """``$DUNIX_CRIU``, else the criu that scripts/setup.sh links into the venv, else the
    one on PATH.

    The link's target, not the link: criu may start in a job's own mount namespace, whose
    /tmp is the job's folder (agent/storage.py job_tmp_wrapper), and that hides a checkout
    under /tmp (what `mktemp -d` makes); the build cache the link points into stays seen.
    """
    override = os.environ.get("DUNIX_CRIU")  # a build to compare (bench/migrate_bench.py)
    if override:
        return override
    venv = Path(sys.prefix) / "bin" / "criu"
    if os.access(venv, os.X_OK):
        return str(venv.resolve())
    return shutil.which("criu") or "criu"


@dataclass(frozen=True)
class CriuCommand:
    """How to start criu: the binary, a prefix such as ``nsenter ...``, a preexec hook
    (e.g. joining the host's cgroup, so a restored tree is accounted there)."""

    binary: str = field(default_factory=default_binary)
    prefix: tuple[str, ...] = ()
    preexec_fn: Callable[[], None] | None = None

    @classmethod
    def in_host(
        cls,
        init_pid: int,
        *,
        binary: str | None = None,
        cgroups: Sequence[str | os.PathLike[str]] = (),
    ) -> CriuCommand:
        """criu inside the PID, mount, UTS and network namespaces of ``init_pid``, and in
        ``cgroups`` (cgroup folders; a restored tree stays in criu's cgroups, see
        ``restore``).

        nsenter forks for ``-p`` (setns on a PID namespace affects children only) and
        keeps the fds it inherited, so the swrk socket and image folder reach criu.
        A tree restored there without ``rst_sibling`` is criu's child and is adopted by
        the host's PID 1 when criu exits.
        """
        prefix = ("nsenter", "-t", str(init_pid), "-p", "-m", "-u", "-n", "--")
        paths = tuple(os.fspath(p) for p in cgroups)
        return cls(binary or default_binary(), prefix, _joiner(paths) if paths else None)

    def argv(self, sock_fd: int) -> list[str]:
        return [*self.prefix, self.binary, "swrk", str(sock_fd)]

    @classmethod
    def dumping(cls, pid: int) -> CriuCommand:
        """criu for a dump of ``pid`` from this host: in the process's mount namespace
        when it has one of its own (a job with its own /tmp, agent/storage.py).

        CRIU treats a task whose mount namespace equals its own as in the root one and
        dumps no mounts; from outside it tries to dump that namespace and fails ("mnt:
        ... doesn't have a proper root mount"). ``nsenter -m`` joins that namespace only
        (root and cwd become its root); the image folder still goes by /proc/self/fd.
        """
        try:
            theirs = os.stat(f"/proc/{pid}/ns/mnt").st_ino
            ours = os.stat("/proc/self/ns/mnt").st_ino
        except OSError:
            return cls()
        if theirs == ours:
            return cls()
        return cls(prefix=("nsenter", "-t", str(pid), "-m", "--"))


#: CRIU's kernel-feature cache (criu/kerndat.c: KERNDAT_CACHE_FILE, RUNDIR ``/run``)
KDAT_FILE = Path("/run/criu.kdat")
_TMPFS_MAGIC = 0x01021994
_KDAT_MAGIC = 0x57023458  # criu/include/magic.h, the cache's first word


def _boot_time() -> float:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return float(line.split()[1])
    return 0.0


def kdat_cache_fresh(kdat: Path = KDAT_FILE) -> bool:
    """Whether there is a cache written since boot (criu drops one of another build)."""
    try:
        return kdat.stat().st_mtime >= _boot_time()
    except OSError:
        return False


def prime_kdat_cache(binary: str | None = None, kdat: Path = KDAT_FILE) -> bool:
    """Make sure ``/run/criu.kdat`` exists, so that criu skips its kernel probing.

    CRIU probes the kernel at every start (~20-50 ms here: pagemap, uffd, a veth pair,
    ptrace of a child ...) unless it can load that cache; it saves the cache itself only
    when ``/run`` is a tmpfs (criu/kerndat.c ``kerndat_save_cache``: a file on disk would
    outlive a reboot into another kernel). On this machine kind ``/run`` is on disk, so it
    never does. Loading does not check the file system, so the cache is made here: criu
    runs once with a tmpfs of its own over ``/run`` (a private mount namespace), and its
    file is copied out. Against a reboot, a cache older than the boot is made again.
    CRIU refreshes the per-process parts (rseq) on load (``kerndat_try_load_new``) and
    drops a cache of another build ("Stale"). The rest is the kernel's: made in the root
    namespaces or in fresh PID, mount, network and UTS ones it differed only in the rseq
    pointer. Returns
    whether a fresh cache is there now; failing to make one only costs the probing.
    """
    binary = binary or default_binary()
    if _fs_magic(kdat.parent) == _TMPFS_MAGIC:
        return True  # criu keeps its own cache there
    if kdat_cache_fresh(kdat):
        return True
    script = 'mount -t tmpfs dunix-kdat "$2" && "$1" check >/dev/null 2>&1; cat "$3"'
    try:
        done = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "--", "sh", "-c", script, "sh",
             binary, str(kdat.parent), str(kdat)],
            capture_output=True, timeout=30, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    if len(done.stdout) < 8 or int.from_bytes(done.stdout[:4], "little") != _KDAT_MAGIC:
        return False  # not a criu that made a cache
    tmp = kdat.with_name(f"{kdat.name}.dunix-{os.getpid()}")
    try:
        tmp.write_bytes(done.stdout)
        os.chmod(tmp, 0o600)
        os.replace(tmp, kdat)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        return False
    return True


def _fs_magic(path: Path) -> int:
    """The file system type (statfs f_type) of ``path``; -1 when unknown."""
    import ctypes

    buf = ctypes.create_string_buffer(256)  # struct statfs: f_type is the first long
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(os.fsencode(path), buf) != 0:
        return -1
    return ctypes.c_long.from_buffer(buf).value


_kdat_primed: set[str] = set()


async def ensure_kdat_cache(binary: str) -> None:
    """:func:`prime_kdat_cache` without blocking trio, for the criu that setup built
    (a test's fake criu makes no cache); one stat per criu start once there is one."""
    if binary in _kdat_primed and kdat_cache_fresh():
        return
    if binary != default_binary():
        return
    if await trio.to_thread.run_sync(prime_kdat_cache, binary):
        _kdat_primed.add(binary)


def _joiner(paths: tuple[str, ...]) -> Callable[[], None]:
    def join() -> None:  # between fork and exec: plain os calls only
        pid = str(os.getpid()).encode()
        for path in paths:
            fd = os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)

    return join


@dataclass(frozen=True)
class Notification:
    """One CRIU notify: the action-script name, the root pid for some, an fd for
    ``orphan-pts-master`` (valid during the callback only; closed afterwards)."""

    script: str
    pid: int | None = None
    fd: int | None = None


#: answers a notification: True lets CRIU go on, False makes it fail (and roll back)
Notify = Callable[[Notification], Awaitable[bool]]


@dataclass(frozen=True)
class TlsFiles:
    """CRIU's TLS for the page server (``--tls``): CA, certificate and key paths, and
    the folder fd those paths go through (passed to criu). See ``lazy.py``."""

    cacert: str
    cert: str
    key: str
    dir_fd: int

    def apply(self, opts: Any) -> None:
        opts.tls = True
        opts.tls_cacert, opts.tls_cert, opts.tls_key = self.cacert, self.cert, self.key
        opts.tls_no_cn_verify = True  # a one-move certificate naming no host (lazy.py)

    def argv(self) -> list[str]:
        return ["--tls", "--tls-cacert", self.cacert, "--tls-cert", self.cert,
                "--tls-key", self.key, "--tls-no-cn-verify"]  # fmt: skip


@dataclass(frozen=True)
class DumpResult:
    pid: int
    #: the source still runs: ``leave_running``, or our notify refused (e.g. post-dump)
    #: and CRIU thawed it
    resumed: bool
    #: seconds from the request to the post-dump notify (images complete), if one came
    dumped_after: float | None
    #: seconds for the whole criu call
    seconds: float
    notifications: tuple[str, ...]


@dataclass(frozen=True)
class RestoreResult:
    #: the restored root's pid as criu saw it (in criu's PID namespace)
    pid: int
    seconds: float
    notifications: tuple[str, ...]


def _rpc() -> Any:
    try:
        from pycriu import rpc_pb2
    except ImportError as e:
        raise MigrationFailed(f"pycriu is not importable ({e}): run scripts/setup.sh") from e
    return rpc_pb2


def _base_opts(rpc: Any, images_dir_fd: int, log_file: str, log_level: int) -> Any:
    opts = rpc.criu_opts()
    opts.images_dir_fd = -1  # a required field; the folder goes by path (module doc)
    opts.images_dir = f"/proc/self/fd/{images_dir_fd}"
    opts.log_file = log_file
    opts.log_level = log_level
    return opts


def criu_errors(images_dir_fd: int, log_file: str, limit: int = 6) -> list[str]:
    """The error lines of a criu log in the images folder (CRIU marks them ``Error``)."""
    try:
        fd = os.open(log_file, os.O_RDONLY | os.O_CLOEXEC, dir_fd=images_dir_fd)
    except OSError:
        return []
    with os.fdopen(fd, "r", errors="replace") as f:
        lines = [ln.rstrip() for ln in f if "Error (" in ln]
    return lines[-limit:]


class _Call:
    """One request to one ``criu swrk`` process, with its notify exchanges."""

    def __init__(
        self,
        what: str,
        command: CriuCommand,
        images_dir_fd: int,
        log_file: str,
        notify: Notify | None,
        extra_fds: Sequence[int] = (),
        exit_grace: float = _EXIT_GRACE,
        ready: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.what = what
        #: awaited after criu started and before the request goes (see ``restore``)
        self.ready = ready
        self.exit_grace = exit_grace
        self.command = command
        self.images_dir_fd = images_dir_fd
        self.log_file = log_file
        self.notify = notify
        self.extra_fds = tuple(extra_fds)
        self.refused = False
        self.seen: list[tuple[str, float]] = []
        self.stderr = b""

    def failure(self, detail: str) -> MigrationFailed:
        """The error for the user: CRIU's most specific error line first (its first error,
        ``cr_errmsg``, is often a harmless warning-level one), the log's errors after."""
        lines = criu_errors(self.images_dir_fd, self.log_file)
        specific = [ln for ln in lines if not ln.endswith("FAILED.")]
        if specific:
            detail = specific[-1].split("): ", 1)[-1]
        text = f"criu {self.what} failed: {detail}"
        if lines:
            text += f"\n(from {self.log_file} in the images folder)\n" + "\n".join(lines)
        elif self.stderr.strip():
            text += "\n" + self.stderr.decode(errors="replace").strip()
        return MigrationFailed(text)

    async def run(self, req: Any) -> Any:
        rpc = _rpc()
        started = time.monotonic()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # criu's stderr (what it says before its log is set up) goes to an unnamed file:
        # no reader task, so errors raised here stay plain, not exception groups.
        await ensure_kdat_cache(self.command.binary)
        with tempfile.TemporaryFile() as errors:
            try:
                fds = (theirs.fileno(), self.images_dir_fd, *self.extra_fds)
                proc = await trio.lowlevel.open_process(
                    self.command.argv(theirs.fileno()),
                    pass_fds=fds,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=errors,
                    preexec_fn=self.command.preexec_fn,
                )
            except OSError as e:
                ours.close()
                raise MigrationFailed(f"cannot start criu ({self.command.binary}): {e}") from e
            finally:
                theirs.close()
            sock = trio.socket.from_stdlib_socket(ours)
            try:
                if self.ready is not None:
                    await self.ready()
                return await self._exchange(rpc, sock, req, started)
            finally:
                # EOF on the socket is a failed notify answer to a criu still waiting:
                # it rolls back (thaws the source) rather than hanging.
                sock.close()
                await self._reap(proc)
                errors.seek(0)
                self.stderr = errors.read()[-_STDERR_KEEP:]

    async def _exchange(self, rpc: Any, sock: Any, req: Any, started: float) -> Any:
        await sock.send(req.SerializeToString())
        while True:
            data, ancdata, _, _ = await sock.recvmsg(_RECV_SIZE, socket.CMSG_SPACE(4))
            fds = _fds_from(ancdata)
            if not data:
                for fd in fds:
                    os.close(fd)
                raise self.failure("criu exited without answering")
            resp = rpc.criu_resp()
            resp.ParseFromString(data)
            if resp.type != rpc.NOTIFY:
                for fd in fds:
                    os.close(fd)
                return resp
            note = Notification(
                resp.notify.script,
                resp.notify.pid if resp.notify.HasField("pid") else None,
                fds[0] if fds else None,
            )
            self.seen.append((note.script, time.monotonic() - started))
            try:
                ok = True if self.notify is None else bool(await self.notify(note))
            finally:
                for fd in fds:
                    os.close(fd)
            if not ok:
                self.refused = True
            answer = rpc.criu_req(type=rpc.NOTIFY, notify_success=ok)
            await sock.send(answer.SerializeToString())

    async def _reap(self, proc: trio.Process) -> None:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self.exit_grace):
                await proc.wait()
                return
            proc.kill()
            await proc.wait()


def _fds_from(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds += list(memoryview(data[:usable]).cast("i"))
    return fds


async def dump(
    pid: int,
    images_dir_fd: int,
    *,
    leave_running: bool = False,
    tcp_established: bool = False,
    tcp_close: bool = False,
    shell_job: bool = False,
    ext_unix_sk: bool = False,
    file_locks: bool = False,
    external: Sequence[str] = (),
    cgroups: bool = False,
    notify: Notify | None = None,
    command: CriuCommand | None = None,
    log_file: str = "dump.log",
    log_level: int = LOG_LEVEL,
    lazy_port: int = 0,
    tls: TlsFiles | None = None,
) -> DumpResult:
    """Dump the tree rooted at ``pid`` (as criu sees it) into the folder ``images_dir_fd``.

    Without ``leave_running`` CRIU kills the tree once ``post-dump`` is answered with
    success; answering it with failure thaws the tree (``resumed=True``). Raises
    ``MigrationFailed`` with CRIU's message when CRIU fails on its own. ``cgroups``
    False (CRIU's "ignore" mode) leaves cgroups out of the images: the target decides.

    ``lazy_port`` (post-copy, ``lazy.py``): the pages stay out of the images; after a
    successful ``post-dump`` CRIU serves them on that port (with ``tls``) and returns
    only once a lazy-pages daemon took them all. Cancelling such a dump kills criu at
    once (no grace): before a client connected, that lets the tree go unharmed.
    """
    rpc = _rpc()
    opts = _base_opts(rpc, images_dir_fd, log_file, log_level)
    opts.pid = pid
    opts.leave_running = leave_running
    opts.tcp_established = tcp_established
    opts.tcp_close = tcp_close  # dumped untouched (sockets.py relays it)
    opts.shell_job = shell_job
    opts.ext_unix_sk = ext_unix_sk
    opts.file_locks = file_locks
    opts.external.extend(external)
    opts.manage_cgroups = cgroups
    opts.notify_scripts = True
    extra: list[int] = []
    if lazy_port:
        opts.lazy_pages = True
        opts.ps.port = lazy_port
    if tls is not None:
        tls.apply(opts)
        extra.append(tls.dir_fd)
    command = command or CriuCommand.dumping(pid)
    call = _Call(f"dump of pid {pid}", command, images_dir_fd, log_file, notify,
                 extra, 0.0 if lazy_port else _EXIT_GRACE)  # fmt: skip
    started = time.monotonic()
    resp = await call.run(rpc.criu_req(type=rpc.DUMP, opts=opts))
    seconds = time.monotonic() - started
    if resp.type != rpc.DUMP:
        raise call.failure(f"unexpected response type {resp.type}: {resp.cr_errmsg}")
    dumped_after = next((t for name, t in call.seen if name == "post-dump"), None)
    names = tuple(name for name, _ in call.seen)
    if not resp.success:
        if call.refused:
            return DumpResult(pid, True, dumped_after, seconds, names)
        raise call.failure(resp.cr_errmsg or f"errno {resp.cr_errno}")
    return DumpResult(pid, leave_running, dumped_after, seconds, names)


async def restore(
    images_dir_fd: int,
    *,
    inherit_fd: Sequence[tuple[str, int]] = (),
    rst_sibling: bool = False,
    leave_stopped: bool = False,
    tcp_established: bool = False,
    tcp_close: bool = False,
    shell_job: bool = False,
    ext_unix_sk: bool = False,
    file_locks: bool = False,
    external: Sequence[str] = (),
    cgroups: bool = False,
    notify: Notify | None = None,
    command: CriuCommand | None = None,
    log_file: str = "restore.log",
    log_level: int = LOG_LEVEL,
    lazy_pages: bool = False,
    ready: Callable[[], Awaitable[None]] | None = None,
) -> RestoreResult:
    """Restore the images in ``images_dir_fd``; returns once the tree runs.

    ``inherit_fd`` pairs a CRIU key (``pipe:[INODE]``, ``file[MNT:INODE]``, ...) with an
    fd of ours that replaces that object; the fd keeps its number in criu. The tree keeps
    its pids, so each must be free in criu's PID namespace (else "Can't fork for PID:
    File exists"). A ``post-restore`` answered with failure makes CRIU kill the restored
    tree (criu/cr-restore.c) before it ran, and this raises ``MigrationFailed``.
    With ``cgroups`` False the tree stays in criu's own cgroups (``CriuCommand`` puts
    criu where the target wants it); True is CRIU's "soft" mode: back into the dumped
    cgroup paths, which on another host are the wrong ones.
    ``lazy_pages``: memory comes from a ``criu lazy-pages`` daemon already listening in
    the images folder (``lazy.LazyDaemon``); the tree runs before its pages are in.
    ``ready``: awaited once criu runs, before the request goes: start the lazy-pages
    daemon there, and criu's own start-up (exec, libraries, the kdat cache: ~10 ms) is
    off a post-copy move's downtime. What it raises fails the restore (criu is ended).
    """
    rpc = _rpc()
    opts = _base_opts(rpc, images_dir_fd, log_file, log_level)
    opts.rst_sibling = rst_sibling
    opts.leave_stopped = leave_stopped  # restored tree left SIGSTOPped: the caller continues it
    opts.tcp_established = tcp_established
    opts.tcp_close = tcp_close  # a dump with tcp_close is refused without it (image.c)
    opts.shell_job = shell_job
    opts.ext_unix_sk = ext_unix_sk
    opts.file_locks = file_locks
    opts.external.extend(external)
    opts.manage_cgroups = cgroups
    opts.notify_scripts = True
    opts.lazy_pages = lazy_pages
    for key, fd in inherit_fd:
        opts.inherit_fd.add(key=key, fd=fd)
    call = _Call(
        "restore",
        command or CriuCommand(),
        images_dir_fd,
        log_file,
        notify,
        [fd for _, fd in inherit_fd],
        ready=ready,
    )
    started = time.monotonic()
    resp = await call.run(rpc.criu_req(type=rpc.RESTORE, opts=opts))
    seconds = time.monotonic() - started
    if resp.type != rpc.RESTORE or not resp.success:
        raise call.failure(resp.cr_errmsg or f"errno {resp.cr_errno}")
    return RestoreResult(resp.restore.pid, seconds, tuple(name for name, _ in call.seen))


async def cpuinfo_dump(images_dir_fd: int, *, command: CriuCommand | None = None) -> None:
    """Write this host's ``cpuinfo.img`` into the folder (``criu cpuinfo dump``)."""
    rpc = _rpc()
    opts = _base_opts(rpc, images_dir_fd, "cpuinfo-dump.log", 4)
    call = _Call("cpuinfo dump", command or CriuCommand(), images_dir_fd, opts.log_file, None)
    resp = await call.run(rpc.criu_req(type=rpc.CPUINFO_DUMP, opts=opts))
    if not resp.success:
        raise call.failure(resp.cr_errmsg or f"errno {resp.cr_errno}")


async def cpuinfo_check(images_dir_fd: int, *, command: CriuCommand | None = None) -> str | None:
    """None when this host can run what the folder's ``cpuinfo.img`` describes, else
    CRIU's reason (``criu cpuinfo check``: xsave layout and feature bits, criu/arch/x86/cpu.c).
    """
    rpc = _rpc()
    opts = _base_opts(rpc, images_dir_fd, "cpuinfo-check.log", 4)
    call = _Call("cpuinfo check", command or CriuCommand(), images_dir_fd, opts.log_file, None)
    resp = await call.run(rpc.criu_req(type=rpc.CPUINFO_CHECK, opts=opts))
    if resp.success:
        return None
    return str(call.failure(resp.cr_errmsg or "CPU not compatible"))
