"""PID 1 of a simulated host: ``python -I -S .../dunix/cluster/init.py --name n1 ...``.

Standard library only, and run by path, so it starts in ~50 ms.

Started by ``unshare --pid --mount --uts --fork --mount-proc --propagation private`` inside
the host's netns and cgroup. It gives the host its identity (hostname, private /tmp and
/dev/shm, the host's disk folder at /var/lib/dunix/local), says it is ready by writing one
byte to ``--ready-fd``, then reaps orphans until SIGTERM/SIGINT. When it exits the kernel
SIGKILLs everything else in the PID namespace (kernel/pid_namespace.c,
zap_pid_ns_processes), so killing this process takes the whole host down.

Signals from inside the namespace reach PID 1 only if it handles them (the kernel drops
SIG_DFL signals to a namespace init), hence the explicit handlers.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import socket
import sys
from types import FrameType

MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_BIND = 0x1000

_libc = ctypes.CDLL(None, use_errno=True)


class _Stop(Exception):
    pass


def mount(source: str, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    rc = _libc.mount(
        source.encode(),
        target.encode(),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def setup(
    name: str, disk: str, local_disk: str, runtime_dir: str, keep: list[str] | None = None
) -> None:
    socket.sethostname(name)
    # Folders under /tmp that must stay visible (the dunix installation itself, when it was
    # checked out there): hold them by fd across the tmpfs mount, then bind them back.
    held = [(path, os.open(path, os.O_PATH | os.O_DIRECTORY)) for path in keep or []]
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    for path, fd in held:
        os.makedirs(path, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", path, None, MS_BIND)
        os.close(fd)
    if os.path.isdir("/dev/shm"):
        mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    os.makedirs(local_disk, exist_ok=True)
    mount(disk, local_disk, None, MS_BIND)
    os.makedirs(runtime_dir, exist_ok=True)


def _stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def _reap_forever() -> None:
    """Reap every child (orphans of the host are reparented here) until told to stop."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    while True:
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        # The timeout bounds how long a zombie can wait if a SIGCHLD raced the loop.
        signal.sigtimedwait({signal.SIGCHLD}, 5.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dunix-cluster-init")
    p.add_argument("--name", required=True)
    p.add_argument("--disk", required=True)
    p.add_argument("--local-disk", required=True)
    p.add_argument("--runtime-dir", required=True)
    p.add_argument("--ready-fd", type=int, required=True)
    p.add_argument("--keep", action="append", default=[], help="a folder under /tmp to keep")
    args = p.parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _stop)
    try:
        setup(args.name, args.disk, args.local_disk, args.runtime_dir, args.keep)
    except OSError as e:
        print(f"dunix init {args.name}: {e}", file=sys.stderr)
        return 1
    os.write(args.ready_fd, b"R")
    os.close(args.ready_fd)
    with contextlib.suppress(_Stop):
        _reap_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
