"""storagefs locks across hosts: flock(1), fcntl.lockf and F_GETLK, the file's owner decides.

Each test writes or updates one file from n1 and n3 (the file created on n1, so n1 owns it
and n3's locks travel to it). A read-modify-write counter is the real check: without
cluster-wide locks two hosts read the same value and one increment is lost.
"""

from __future__ import annotations

import os
import subprocess
import textwrap

import pytest

from tests.e2e.conftest import wait_for
from tests.e2e.test_storagefs_cluster import FS, sh
from tests.e2e.test_storagefs_cluster import hosts as hosts  # the module's cluster fixture

pytestmark = pytest.mark.e2e

ROUNDS = int(os.environ.get("DUNIX_LOCK_ROUNDS", "100"))


def _locks_forwarded(host: str) -> bool:
    log = sh(host, f"cat /run/dunix/hosts/{host}/agent.log", cwd="/", check=False)
    return "locks are cluster-wide" in log


@pytest.fixture(scope="module")
def lockdir(hosts: list[str]) -> str:
    if not all(_locks_forwarded(h) for h in ("n1", "n3")):
        pytest.fail("an agent says its locks stay per host (native/build/libfuselocks.so?)")
    sh("n1", "rm -rf locks && mkdir locks && printf '%08d\\n' 0 > locks/counter"
             " && : > locks/lines && printf '%08d\\n' 0 > locks/pycounter")  # fmt: skip
    return f"{FS}/locks"


def _both(script: str, timeout: float = 120 * max(1, ROUNDS // 100)) -> None:
    """Run ``script`` on n1 and n3 at once (each in its host, started together)."""
    from dunix import cluster

    procs = [
        cluster.exec_in(host, ["sh", "-ec", script.replace("HOST", host)], cwd=FS)
        for host in ("n1", "n3")
    ]
    for proc in procs:
        assert proc.wait(timeout=timeout) == 0


def test_two_hosts_under_flock_lose_no_update(lockdir: str) -> None:
    # read-modify-write of a fixed-width counter, plus an append, under flock(1)
    _both(
        textwrap.dedent(f"""
            cd {lockdir}; i=0
            while [ $i -lt {ROUNDS} ]; do
                flock counter sh -c 'n=$(cat counter); printf "%08d\\n" $(expr $n + 1) > counter
                    echo "$1" >> lines' _ HOST-$i
                i=$((i + 1))
            done
        """)
    )
    assert int(sh("n2", "cat locks/counter")) == 2 * ROUNDS
    lines = sh("n3", "cat locks/lines").split()
    assert sorted(lines) == sorted(f"{h}-{i}" for h in ("n1", "n3") for i in range(ROUNDS))


def test_two_hosts_under_lockf_lose_no_update(lockdir: str) -> None:
    script = textwrap.dedent(f"""
        import fcntl, os
        for _ in range({ROUNDS}):
            fd = os.open("{lockdir}/pycounter", os.O_RDWR)
            fcntl.lockf(fd, fcntl.LOCK_EX)
            n = int(os.pread(fd, 64, 0))
            os.pwrite(fd, b"%08d\\n" % (n + 1), 0)
            fcntl.lockf(fd, fcntl.LOCK_UN)
            os.close(fd)
    """)
    _both(f"python3 -c '{script}'")
    assert int(sh("n2", "cat locks/pycounter")) == 2 * ROUNDS


def test_a_held_lock_refuses_or_blocks_on_the_other_host(lockdir: str) -> None:
    sh("n1", f"cd {lockdir} && : > held && rm -f released")
    # n1 holds an flock and a POSIX lock on bytes 0-9 until the file 'go' appears
    holder = textwrap.dedent(f"""
        import fcntl, os, time
        fd = os.open("{lockdir}/held", os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)
        open("{lockdir}/holding", "w").close()
        while not os.path.exists("{lockdir}/go"):
            time.sleep(0.05)
        open("{lockdir}/released", "w").close()
        os.close(fd)
    """)
    sh("n1", f"rm -f holding go; python3 -c '{holder}' >/dev/null 2>&1 &")
    wait_for(lambda: "holding" in sh("n3", f"ls {lockdir}"), 15, "n1 to hold its locks")
    probe = textwrap.dedent(f"""
        import errno, fcntl, os, struct
        fd = os.open("{lockdir}/held", os.O_RDWR)
        for how in ("flock", "lockf"):
            try:
                if how == "flock":
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                else:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 5)
                print(how, "got it")
            except OSError as exc:
                print(how, errno.errorcode[exc.errno])
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 10)  # bytes 10-19 are free
        print("free range ok")
        got = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0))
        kind, _, start, length, _ = struct.unpack("hhqqi", got)
        print("getlk", kind == fcntl.F_WRLCK, start, length)
    """)
    out = sh("n3", f"python3 -c '{probe}'").split("\n")
    assert out[:4] == ["flock EAGAIN", "lockf EAGAIN", "free range ok", "getlk True 0 10"], out
    # a blocking flock on n3 waits for n1's release, then gets it
    sh("n3", f"(sleep 1; touch {lockdir}/go) >/dev/null 2>&1 &")
    waited = sh("n3", f"cd {lockdir} && flock -w 30 held sh -c 'ls released'")
    assert waited.strip() == "released"


def test_an_open_file_description_lock_goes_with_its_last_close(lockdir: str) -> None:
    """F_OFD_SETLK on n3 (n1 owns the file): held while the file is open, gone at its close."""
    sh("n1", f"cd {lockdir} && : > ofd && rm -f ofd-held ofd-go")
    holder = textwrap.dedent(f"""
        import fcntl, os, struct, sys, time
        fd = os.open("{lockdir}/ofd", os.O_RDWR)
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 1, 0))
        open("{lockdir}/ofd-held", "w").close()
        while sys.argv[1] == "wait" and not os.path.exists("{lockdir}/ofd-go"):
            time.sleep(0.05)
        os.close(fd)
    """)
    probe = textwrap.dedent(f"""
        import errno, fcntl, os
        fd = os.open("{lockdir}/ofd", os.O_RDWR)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
            print("free")
        except OSError as exc:
            print(errno.errorcode[exc.errno])
    """)
    sh("n3", f"python3 -c '{holder}' now")  # locked, then closed at once
    assert sh("n1", f"python3 -c '{probe}'").strip() == "free"
    sh("n3", f"rm -f {lockdir}/ofd-held; python3 -c '{holder}' wait >/dev/null 2>&1 &")
    wait_for(lambda: "ofd-held" in sh("n1", f"ls {lockdir}"), 15, "n3 to hold its OFD lock")
    assert sh("n1", f"python3 -c '{probe}'").strip() == "EAGAIN"
    sh("n1", f"touch {lockdir}/ofd-go")
    wait_for(lambda: sh("n1", f"python3 -c '{probe}'").strip() == "free", 15,
             "n3's OFD lock to go with its last close")  # fmt: skip


def test_two_hosts_waiting_for_each_other_get_edeadlk(lockdir: str) -> None:
    """n1 holds byte 0 and waits for byte 1, n3 holds byte 1 and waits for byte 0: one of the
    two waits is refused with EDEADLK (fcntl(2)) and the other then gets its byte."""
    sh("n1", f"cd {lockdir} && : > deadlock && rm -f dl-n1 dl-n3")
    script = textwrap.dedent(f"""
        import errno, fcntl, os, sys, time
        me, other, mine = sys.argv[1], sys.argv[2], int(sys.argv[3])
        fd = os.open("{lockdir}/deadlock", os.O_RDWR)
        fcntl.lockf(fd, fcntl.LOCK_EX, 1, mine)
        open("{lockdir}/dl-" + me, "w").close()
        deadline = time.monotonic() + 30
        while not os.path.exists("{lockdir}/dl-" + other) and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX, 1, 1 - mine)
            print("got")
        except OSError as exc:  # errorcode names EDEADLK by its alias EDEADLOCK
            print("EDEADLK" if exc.errno == errno.EDEADLK else errno.errorcode[exc.errno])
        os.close(fd)
    """)
    from dunix import cluster

    argv = ["python3", "-c", script]
    procs = [
        cluster.exec_in(host, [*argv, host, other, byte], cwd=FS, stdout=subprocess.PIPE, text=True)
        for host, other, byte in (("n1", "n3", "0"), ("n3", "n1", "1"))
    ]
    outs = [proc.communicate(timeout=60)[0].strip() for proc in procs]
    assert sorted(outs) == ["EDEADLK", "got"], outs
