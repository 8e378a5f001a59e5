"""Unmovable processes are found before freezing: canned /proc text and live children."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from dunix.errors import MigrationFailed
from dunix.migrate.cpufeatures import CpuFeatures
from dunix.migrate.eligibility import (
    cpu_reason,
    listening_inodes,
    reason_for_fd,
    reasons_from_maps,
    require_movable,
    tracer_of,
    unmovable_reasons,
)

MAPS = textwrap.dedent(
    """\
    55d0c0000000-55d0c0001000 r--p 00000000 fe:00 1234   /usr/bin/python3.11
    7f0000000000-7f0000001000 rw-s 00000000 00:1a 99     /dev/shm/psm_abc
    7f0000001000-7f0000002000 rw-s 00000000 00:01 32768  /SYSV00000000 (deleted)
    7f0000002000-7f0000003000 rw-s 00000000 00:01 77     /memfd:pool (deleted)
    7f0000003000-7f0000004000 rw-p 00000000 00:01 78     /memfd:private (deleted)
    7f0000004000-7f0000005000 rw-s 00000000 00:01 79     /dev/zero (deleted)
    7f0000005000-7f0000006000 rw-s 00000000 fe:00 4321   /var/lib/app/data.db
    7f0000006000-7f0000007000 rw-s 00000000 00:0f 80     anon_inode:[io_uring]
    7f0000007000-7f0000008000 rw-p 00000000 00:00 0
    7ffc00000000-7ffc00001000 r-xp 00000000 00:00 0      [vdso]
    """
)


def test_maps_shared_memory_but_not_own_files_or_private() -> None:
    kinds = {r.detail: r.kind for r in reasons_from_maps(MAPS)}
    assert kinds == {
        "maps POSIX shared memory /dev/shm/psm_abc": "shared-memory",
        "maps System V shared memory /SYSV00000000 (deleted)": "shared-memory",
        "maps a shared memfd /memfd:pool (deleted)": "shared-memory",
        "maps shared anonymous memory": "shared-memory",
        "maps an io_uring ring (CRIU cannot dump io_uring)": "io_uring",
    }


def chr_mode() -> int:
    return stat.S_IFCHR | 0o666


def test_device_fds() -> None:
    assert reason_for_fd(0, "/dev/null", chr_mode(), os.makedev(1, 3)) is None
    assert reason_for_fd(1, "/dev/pts/3", chr_mode(), os.makedev(136, 3)) is None
    assert reason_for_fd(2, "/dev/tty", chr_mode(), os.makedev(5, 0)) is None
    fuse = reason_for_fd(5, "/dev/fuse", chr_mode(), os.makedev(10, 229))
    assert fuse is not None and fuse.kind == "device" and "10:229" in fuse.detail
    assert reason_for_fd(6, "/dev/shm/x", stat.S_IFREG | 0o600, 0) is None
    ring = reason_for_fd(7, "anon_inode:[io_uring]", None, None)
    assert ring is not None and ring.kind == "io_uring"


def test_listening_inodes() -> None:
    tcp = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid"
        "  timeout inode\n"
        "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 111 1\n"
        "   1: 0100007F:9C40 0100007F:1F90 01 00000000:00000000 00:00000000 00000000 0 0 222 1\n"
    )
    unix = (
        "Num       RefCount Protocol Flags    Type St Inode Path\n"
        "0000000000000000: 00000002 00000000 00010000 0001 01 333 /run/x.sock\n"
        "0000000000000000: 00000003 00000000 00000000 0001 03 444\n"
    )
    assert listening_inodes([tcp], unix) == {111, 333}


def test_tracer_of() -> None:
    assert tracer_of("Name:\tx\nTracerPid:\t0\n") == 0
    assert tracer_of("Name:\tx\nTracerPid:\t812\n") == 812


def test_cpu_reason_names_missing_features() -> None:
    old = CpuFeatures.from_flags(["sse", "sse2"])
    new = CpuFeatures.from_flags(["sse", "sse2", "avx2"])
    assert cpu_reason(old, new, "n2") is None
    reason = cpu_reason(new, old, "n2")
    assert (
        reason is not None and reason.kind == "cpu" and "n2 lacks CPU features avx2" in str(reason)
    )


def test_cpu_reason_of_a_member_without_a_load_report_says_so() -> None:
    origin = CpuFeatures.from_flags(["sse", "sse2"])
    reason = cpu_reason(origin, CpuFeatures(0, 0), "n3")
    assert reason is not None and "not known here yet" in str(reason)
    assert "lacks" not in str(reason)


@contextmanager
def child(code: str) -> Iterator[int]:
    """A Python child that runs ``code``, says ready, and sleeps until killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code + "\nimport sys, time\nprint('ready', flush=True)\n"
         "time.sleep(60)"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def kinds(pid: int) -> set[str]:
    return {r.kind for r in unmovable_reasons(pid)}


def test_a_plain_child_may_move() -> None:
    with child("import os") as pid:
        assert unmovable_reasons(pid) == []
        require_movable(pid)


def test_a_listening_child_may_not() -> None:
    with child("import socket\ns = socket.create_server(('127.0.0.1', 0))") as pid:
        assert kinds(pid) == {"listening-socket"}
        with pytest.raises(MigrationFailed, match=f"pid {pid}: fd 3 is a listening socket"):
            require_movable(pid)


def test_a_child_mapping_posix_shm_may_not() -> None:
    code = (
        "from multiprocessing import shared_memory\n"
        "m = shared_memory.SharedMemory(create=True, size=4096)\n"
        "import atexit; atexit.register(m.unlink)"
    )
    with child(code) as pid:
        assert "shared-memory" in kinds(pid)


def test_a_grandchild_counts() -> None:
    code = (
        "import subprocess, sys\n"
        "g = subprocess.Popen([sys.executable, '-c', "
        "'import socket, time; s = socket.create_server((\"127.0.0.1\", 0)); time.sleep(60)'])\n"
        "import time; time.sleep(0.5)"
    )
    with child(code) as pid:
        reasons = unmovable_reasons(pid)
        assert [r.kind for r in reasons] == ["listening-socket"]
        assert reasons[0].pid != pid
        os.kill(reasons[0].pid or 0, 9)


def test_an_io_uring_child_may_not() -> None:
    code = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "params = ctypes.create_string_buffer(120)\n"
        "fd = libc.syscall(425, 4, params)\n"  # io_uring_setup on x86-64
        "if fd < 0: print('no io_uring', flush=True); raise SystemExit"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code + "\nprint('ready', flush=True)\nimport time; time.sleep(60)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline() != "ready\n":
            pytest.skip("io_uring_setup is not available here")
        assert "io_uring" in kinds(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def test_a_gone_process() -> None:
    assert [r.kind for r in unmovable_reasons(2**22 + 12345)] == ["gone"]
