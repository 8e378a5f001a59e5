"""A process of a traced job moves from n1 to n2 with CRIU and leaves a deputy at home,
on a real 2-host simulated cluster (root): the tracer's `release`, CRIU's dump in n1 and
restore in n2, the tracer's `deputize` at home (docs/run.md, "Tracer protocol").

No agents run (each host runs ``sleep``): the test plays the agent. It runs the tracer in
n1 with a job `sh -c 'COUNTER & wait'`; the counter appends 1, 2, 3, ... to a file under
/var/tmp (shared by the hosts), so a lost or repeated step shows as a gap or a repeat.
The deputy meets a fake agent socket (tests/unit/tracer_harness.py), which ends it with a
code that the job's shell must see from `wait`.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.e2e.conftest import exclusive_cluster, require_root, wait_for
from tests.unit.tracer_harness import FakeAgent, build_native, split_packet

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
TRACER = REPO / "native" / "build" / "dunix-tracer"
DEPUTY = REPO / "native" / "build" / "dunix-deputy"
WORK = Path("/var/tmp/dunix-e2e-deputize")

COUNTER = textwrap.dedent(
    """\
    import os, sys, time
    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    i = 0
    while True:
        i += 1
        os.write(fd, b"%d\\n" % i)
        time.sleep(0.01)
    """
)

# The job: the counter in the background, and the shell's view of its end.
JOB = (
    '"$1" -I -S -c "$2" "$3" </dev/null >/dev/null 2>&1 & '
    "c=$!; echo child=$c; wait $c; echo status=$?"
)


@pytest.fixture(scope="module")
def hosts() -> Iterator[list[Any]]:
    require_root()
    subprocess.run(["make", "-s", "-C", str(REPO / "native")], check=True)
    build_native()
    from dunix import cluster

    with exclusive_cluster():
        cluster.down()
        try:
            yield cluster.up(2, None, agent_argv=lambda h: ["sleep", "100000"])
        finally:
            cluster.down()


@pytest.fixture
def work() -> Iterator[Path]:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    yield WORK
    shutil.rmtree(WORK, ignore_errors=True)


def host_proc(host: Any) -> Path:
    return Path(f"/proc/{host.init_pid}/root/proc")


def free_pid(*hosts: Any) -> int:
    for _ in range(100):
        pid = random.randrange(20000, 30000)
        if not any((host_proc(h) / str(p)).exists() for h in hosts for p in range(pid, pid + 8)):
            return pid
    raise AssertionError("no free pid found")


def numbers(path: Path) -> list[int]:
    text = path.read_text()
    return [int(x) for x in text.splitlines()[: text.count("\n")]]


def count(path: Path) -> int:
    try:
        return len(numbers(path))
    except FileNotFoundError:
        return 0


def signal_in(proc: Path, pid: int, sig: int) -> None:
    fd = os.open(proc / str(pid), os.O_RDONLY | os.O_DIRECTORY)
    try:
        signal.pidfd_send_signal(fd, sig)
    finally:
        os.close(fd)


def state_in(proc: Path, pid: int) -> str:
    try:
        return (proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return ""


class TracerInHost:
    """dunix-tracer inside a host's namespaces, its protocol read by a thread."""

    def __init__(self, host: Any, first_pid: int, argv: list[str], env: dict[str, str]):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = ours
        self.messages: list[tuple[str, ...]] = []
        self.cond = threading.Condition()
        # the job's first process, the tracer's first fork, gets first_pid; the tracer
        # leads a session inside the host, as the agent's does (CRIU wants the job's
        # session leader in the dumped process's PID namespace)
        start = 'echo $(($1 - 1)) > /proc/sys/kernel/ns_last_pid && shift && exec "$@"'
        self.proc = subprocess.Popen(
            ["nsenter", "-t", str(host.init_pid), "-p", "-m", "-u", "-n", "--",
             "setsid", "sh", "-c", start, "sh", str(first_pid),
             str(TRACER), "--sock", str(theirs.fileno()), "--deputy", str(DEPUTY),
             "--", *argv],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        )  # fmt: skip
        theirs.close()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while data := self.sock.recv(65536):
            with self.cond:
                self.messages.extend(split_packet(data))
                self.cond.notify_all()

    def send(self, *fields: str | int) -> None:
        self.sock.send("\0".join(map(str, fields)).encode())

    def wait_for(self, kind: str, pid: int | None = None, timeout: float = 10) -> tuple[str, ...]:
        def match(m: tuple[str, ...]) -> bool:
            return m[0] in (kind, "error") and (pid is None or m[1] == str(pid))

        with self.cond:
            assert self.cond.wait_for(lambda: any(map(match, self.messages)), timeout), (
                f"no {kind} for {pid}: {self.messages}"
            )
            return next(m for m in self.messages if match(m))


def test_a_moved_process_leaves_a_deputy_with_its_pid_at_home(hosts: list[Any], work: Path) -> None:
    from dunix.migrate import swrk

    n1, n2 = hosts
    out = work / "count"
    agent = FakeAgent(work / "agent.sock", 9)
    first = free_pid(n1, n2)
    env = dict(os.environ, DUNIX_DEPUTY_SOCKET=str(agent.path))
    # the job's pids start at `first` in n1 (ns_last_pid), free in n2 too
    job = ["sh", "-c", JOB, "sh", sys.executable, COUNTER, str(out)]
    tracer = TracerInHost(n1, first, job, env)
    child = 0
    try:
        assert tracer.wait_for("started") == ("started", str(first))
        child = int(tracer.wait_for("fork", first)[2])
        assert child != first and not (host_proc(n2) / str(child)).exists()
        wait_for(lambda: count(out) >= 10, 10, "the counter to start in n1")

        tracer.send("release", child)
        assert tracer.wait_for("released", child) == ("released", str(child))
        assert state_in(host_proc(n1), child) == "T"
        images = work / "images"
        images.mkdir()
        fd = os.open(images, os.O_RDONLY | os.O_DIRECTORY)
        try:
            t0 = time.monotonic()
            # leave_running: CRIU lets go of it (stopped, as released); during post-dump
            # CRIU still traces it and a seize would fail
            in_n1 = swrk.CriuCommand.in_host(n1.init_pid)
            in_n2 = swrk.CriuCommand.in_host(n2.init_pid)
            trio.run(
                lambda: swrk.dump(child, fd, leave_running=True, shell_job=True, command=in_n1)
            )
            t1 = time.monotonic()
            restored = trio.run(lambda: swrk.restore(fd, shell_job=True, command=in_n2))
            t2 = time.monotonic()
        finally:
            os.close(fd)
        assert restored.pid == child
        assert state_in(host_proc(n2), child) == "T"  # CRIU keeps the stop it dumped
        signal_in(host_proc(n2), child, signal.SIGCONT)  # a tracer there: `seize PID cont`

        tracer.send("deputize", child, "n2")
        assert tracer.wait_for("deputized", child) == ("deputized", str(child), "n2")
        t3 = time.monotonic()
        before = count(out)
        wait_for(lambda: count(out) >= before + 20, 10, "the counter to go on in n2")
        agent.join()
        assert agent.hello[2:] == ["migrated"]
        seen = agent.at_hello
        assert seen["exe"] == str(DEPUTY) and seen["nspid"] == child  # its pid in n1
        stdout, stderr = tracer.proc.communicate(timeout=15)
        assert stdout.decode() == f"child={child}\nstatus=9\n", stderr.decode()
        print(
            f"\nrelease → deputy: dump {1000 * (t1 - t0):.0f} ms, restore "
            f"{1000 * (t2 - t1):.0f} ms, deputize {1000 * (t3 - t2):.0f} ms"
        )
    finally:
        if child:
            for h in (n2, n1):
                if state_in(host_proc(h), child) not in ("", "Z"):
                    signal_in(host_proc(h), child, signal.SIGKILL)
        tracer.proc.kill()
        tracer.proc.wait()
    time.sleep(0.05)
    got = numbers(out)
    assert got == list(range(1, len(got) + 1)), "a number was lost or repeated"
