"""The tracer's `release`, `seize` and `deputize` (docs/run.md, "Tracer protocol"): a
process at home is handed to CRIU and back, or turned into a deputy in place.

Needs root and a C compiler, as tests/unit/test_tracer.py."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from dunix.agent.tracer import (
    CommandFailed,
    Deputized,
    Done,
    Execed,
    Exited,
    JobContext,
    Released,
    Seized,
    Tracer,
)
from dunix.errors import NoSuchProcess, TracerRefused
from tests.unit.tracer_harness import (
    NATIVE,
    TRACER,
    FakeAgent,
    Message,
    TracerRun,
    build_native,
    proc_status,
    wait_exec,
)

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or os.geteuid() != 0 or shutil.which("cc") is None,
    reason="needs Linux, root and a C compiler",
)

PY = sys.executable


@pytest.fixture(scope="session", autouse=True)
def tracer_built() -> None:
    build_native()
    subprocess.run(["make", "-s", "-C", str(NATIVE), "build/dunix-deputy"], check=True)
    assert TRACER.exists() and DEPUTY.exists()


DEPUTY = NATIVE / "build" / "dunix-deputy"


def command(run: TracerRun, *fields: str, timeout: float = 10.0) -> Message:
    """Sends a command about a pid and returns the tracer's answer to it (or `error`)."""
    kind, pid = fields[0], fields[1]
    reply = {"release": "released", "seize": "seized", "deputize": "deputized"}[kind]
    seen = len(run.messages)
    run.send(*fields)
    return run.wait_for(
        lambda m: (
            m[0] in (reply, "error") and m[1] == pid and any(m is x for x in run.messages[seen:])
        ),
        timeout,
    )


def wait_state(pid: int, state: str, timeout: float = 10.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        status = proc_status(pid)
        if status["State"].startswith(state) or time.monotonic() > deadline:
            return status
        time.sleep(0.01)


def release(run: TracerRun, pid: int) -> None:
    assert command(run, "release", str(pid)) == ("released", str(pid))


# ------------------------------------------------------------------ release and seize


def test_release_leaves_it_stopped_and_untraced_seize_lets_it_go_on() -> None:
    run = TracerRun(["sh", "-c", "sleep 0.2; echo x; exit 7"])
    pid = wait_exec(run, "/sh")
    release(run, pid)
    status = wait_state(pid, "T")
    assert status["State"].startswith("T (stopped)") and status["TracerPid"] == "0"
    time.sleep(0.3)  # the sleep ends meanwhile; the shell stays stopped
    assert proc_status(pid)["State"].startswith("T")
    assert command(run, "seize", str(pid)) == ("seized", str(pid))
    r = run.finish()
    assert r.returncode == 0, r.stderr
    assert r.stdout == "x\n"
    assert os.WEXITSTATUS(r.first_status) == 7
    kinds = [m[0] for m in r.messages]
    assert kinds.index("released") < kinds.index("seized") < kinds.index("done")
    # nothing about the shell between its release and its seize
    between = r.messages[kinds.index("released") + 1 : kinds.index("seized")]
    assert all(m[1] != str(pid) for m in between), r.messages


def test_a_stopped_process_stays_stopped_across_release_and_seize() -> None:
    run = TracerRun(["sleep", "30"])
    pid = wait_exec(run, "/sleep")
    os.kill(pid, signal.SIGSTOP)
    run.wait_for(lambda m: m[0] == "stopped")
    release(run, pid)
    assert command(run, "seize", str(pid)) == ("seized", str(pid))
    time.sleep(0.1)
    assert proc_status(pid)["State"].startswith("t")  # stopped, traced by us again
    os.kill(pid, signal.SIGCONT)
    run.wait_for(lambda m: m[0] == "continued")
    os.kill(pid, signal.SIGTERM)
    r = run.finish()
    assert os.WTERMSIG(r.first_status) == signal.SIGTERM


def test_seize_cont_takes_a_stopped_stranger_and_lets_it_run() -> None:
    """As on a restore target: CRIU brings a released process back stopped."""
    stranger = subprocess.Popen(["sleep", "0.3"])
    os.kill(stranger.pid, signal.SIGSTOP)
    wait_state(stranger.pid, "T")
    run = TracerRun(["sh", "-c", "read x"], stdin=subprocess.PIPE)
    wait_exec(run, "/sh")
    pid = str(stranger.pid)
    assert command(run, "seize", pid, "cont") == ("seized", pid)
    run.wait_for(lambda m: m[:2] == ("exit", pid))
    assert stranger.wait(5) == 0
    r = run.finish(input=b"\n")
    assert not [m for m in r.messages if m[0] in ("stopped", "continued")]
    assert ("exit", pid, "0") in r.messages


THREADS = r"""
import threading, time
done = []
def work(i):
    time.sleep(0.3)
    done.append(i)
ts = [threading.Thread(target=work, args=(i,)) for i in range(3)]
[t.start() for t in ts]
print("up", flush=True)
[t.join() for t in ts]
print(sorted(done))
"""


def test_release_takes_every_thread_and_seize_brings_them_back() -> None:
    run = TracerRun([PY, "-c", THREADS])
    pid = wait_exec(run, os.path.basename(PY))
    assert run.proc.stdout is not None
    assert run.proc.stdout.readline() == b"up\n"
    release(run, pid)
    tasks = os.listdir(f"/proc/{pid}/task")
    assert len(tasks) == 4
    for tid in tasks:
        status = wait_state(int(tid), "T")
        assert status["State"].startswith("T") and status["TracerPid"] == "0", (tid, status)
    assert command(run, "seize", str(pid)) == ("seized", str(pid))
    r = run.finish()
    assert r.stdout == "[0, 1, 2]\n"
    assert os.WEXITSTATUS(r.first_status) == 0


def test_the_tracer_waits_for_a_released_orphan() -> None:
    """Its last tracee released, the tracer stays (the agent may seize it again), and
    says `done` when that process is gone."""
    for seize_again in (True, False):
        run = TracerRun(["sh", "-c", "sleep 0.5 & exit 0"])
        first, child = run_first(run), wait_exec(run, "/sleep")
        # first the shell ends: a group orphaned while it has a stopped member gets
        # SIGHUP and SIGCONT from the kernel (kernel/exit.c, kill_orphaned_pgrp)
        run.wait_for(lambda m, first=first: m[:2] == ("exit", str(first)))
        release(run, child)
        time.sleep(0.2)
        assert run.proc.poll() is None and ("done",) not in run.messages
        if seize_again:
            assert command(run, "seize", str(child)) == ("seized", str(child))
            r = run.finish()
            assert (("exit", str(child), "0")) in r.messages
        else:
            os.kill(child, signal.SIGKILL)
            r = run.finish()
            assert not [m for m in r.messages if m[0] == "exit" and m[1] == str(child)]
        assert r.messages[-1] == ("done",) and r.returncode == 0


def run_first(run: TracerRun) -> int:
    return int(run.wait_for(lambda m: m[0] == "started")[1])


def test_errors() -> None:
    run = TracerRun(["sleep", "30"])
    pid = wait_exec(run, "/sleep")
    assert command(run, "release", "999999") == ("error", "999999", "no such process traced")
    assert command(run, "seize", str(pid)) == ("error", str(pid), "traced already")
    release(run, pid)
    assert command(run, "release", str(pid)) == ("error", str(pid), "released already")
    assert command(run, "seize", str(pid)) == ("seized", str(pid))
    os.kill(pid, signal.SIGKILL)
    r = run.finish()
    assert os.WTERMSIG(r.first_status) == signal.SIGKILL


# ------------------------------------------------------------------ deputize


def deputize_job(
    tmp: Path, program: str, *, deputy: Path = DEPUTY, before: tuple[Message, ...] = ()
) -> tuple[TracerRun, FakeAgent, int, int]:
    """A shell runs `program 7>file &` and waits for it; returns the run, the fake agent
    the deputy will meet, the shell's pid and the program's pid."""
    sock = tmp / "agent.sock"
    agent = FakeAgent(sock, 5)
    script = f"{program} 7>{tmp / 'held'} & c=$!; echo child=$c; wait $c; echo status=$?"
    run = TracerRun(
        ["sh", "-c", script],
        ["--deputy", str(deputy)],
        before=before,
        env=dict(os.environ, DUNIX_DEPUTY_SOCKET=str(sock)),
    )
    first = int(run.wait_for(lambda m: m[0] == "started")[1])
    child = int(run.wait_for(lambda m: m[0] == "fork" and m[1] == str(first))[2])
    return run, agent, first, child


def check_deputy(
    run: TracerRun, agent: FakeAgent, first: int, child: int, held: bool = True
) -> None:
    """The deputy met the agent as the same process, with its fds (7: the file the shell
    opened for it after the fork), and the shell's wait saw the agent's code."""
    agent.join()
    assert agent.hello[0] == "hello" and agent.hello[2:] == ["migrated"]
    assert agent.peer_pid == child
    seen = agent.at_hello
    assert seen["exe"] == str(DEPUTY) and seen["ppid"] == first
    fds = seen["fds"]
    assert isinstance(fds, dict) and {0, 1, 2} <= set(fds)
    assert fds.get(7, "/held").endswith("/held") and (7 in fds) == held
    r = run.finish()
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"child={child}\nstatus=5\n"
    assert ("exit", str(child), str(5 << 8)) in r.messages
    assert r.messages[-1] == ("done",)


BUSY = f"{PY} -c 'while True: pass'"
THREADED_SLEEP = (
    "import threading, time; "
    "[threading.Thread(target=time.sleep, args=(30,)).start() for _ in range(3)]; "
    "time.sleep(30)"
)
STATIC_BUSY = "/bin/busybox sh -c 'while :; do :; done'"


@pytest.mark.parametrize(
    ("program", "state"),
    [
        ("sleep 30", "S"),  # stopped in a system call: rip-2
        (BUSY, "R"),  # in user code: a syscall instruction from the vDSO or libc
        ("/bin/busybox sleep 30", "S"),  # statically linked
        (STATIC_BUSY, "R"),
        (f"{PY} -c '{THREADED_SLEEP}'", "S"),  # exec ends its other threads
    ],
)
def test_deputize_keeps_pid_parent_and_fds(tmp_path: Path, program: str, state: str) -> None:
    if program.startswith("/bin/busybox"):
        assert os.path.exists("/bin/busybox"), "busybox-static missing: setup.sh installs it"
    run, agent, first, child = deputize_job(tmp_path, program)
    run.wait_for(lambda m: m[0] == "exec" and m[1] == str(child))
    assert wait_state(child, state)["State"][0] == state
    assert command(run, "deputize", str(child), "n2") == ("deputized", str(child), "n2")
    check_deputy(run, agent, first, child)


def test_deputize_after_release_as_after_a_criu_dump(tmp_path: Path) -> None:
    run, agent, first, child = deputize_job(tmp_path, "sleep 30")
    run.wait_for(lambda m: m[0] == "exec" and m[1] == str(child))
    release(run, child)
    assert wait_state(child, "T")["TracerPid"] == "0"
    assert command(run, "deputize", str(child), "n3") == ("deputized", str(child), "n3")
    check_deputy(run, agent, first, child)


def test_deputize_a_child_held_at_its_fork(tmp_path: Path) -> None:
    run, agent, first, child = deputize_job(tmp_path, "sleep 30", before=(("hold", "1"),))
    time.sleep(0.1)
    assert wait_state(child, "t")["State"][0] == "t"  # held at its first stop
    assert command(run, "deputize", str(child), "n2") == ("deputized", str(child), "n2")
    check_deputy(run, agent, first, child, held=False)  # it had not run: no fd 7 yet
    assert not [m for m in run.messages if m[0] == "exec" and m[1] == str(child)]


def test_hold_keeps_new_processes_until_resumed_or_released() -> None:
    script = "(echo one) & wait; (echo two) & c=$!; echo two=$c; wait $c; echo status=$?"
    run = TracerRun(["sh", "-c", script], before=[("hold", "1")])
    first = int(run.wait_for(lambda m: m[0] == "started")[1])
    one = int(run.wait_for(lambda m: m[0] == "fork" and m[1] == str(first))[2])
    assert wait_state(one, "t")["State"][0] == "t"  # not run yet
    run.send("resume", str(one))
    two = int(run.wait_for(lambda m: m[0] == "fork" and m[2] != str(one))[2])
    release(run, two)
    assert wait_state(two, "T")["TracerPid"] == "0"
    run.send("hold", "0")
    assert command(run, "seize", str(two)) == ("seized", str(two))
    r = run.finish()
    # `two` runs once seized, while its parent may still be printing its pid: either order
    lines = r.stdout.splitlines()
    assert lines[0] == "one" and lines[3:] == ["status=0"], r.stdout
    assert sorted(lines[1:3]) == sorted([f"two={two}", "two"]), r.stdout
    assert r.messages[-1] == ("done",)


def test_quit_lets_a_released_process_go_on() -> None:
    run = TracerRun(["sh", "-c", "sleep 0.2; echo x"])
    pid = wait_exec(run, "/sh")
    release(run, pid)
    run.send("quit")
    r = run.finish()
    assert r.returncode == 0 and r.stdout == "x\n"


def test_quit_lets_a_held_process_go() -> None:
    run = TracerRun(["sh", "-c", "(echo held) & wait"], before=[("hold", "1")])
    first = int(run.wait_for(lambda m: m[0] == "started")[1])
    child = int(run.wait_for(lambda m: m[0] == "fork" and m[1] == str(first))[2])
    wait_state(child, "t")
    run.send("quit")
    r = run.finish()
    assert r.returncode == 0 and r.stdout == "held\n"


@pytest.mark.parametrize("program", ["sleep 0.5", f"{PY} -c 'print(sum(range(10**7)))'"])
def test_a_failed_exec_of_the_deputy_leaves_the_process_as_it_was(
    tmp_path: Path, program: str
) -> None:
    deputy = tmp_path / "dunix-deputy"
    shutil.copy(DEPUTY, deputy)
    run, _agent, _first, child = deputize_job(tmp_path, program, deputy=deputy)
    run.wait_for(lambda m: m[0] == "exec" and m[1] == str(child))
    time.sleep(0.05)
    deputy.chmod(0o644)  # the tracer checked it at start; now the exec fails
    reply = command(run, "deputize", str(child), "n2")
    assert reply == ("error", str(child), "exec of the deputy failed: Permission denied")
    r = run.finish()
    out = "49999995000000\n" if "sum" in program else ""
    assert r.stdout == f"child={child}\n{out}status=0\n"


# ------------------------------------------------------------------ the agent's methods


def job_context() -> JobContext:
    return JobContext(0, 0, (0,), 0o022, "/", dict(os.environ))


def test_python_release_and_seize() -> None:
    async def main() -> None:
        out_r, out_w = os.pipe()
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            tracer = Tracer.spawn(
                job_context(), ["sh", "-c", "sleep 0.2; echo back"], {0: devnull, 1: out_w, 2: 2}
            )
        finally:
            os.close(out_w)
            os.close(devnull)
        events: list[object] = []

        async def follow() -> None:
            while (event := await tracer.next_event()) is not None:
                events.append(event)
                if isinstance(event, Done):
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow)
            while not events:
                await trio.sleep(0.01)
            first = events[0].pid  # type: ignore[attr-defined]
            await tracer.release(first)
            assert proc_status(first)["TracerPid"] == "0"
            with pytest.raises(TracerRefused, match="released already"):
                await tracer.release(first)
            with pytest.raises(NoSuchProcess):
                await tracer.seize(999999)
            await tracer.seize(first)
            with pytest.raises(TracerRefused, match="traced already"):
                await tracer.seize(first)
        assert os.read(out_r, 100) == b"back\n"
        os.close(out_r)
        await tracer.wait()
        tracer.close()
        assert Released(first) in events and Seized(first) in events
        assert any(isinstance(e, CommandFailed) for e in events)
        assert Exited(first, 0) in events

    trio.run(main)


def test_python_deputize(tmp_path: Path) -> None:
    agent = FakeAgent(tmp_path / "agent.sock", 5)
    ctx = JobContext(0, 0, (0,), 0o022, "/", dict(os.environ, DUNIX_DEPUTY_SOCKET=str(agent.path)))

    async def main() -> None:
        out_r, out_w = os.pipe()
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            script = "sleep 30 & c=$!; wait $c; echo status=$?"
            tracer = Tracer.spawn(ctx, ["sh", "-c", script], {0: devnull, 1: out_w, 2: 2})
        finally:
            os.close(out_w)
            os.close(devnull)
        events: list[object] = []

        async def follow() -> None:
            while (event := await tracer.next_event()) is not None:
                events.append(event)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow)
            while not any(isinstance(e, Execed) and e.path.endswith("sleep") for e in events):
                await trio.sleep(0.01)
            child = next(
                e.pid for e in events if isinstance(e, Execed) and e.path.endswith("sleep")
            )
            await tracer.deputize(child, "n2")
            with pytest.raises(NoSuchProcess, match="cannot seize"):
                await tracer.deputize(999999, "n2")
            await tracer.wait()
        assert os.read(out_r, 100) == b"status=5\n"
        os.close(out_r)
        tracer.close()
        assert Deputized(child, "n2") in events
        agent.join()
        assert agent.peer_pid == child and agent.hello[2:] == ["migrated"]

    trio.run(main)
