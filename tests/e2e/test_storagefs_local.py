"""storagefs on one host: a POSIX mini-suite through a real FUSE mount, with shell commands.

The server runs in its own private mount namespace (``unshare -m``), and every command
enters that namespace (``nsenter -m``): if anything dies, the mount dies with the
namespace, and nothing is left mounted on the machine.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

MiB = 1 << 20


@dataclass
class Mount:
    proc: subprocess.Popen[str]
    store: Path
    mnt: Path

    def sh(self, script: str, check: bool = True, user: int | None = None) -> str:
        """Run ``script`` with sh -e inside the server's mount namespace, cwd at the mount."""
        cmd = ["nsenter", "-t", str(self.proc.pid), "-m", "--"]
        if user is not None:
            cmd += ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
        cmd += ["sh", "-ec", f"cd {self.mnt}\n{script}"]
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=60, env={**os.environ, "TZ": "UTC"}
        )
        if check and done.returncode != 0:
            raise AssertionError(f"{script!r} exited {done.returncode}: {done.stderr}")
        return done.stdout

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def _require_fuse() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: mounts a FUSE file system in a private mount namespace")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse on this machine")
    for tool in ("unshare", "nsenter", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"util-linux {tool} missing")


def _start(store: Path, mnt: Path) -> Mount:
    proc = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", sys.executable, "-m",
         "dunix.storagefs.fs", "--store", str(store), "--mount", str(mnt)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 15)
    line = proc.stdout.readline() if ready else ""
    if "serving" not in line:
        proc.kill()
        _, err = proc.communicate(timeout=5)
        raise AssertionError(f"storagefs did not start: {line!r} {err}")
    return Mount(proc, store, mnt)


@pytest.fixture
def mount() -> Iterator[Mount]:
    _require_fuse()
    base = Path(tempfile.mkdtemp(prefix="storagefs-", dir="/var/tmp"))
    base.chmod(0o755)  # other users reach the mount point through it
    store, mnt = base / "store", base / "mnt"
    mnt.mkdir()
    m = _start(store, mnt)
    try:
        yield m
    finally:
        m.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_posix_mini_suite(mount: Mount) -> None:
    sh, backing = mount.sh, mount.store / "tree"
    src = mount.store.parent / "src.bin"
    src.write_bytes(os.urandom(MiB))

    # create, write, read back 1 MB byte-identical; the backing file is the same bytes
    sh(f"cp {src} f1 && cmp {src} f1")
    assert (backing / "f1").read_bytes() == src.read_bytes()

    # append, also from two writers at once: no lost line
    sh("printf 'a\\n' > log; printf 'b\\n' >> log; test \"$(cat log)\" = \"$(printf 'a\\nb')\"")
    sh(
        "for w in x y; do (i=0; while [ $i -lt 200 ]; do echo $w$i >> log2; i=$((i+1)); done) & "
        "done; wait; test $(wc -l < log2) -eq 400"
    )

    # sparse: size right, blocks small, a byte in the middle keeps it sparse
    sh("truncate -s 1G sparse")
    sh("printf X | dd of=sparse bs=1 seek=500000000 conv=notrunc status=none")
    assert sh("stat -c %s sparse").strip() == str(1 << 30)
    assert int(sh("du -k sparse").split()[0]) < 1024
    assert sh("dd if=sparse bs=1 skip=500000000 count=1 status=none") == "X"

    # mkdir, rmdir; rmdir of a non-empty folder fails
    sh("mkdir -p d/e/f && rmdir d/e/f && test ! -e d/e/f && test -d d/e")
    sh("touch d/e/g && ! rmdir d/e 2>/dev/null")

    # rename (also over an existing file), contents follow
    sh(f"mv f1 d/moved && test ! -e f1 && cmp {src} d/moved")
    sh(f"echo old > victim && mv -f d/moved victim && cmp {src} victim && mv victim d/moved")

    # hard link: same inode, link count 2; symlink
    sh("ln d/moved hl")
    ino = sh("stat -c %i d/moved").strip()
    assert sh("stat -c %i:%h hl").strip() == f"{ino}:2"
    sh(f'ln -s d/moved sl && test "$(readlink sl)" = d/moved && cmp {src} sl')
    assert sh("stat -c %F sl").strip() == "symbolic link"

    # chmod, chown, touch -d
    sh("chmod 640 hl && chown 1234:5678 hl && touch -d '2001-02-03 04:05:06' hl")
    assert sh("stat -c %a:%u:%g:%Y d/moved").strip() == "640:1234:5678:981173106"

    # the kernel checks permissions (default_permissions) against the caller's ids
    sh("cat hl > /dev/null", user=1234)
    assert "Permission denied" in (
        subprocess.run(
            ["nsenter", "-t", str(mount.proc.pid), "-m", "--", "setpriv", "--reuid=4321",
             "--regid=4321", "--clear-groups", "cat", str(mount.mnt / "hl")],
            capture_output=True, text=True, timeout=30,
        ).stderr
    )  # fmt: skip
    sh("mkdir -m 1777 pub")
    sh("touch pub/by-user && test $(stat -c %u pub/by-user) -eq 1234", user=1234)

    # cp -a keeps hard links, modes, owners and times; find -samefile finds both names
    sh("mkdir t && echo 1 > t/a && ln t/a t/b && chmod 600 t/a && touch -d @1000000000 t/a")
    sh("cp -a t t2")
    a, b = sh("stat -c %i t2/a t2/b").split()
    assert a == b != sh("stat -c %i t/a").strip()
    assert sh("stat -c %a:%Y t2/a").strip() == "600:1000000000"
    assert sorted(sh("find . -samefile t/a").split()) == ["./t/a", "./t/b"]

    # readdir lists every name, across several readdir calls
    sh("mkdir many && cd many && i=0; while [ $i -lt 300 ]; do : > n$i; i=$((i+1)); done")
    names = sh("ls -a many").split()
    assert len(names) == 302 and {".", "..", "n0", "n299"} <= set(names)
    assert sorted(sh("ls").split()) == sorted(
        ["d", "hl", "log", "log2", "many", "pub", "sl", "sparse", "t", "t2"]
    )

    # an unlinked file stays readable while open; fsync; statfs
    sh("echo still > gone && exec 3< gone && rm gone && test ! -e gone && cat <&3 | grep -q still")
    sh("dd if=/dev/zero of=synced bs=64k count=4 conv=fsync status=none && sync synced")
    assert "fuse.storagefs" in sh("df -T .")

    # a clean stop unmounts; a restart keeps every file and its inode number
    assert mount.stop() == 0
    restarted = _start(mount.store, mount.mnt)
    try:
        assert restarted.sh("stat -c %i hl").strip() == ino
        restarted.sh(f"cmp {src} d/moved")
        # unmounted from outside, the server notices and exits cleanly
        subprocess.run(
            ["nsenter", "-t", str(restarted.proc.pid), "-m", "--", "umount", str(mount.mnt)],
            check=True, timeout=30,
        )  # fmt: skip
        assert restarted.proc.wait(timeout=10) == 0
    finally:
        restarted.stop()
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(mount.mnt) not in mounts


def test_sequential_throughput(mount: Mount) -> None:
    """Not a pass/fail test: prints the mount against the backing folder directly."""
    size_mib = 256
    rows = []
    for label, folder in (("storagefs", mount.mnt), ("backing", mount.store / "tree")):
        timings = []
        for script in (
            f"dd if=/dev/zero of={folder}/tp bs=1M count={size_mib} conv=fdatasync status=none",
            f"dd if={folder}/tp of=/dev/null bs=1M status=none",
        ):
            start = time.perf_counter()
            mount.sh(script)
            timings.append(size_mib / (time.perf_counter() - start))
        rows.append(f"{label:10} write {timings[0]:7.0f} MiB/s   read {timings[1]:7.0f} MiB/s")
        mount.sh(f"rm {folder}/tp")
    table = "\n  ".join(rows)
    print(f"\nsequential 1 MiB blocks, {size_mib} MiB:\n  {table}")


METADATA_SCRIPT = """
import os, sys, time
os.chdir(sys.argv[1])
os.mkdir("meta")
rates = []
for step in ("create", "stat", "unlink"):
    start = time.perf_counter()
    for i in range(2000):
        name = f"meta/f{i}"
        if step == "create":
            os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o644))
        elif step == "stat":
            os.stat(name)
        else:
            os.unlink(name)
    rates.append(f"{step} {2000 / (time.perf_counter() - start):8.0f}/s")
os.rmdir("meta")
print("   ".join(rates))
"""


def test_metadata_rates(mount: Mount) -> None:
    """Not a pass/fail test: creates, stats and unlinks per second, mount against backing."""
    rows = []
    for label, folder in (("storagefs", mount.mnt), ("backing", mount.store / "tree")):
        out = mount.sh(f"{sys.executable} -c '{METADATA_SCRIPT}' {folder}")
        rows.append(f"{label:10} {out.strip()}")
    table = "\n  ".join(rows)
    print(f"\nmetadata, 2000 files:\n  {table}")
