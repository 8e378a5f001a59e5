"""storagefs on one host with FUSE passthrough: local files' reads and writes go from the
kernel to the backing file (dunix/storagefs/passthrough.py, native/lib/fusepassthrough.c).

The server is the standalone one of test_storagefs_local.py with the library preloaded (the
agent loads it itself). Shows that passthrough is really used (a read of an open file completes
while the server is stopped) and that POSIX behaviour stays: appends from two writers, writes
in the middle, truncate, mmap, hard links open under both names, set-id bits dropped by a
non-root writer, sizes and mtimes seen by stat, exec of a file written through it.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dunix.storagefs.passthrough import LIBRARY
from tests.e2e.test_storagefs_local import Mount, _require_fuse, _start

pytestmark = pytest.mark.e2e

MiB = 1 << 20


@pytest.fixture
def mount(monkeypatch: pytest.MonkeyPatch) -> Iterator[Mount]:
    _require_fuse()
    if not LIBRARY.exists():
        pytest.skip(f"{LIBRARY} not built (make -C native)")
    base = Path(tempfile.mkdtemp(prefix="storagefs-pt-", dir="/var/tmp"))
    base.chmod(0o755)
    store, mnt = base / "store", base / "mnt"
    mnt.mkdir()
    with monkeypatch.context() as env:
        env.setenv("LD_PRELOAD", str(LIBRARY))  # the server only; the agent loads it itself
        m = _start(store, mnt)
    try:
        yield m
    finally:
        m.stop()
        shutil.rmtree(base, ignore_errors=True)


def _server_pid(m: Mount) -> int:
    """The Python server: the child unshare exec'd into (same pid)."""
    return m.proc.pid


def test_passthrough_is_used_and_posix_holds(mount: Mount) -> None:
    sh, backing = mount.sh, mount.store / "tree"
    src = mount.store.parent / "src.bin"
    src.write_bytes(os.urandom(4 * MiB))

    # written through passthrough: the same bytes on the backing disk, size seen by stat
    sh(f"cp {src} f && cmp {src} f")
    assert (backing / "f").read_bytes() == src.read_bytes()
    assert sh("stat -c %s f").strip() == str(4 * MiB)

    # a read of an open file needs no server: stop it, the read still completes
    reader = subprocess.Popen(
        ["nsenter", "-t", str(_server_pid(mount)), "-m", "--", sys.executable, "-c",
         "import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); print('open', flush=True); "
         "sys.stdin.readline(); print(len(os.pread(fd, 4 << 20, 0)), flush=True)",
         str(mount.mnt / "f")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert reader.stdout is not None and reader.stdin is not None
    assert reader.stdout.readline().strip() == "open"
    os.kill(_server_pid(mount), signal.SIGSTOP)
    try:
        reader.stdin.write("go\n")
        reader.stdin.flush()
        ready, _, _ = select.select([reader.stdout], [], [], 10)
        got = reader.stdout.readline().strip() if ready else "no answer in 10 s"
    finally:
        os.kill(_server_pid(mount), signal.SIGCONT)
        reader.kill()
        reader.wait()
    assert got == str(4 * MiB), f"read while the server was stopped: {got}"

    # two appenders at once lose no line
    sh(
        "for w in x y; do (i=0; while [ $i -lt 200 ]; do echo $w$i >> log; i=$((i+1)); done) & "
        "done; wait; test $(wc -l < log) -eq 400"
    )

    # a write in the middle, truncate down and up (through an open descriptor), mmap
    sh("printf ABCD | dd of=f bs=1 seek=1000 conv=notrunc status=none")
    assert (backing / "f").read_bytes()[1000:1004] == b"ABCD"
    sh(f"{sys.executable} -c \"import os; fd=os.open('f', os.O_RDWR); os.ftruncate(fd, 5000); "
       f"os.ftruncate(fd, 8192); os.close(fd)\"")  # fmt: skip
    assert sh("stat -c %s f").strip() == "8192"
    assert (backing / "f").read_bytes()[5000:] == bytes(3192)
    sh(f"{sys.executable} -c \"import mmap, os; fd=os.open('f', os.O_RDWR); "
       f"m=mmap.mmap(fd, 8192); m[0:5]=b'MMAP!'; m.flush(); m.close(); os.close(fd)\"")  # fmt: skip
    assert sh("head -c 5 f") == "MMAP!"
    assert (backing / "f").read_bytes()[:5] == b"MMAP!"

    # hard link: both names open at once, one inode, the same bytes
    sh("ln f hl && exec 3<f 4>>hl && printf tail >&4 && exec 3<&- 4>&- && tail -c 4 f")
    assert (backing / "f").read_bytes().endswith(b"tail")

    # mtime moves with a write
    sh("touch -d '2001-02-03 04:05:06' f && printf x >> f")
    assert int(sh("stat -c %Y f")) > 981173106

    # a non-root writer drops the set-user-id bit (the kernel asks security.capability and
    # mode before the write; the library answers the first)
    sh("printf data > suid && chown 1234:1234 suid && chmod 4755 suid")
    sh("printf more >> suid", user=1234)
    assert sh("stat -c %a suid").strip() == "755"

    # a program written through passthrough runs
    sh("printf '#!/bin/sh\\necho ran\\n' > prog && chmod +x prog")
    assert sh("./prog").strip() == "ran"
