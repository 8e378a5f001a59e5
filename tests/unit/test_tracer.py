"""native/build/dunix-tracer: events, exit statuses, job control and exec placement.

Needs root (ptrace of processes that change ids, seccomp without no_new_privs) and a C
compiler; docs/run.md fixes the command line and the protocol tested here."""

from __future__ import annotations

import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.unit.tracer_harness import (
    TRACER,
    Result,
    TracerRun,
    build_native,
    trace,
    untraced,
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
    assert TRACER.exists()


FAKE_DEPUTY = r"""
#include <stdio.h>
#include <unistd.h>
int main(int argc, char **argv)
{
    printf("DEPUTY pid=%d argv", (int)getpid());
    for (int i = 0; i < argc; i++)
        printf(" %s", argv[i]);
    printf("\n");
    return 0;
}
"""


@pytest.fixture(scope="session")
def fake_deputy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("deputy")
    (d / "deputy.c").write_text(FAKE_DEPUTY)
    subprocess.run(["cc", "-O2", "-o", str(d / "deputy"), str(d / "deputy.c")], check=True)
    return d / "deputy"


def kinds(r: Result) -> list[str]:
    return [m[0] for m in r.messages]


def check_protocol_frame(r: Result) -> None:
    """started first, done last, every reported process forked before it exits."""
    assert r.returncode == 0, r.stderr
    assert kinds(r)[0] == "started" and kinds(r)[-1] == "done"
    known = {r.first_pid}
    for m in r.messages:
        if m[0] == "fork":
            assert int(m[1]) in known
            known.add(int(m[2]))
        elif m[0] in ("exec", "exit", "remote", "unmovable"):
            assert int(m[1]) in known, (m, r.messages)
    exited = [int(m[1]) for m in r.of("exit")]
    assert sorted(exited) == sorted(known), r.messages


# ------------------------------------------------------------------- events and statuses


def test_script_forks_and_execs_are_reported_and_output_unchanged() -> None:
    script = "echo start; /bin/echo one; ls / > /dev/null; (true; /bin/echo two); exit 3"
    r = trace(["sh", "-c", script])
    check_protocol_frame(r)
    assert r.stdout == "start\none\ntwo\n"
    assert os.WEXITSTATUS(r.first_status) == 3
    execs = [m[2] for m in r.of("exec")]
    assert execs[0].endswith("/sh")
    assert "/bin/echo" in execs and execs.count("/bin/echo") == 2
    assert any(e.endswith("/ls") for e in execs)
    # sh forks /bin/echo, ls and the subshell; the subshell runs /bin/echo last (exec)
    assert len(r.of("fork")) >= 3
    for m in r.of("fork"):
        assert m[1] == str(r.first_pid) or int(m[1]) in {int(f[2]) for f in r.of("fork")}


def test_exit_code() -> None:
    r = trace(["bash", "-c", "exit 7"])
    check_protocol_frame(r)
    assert os.WIFEXITED(r.first_status) and os.WEXITSTATUS(r.first_status) == 7


def test_killed_by_signal_status() -> None:
    r = trace(["sh", "-c", "kill -TERM $$"])
    check_protocol_frame(r)
    assert os.WIFSIGNALED(r.first_status) and os.WTERMSIG(r.first_status) == signal.SIGTERM
    r = trace(["sh", "-c", "sleep 30 & c=$!; kill -KILL $c; wait $c; echo $?"])
    check_protocol_frame(r)
    assert r.stdout == "137\n"


def test_missing_program_is_127_as_in_a_shell() -> None:
    r = trace(["/no/such/program", "x"])
    check_protocol_frame(r)
    assert os.WEXITSTATUS(r.first_status) == 127
    assert "/no/such/program: No such file or directory" in r.stderr
    assert r.of("exec") == []


def test_home_only_runs_without_exec_stops_and_nothing_leaves(fake_deputy: Path) -> None:
    """--home-only (a `--placement local` job): no seccomp filter and no exec events, so
    no `exec` is reported and a pushed table cannot send an exec away; forks, exits and
    the statuses are as before."""
    script = "/bin/echo one; (/bin/echo two; exit 4); echo $?; grep ^Seccomp: /proc/$$/status; "
    script += "exec /bin/sh -c 'exit 5'"
    run = TracerRun(
        ["sh", "-c", f"read x; {script}"],
        ["--mode", "remote", "--home-only", "--deputy", str(fake_deputy)],
        stdin=subprocess.PIPE,
    )
    run.send("slots", "n1", "5")
    r = run.finish(input=b"go\n")
    check_protocol_frame(r)
    assert r.stdout == "one\ntwo\n4\nSeccomp:\t0\n"  # no filter
    assert os.WEXITSTATUS(r.first_status) == 5
    assert r.of("exec") == [] and r.of("remote") == []
    assert len(r.of("fork")) >= 3


def test_first_process_gets_ids_umask_cwd_signals_and_rlimits() -> None:
    opts = [
        "--uid", "65534", "--gid", "65534", "--groups", "65534,100", "--umask", "027",
        "--sigign", "1000", "--sigblock", "2", "--rlimit", "NOFILE:100:200", "--cwd", "/usr",
    ]  # fmt: skip
    r = trace(["cat", "/proc/self/status", "/proc/self/limits"], *opts)
    check_protocol_frame(r)
    status = dict(
        line.split(":", 1) for line in r.stdout.splitlines() if ":" in line and "  " not in line
    )
    assert status["Uid"].split() == ["65534"] * 4
    assert status["Gid"].split() == ["65534"] * 4
    assert sorted(status["Groups"].split()) == ["100", "65534"]
    assert status["Umask"].strip() == "0027"
    assert int(status["SigIgn"], 16) == 1 << (signal.SIGPIPE - 1)
    assert int(status["SigBlk"], 16) == 1 << (signal.SIGINT - 1)
    assert status["NoNewPrivs"].strip() == "0"
    assert status["Seccomp"].strip() == "2"
    files = next(line for line in r.stdout.splitlines() if line.startswith("Max open files"))
    assert files.split()[3:5] == ["100", "200"]
    r = trace(["pwd"], *opts)
    assert r.stdout == "/usr\n"
    r = trace(["pwd"], "--cwd", "/no/such/dir")
    assert os.WEXITSTATUS(r.first_status) == 125 and "/no/such/dir" in r.stderr


def test_rlimit_above_our_hard_limit_is_capped() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard limit to exceed")
    r = trace(["sh", "-c", "ulimit -Sn; ulimit -Hn"], "--rlimit", f"NOFILE:{soft}:{hard + 1000}")
    check_protocol_frame(r)
    assert r.stdout.split() == [str(soft), str(hard)]


def test_first_process_leads_a_new_group_unless_keep_pgrp() -> None:
    r = trace(["sh", "-c", "ps -o pgid= -p $$"])
    assert int(r.stdout) == r.first_pid
    r = trace(["sh", "-c", "ps -o pgid= -p $$"], "--keep-pgrp")
    assert int(r.stdout) == os.getpgrp()


def test_usage_errors() -> None:
    p = subprocess.run([str(TRACER), "--", "true"], capture_output=True, text=True)
    assert p.returncode != 0 and "--sock" in p.stderr
    p = subprocess.run([str(TRACER), "--sock", "0"], capture_output=True, text=True)
    assert p.returncode != 0 and "program" in p.stderr
    p = subprocess.run(
        [str(TRACER), "--sock", "0", "--mode", "far", "--", "true"], capture_output=True, text=True
    )
    assert p.returncode != 0 and "mode" in p.stderr


def test_pipeline() -> None:
    r = trace(["sh", "-c", "seq 100000 | tail -1"])
    check_protocol_frame(r)
    assert r.stdout == "100000\n"
    assert os.WEXITSTATUS(r.first_status) == 0


def test_threads_are_followed_but_not_reported() -> None:
    code = (
        "import threading\n"
        "ts = [threading.Thread(target=sum, args=(range(10000),)) for _ in range(4)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]; print('ok')"
    )
    r = trace([PY, "-c", code])
    check_protocol_frame(r)
    assert r.stdout == "ok\n"
    assert r.of("fork") == []
    assert [m[1] for m in r.of("exit")] == [str(r.first_pid)]


def test_exec_from_a_thread_keeps_the_process_pid() -> None:
    code = (
        "import os, threading\n"
        "print(os.getpid(), flush=True)\n"
        "t = threading.Thread(target=os.execv, args=('/bin/echo', ['echo', 'from thread']))\n"
        "t.start(); t.join()"
    )
    r = trace([PY, "-c", code])
    check_protocol_frame(r)
    pid, line = r.stdout.splitlines()
    assert line == "from thread" and int(pid) == r.first_pid
    assert ("exec", pid, "/bin/echo") in r.messages
    assert os.WEXITSTATUS(r.first_status) == 0


def test_vfork_and_posix_spawn_children_are_reported() -> None:
    code = (
        "import os\n"
        "pid = os.posix_spawn('/bin/echo', ['echo', 'spawned'], os.environ)\n"
        "print(pid, os.waitpid(pid, 0)[1], flush=True)"
    )
    r = trace([PY, "-c", code])
    check_protocol_frame(r)
    lines = r.stdout.splitlines()
    assert lines[0] == "spawned"
    child, status = lines[1].split()
    assert ("fork", str(r.first_pid), child) in r.messages
    assert ("exec", child, "/bin/echo") in r.messages
    assert status == "0"


def test_statically_linked_busybox_shell() -> None:
    busybox = shutil.which("busybox")
    assert busybox is not None, "busybox-static missing: scripts/setup.sh installs it"
    r = trace([busybox, "sh", "-c", "busybox echo hi; busybox true; busybox sh -c 'exit 5'"])
    check_protocol_frame(r)
    assert r.stdout == "hi\n"
    assert os.WEXITSTATUS(r.first_status) == 5
    # busybox runs applets by exec of /proc/self/exe, and the last command in place
    assert len(r.of("fork")) >= 2
    assert all(m[2].endswith(("busybox", "/proc/self/exe")) for m in r.of("exec"))
    assert len(r.of("exec")) >= 3


def test_done_waits_for_orphans() -> None:
    r = trace(["sh", "-c", "(sleep 0.3; echo late) & for i in 1 2 3 4 5; do (true &); done"])
    check_protocol_frame(r)
    assert r.stdout == "late\n"
    assert len(r.of("fork")) >= 11


def test_a_departed_agent_does_not_stop_the_job() -> None:
    run = TracerRun(["sh", "-c", "read x; /bin/echo $x"], stdin=subprocess.PIPE)
    wait_exec(run, "/sh")
    run.hang_up()
    r = run.finish(input=b"alone\n")
    assert r.returncode == 0 and r.stdout == "alone\n"


def test_loop_of_200_execs_completes() -> None:
    r = trace(["sh", "-c", "i=0; while [ $i -lt 200 ]; do /bin/true; i=$((i+1)); done; echo end"])
    check_protocol_frame(r)
    assert r.stdout == "end\n"
    assert len(r.of("exec")) == 201


def test_process_table_events_are_batched_and_the_job_status_is_not() -> None:
    """fork, exec and exit of the job's other processes ride in `batch` packets (the
    agent's cost is per packet); the first process's exit and `done` come at once, in
    order after everything before them."""
    r = trace(["sh", "-c", "i=0; while [ $i -lt 200 ]; do /bin/true; i=$((i+1)); done"])
    check_protocol_frame(r)
    assert len(r.of("fork")) == len(r.of("exit")) - 1 == 200
    assert r.packets < len(r.messages) / 4, (r.packets, len(r.messages))
    assert [m[0] for m in r.messages[-2:]] == ["exit", "done"]
    assert r.messages[-2][1] == str(r.first_pid)


# ------------------------------------------------------------------------- signals


JOB_CONTROL = r"""
state() { ps -o stat= -p "$1" | cut -c1; }
until_state() {
    i=0
    while [ $i -lt 200 ]; do
        case "$(state "$1")" in $2) return 0;; esac
        sleep 0.02; i=$((i+1))
    done
    echo "timeout waiting for $2: $(state "$1")"
}
until_running() {  # or already done: a stop that outlived the sleep ends it at once
    i=0
    while [ $i -lt 200 ]; do
        case "$(state "$1")" in [SRZ]|"") return 0;; esac
        sleep 0.02; i=$((i+1))
    done
    echo "timeout waiting to run: $(state "$1")"
}
sleep 1 & c=$!
kill -STOP $c
until_state $c '[Tt]' && echo stopped
kill -CONT $c
until_running $c && echo running
wait $c; echo "status=$?"
sleep 30 & d=$!
kill -STOP $d; until_state $d '[Tt]'
kill -TERM $d; kill -CONT $d
wait $d; echo "status=$?"
"""


def test_stop_and_continue_of_a_child_as_without_tracer() -> None:
    expected = "stopped\nrunning\nstatus=0\nstatus=143\n"
    plain = untraced(["sh", "-c", JOB_CONTROL])
    assert plain.stdout == expected
    r = trace(["sh", "-c", JOB_CONTROL])
    check_protocol_frame(r)
    assert r.stdout == expected


WAIT_UNTRACED = r"""
import os, signal, time
pid = os.fork()
if pid == 0:
    time.sleep(0.5)
    os._exit(5)
os.kill(pid, signal.SIGSTOP)
_, st = os.waitpid(pid, os.WUNTRACED)
print("stopped", os.WIFSTOPPED(st) and os.WSTOPSIG(st) == signal.SIGSTOP)
os.kill(pid, signal.SIGCONT)
_, st = os.waitpid(pid, os.WCONTINUED)
print("continued", os.WIFCONTINUED(st))
_, st = os.waitpid(pid, 0)
print("exited", os.WEXITSTATUS(st))
"""


def test_parent_waitpid_sees_stop_and_continue() -> None:
    expected = "stopped True\ncontinued True\nexited 5\n"
    assert untraced([PY, "-c", WAIT_UNTRACED]).stdout == expected
    r = trace([PY, "-c", WAIT_UNTRACED])
    check_protocol_frame(r)
    assert r.stdout == expected


HANDLER = r"""
import signal, sys, time
def on(sig, frame):
    print("got", sig, flush=True)
    sys.exit(3)
signal.signal(signal.SIGINT, on)
print("ready", flush=True)
time.sleep(30)
"""


def test_sigint_reaches_a_handler_and_sigterm_kills() -> None:
    run = TracerRun([PY, "-c", HANDLER], stdin=subprocess.DEVNULL)
    pid = int(run.wait_for(lambda m: m[0] == "started")[1])
    assert run.proc.stdout is not None
    assert select.select([run.proc.stdout], [], [], 10)[0], "no ready line"
    assert run.proc.stdout.readline() == b"ready\n"
    os.kill(pid, signal.SIGINT)
    r = run.finish()
    check_protocol_frame(r)
    assert r.stdout == f"got {int(signal.SIGINT)}\n"
    assert os.WEXITSTATUS(r.first_status) == 3

    run = TracerRun(["sleep", "30"])
    pid = int(run.wait_for(lambda m: m[0] == "exec")[1])
    os.killpg(pid, signal.SIGTERM)  # the first process leads its own group
    r = run.finish()
    check_protocol_frame(r)
    assert os.WIFSIGNALED(r.first_status) and os.WTERMSIG(r.first_status) == signal.SIGTERM


def test_sigkill_of_a_stopped_child() -> None:
    script = "sleep 30 & c=$!; kill -STOP $c; sleep 0.1; kill -KILL $c; wait $c; echo $?"
    r = trace(["sh", "-c", script])
    check_protocol_frame(r)
    assert r.stdout == "137\n"


# ------------------------------------------------------------------ exec placement


def gated(script: str, deputy: Path, *before: tuple[str, ...]) -> Result:
    """Runs `sh -c 'read x; SCRIPT'` locally up to the read, then pushes `before` so the
    execs after it are decided with the pushed table (the agent's order of events)."""
    run = TracerRun(
        ["sh", "-c", f'echo "sh=$$"; read x; {script}'],
        ["--mode", "local", "--deputy", str(deputy)],
        stdin=subprocess.PIPE,
    )
    wait_exec(run, "/sh")
    for m in before:
        run.send(*m)
    return run.finish(input=b"go\n")


def test_remote_exec_runs_the_deputy_with_same_pid_and_argv(fake_deputy: Path) -> None:
    r = gated("exec /bin/echo hello world", fake_deputy, ("slots", "n1", "2"), ("mode", "remote"))
    check_protocol_frame(r)
    sh_line, deputy_line = r.stdout.splitlines()
    pid = sh_line.removeprefix("sh=")
    assert deputy_line == f"DEPUTY pid={pid} argv /bin/echo hello world"
    assert ("remote", pid, "n1", "/bin/echo") in r.messages
    assert not [m for m in r.of("exec") if m[1] == pid and m[2] != "/usr/bin/sh"]
    i_remote = r.messages.index(("remote", pid, "n1", "/bin/echo"))
    assert kinds(r)[i_remote + 1 :].count("exec") == 0


def test_remote_mode_round_robin_and_auto_slots(fake_deputy: Path) -> None:
    script = "/bin/echo a; /bin/echo b; /bin/echo c"
    r = gated(script, fake_deputy, ("slots", "n1", "0", "n2", "0"), ("mode", "remote"))
    check_protocol_frame(r)
    assert [m[2] for m in r.of("remote")] == ["n1", "n2", "n1"]
    assert r.stdout.count("DEPUTY") == 3

    r = gated(script, fake_deputy, ("slots", "n1", "0", "n2", "1"), ("mode", "auto"))
    check_protocol_frame(r)
    assert [(m[2], m[3]) for m in r.of("remote")] == [("n2", "/bin/echo")]
    lines = r.stdout.splitlines()
    assert lines[1].startswith("DEPUTY") and lines[1].endswith("/bin/echo a")
    assert lines[2:] == ["b", "c"]


def test_remote_with_a_missing_program_stays_a_local_failure(fake_deputy: Path) -> None:
    r = gated("/no/such/prog; echo $?", fake_deputy, ("slots", "n1", "3"), ("mode", "remote"))
    check_protocol_frame(r)
    assert r.of("remote") == []
    assert r.stdout.splitlines()[1] == "127"


HOLDER_EXEC = r"""
import os, socket, sys
sys.stdin.readline()
kind = sys.argv[1]
if kind.startswith("socket"):
    s = socket.socket()
    s.set_inheritable(kind == "socket")
else:
    fds = [os.open(d, os.O_RDWR) for d in ("/dev/null", "/dev/zero", "/dev/urandom")]
    fds += os.openpty() if kind == "pty" else [os.open(kind, os.O_RDWR)]
    [os.set_inheritable(fd, True) for fd in fds]
os.execv("/bin/echo", ["/bin/echo", "real"])
"""


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("socket", "holds a socket"),
        ("socket-cloexec", None),  # gone in the exec: nothing holds the process
        ("/dev/full", "holds device /dev/full"),
        ("pty", None),  # /dev/ptmx and /dev/pts/N, with null, zero and urandom
    ],
)
def test_what_a_process_holds_decides_unmovable(
    fake_deputy: Path, kind: str, reason: str | None
) -> None:
    run = TracerRun(
        [PY, "-c", HOLDER_EXEC, kind],
        ["--mode", "local", "--deputy", str(fake_deputy)],
        stdin=subprocess.PIPE,
    )
    pid = str(wait_exec(run, os.path.basename(PY)))
    run.send("slots", "n1", "1")
    run.send("mode", "remote")
    r = run.finish(input=b"go\n")
    check_protocol_frame(r)
    if reason:
        assert r.stdout == "real\n"
        assert r.of("unmovable") == [("unmovable", pid, reason)]
        assert ("exec", pid, "/bin/echo") in r.messages
    else:
        assert r.stdout == f"DEPUTY pid={pid} argv /bin/echo real\n"
        assert r.of("remote") == [("remote", pid, "n1", "/bin/echo")]


EXECVEAT = r"""
import ctypes, os, sys
sys.stdin.readline()
libc = ctypes.CDLL(None, use_errno=True)
d = os.open("/usr/bin", os.O_PATH | os.O_DIRECTORY)
argv = (ctypes.c_char_p * 3)(b"echo", b"via-execveat", None)
envp = (ctypes.c_char_p * 1)(None)
libc.syscall(322, d, b"echo", argv, envp, 0)
print("execveat failed", ctypes.get_errno())
"""


def test_execveat_with_a_dirfd_goes_remote_with_an_absolute_path(fake_deputy: Path) -> None:
    run = TracerRun(
        [PY, "-c", EXECVEAT],
        ["--mode", "local", "--deputy", str(fake_deputy)],
        stdin=subprocess.PIPE,
    )
    pid = str(wait_exec(run, os.path.basename(PY)))
    run.send("slots", "n1", "1")
    run.send("mode", "auto")
    r = run.finish(input=b"go\n")
    check_protocol_frame(r)
    assert r.stdout == f"DEPUTY pid={pid} argv echo via-execveat\n"
    assert r.of("remote") == [("remote", pid, "n1", "/usr/bin/echo")]


def test_quit_detaches_and_the_job_goes_on() -> None:
    run = TracerRun(["sh", "-c", "read x; echo after $x"], stdin=subprocess.PIPE)
    pid = wait_exec(run, "/sh")
    run.send("quit")
    deadline = time.monotonic() + 10
    while run.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert run.proc.returncode == 0
    os.kill(pid, 0)  # still alive, no longer traced
    with open(f"/proc/{pid}/status") as f:
        assert "TracerPid:\t0\n" in f.read()
    r = run.finish(input=b"quit\n")
    assert "done" not in kinds(r)


# ------------------------------------------------------------------------- overhead


def test_overhead_of_1000_execs_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    loop = "i=0; while [ $i -lt 1000 ]; do /bin/true; i=$((i+1)); done"
    t0 = time.perf_counter()
    untraced(["sh", "-c", loop], timeout=120)
    plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = trace(["sh", "-c", loop], timeout=120)
    traced = time.perf_counter() - t0
    check_protocol_frame(r)
    with capsys.disabled():
        print(
            f"\n1000 x /bin/true: untraced {plain:.3f} s, traced {traced:.3f} s "
            f"({traced / plain:.2f}x, {(traced - plain) / 1000 * 1e3:.3f} ms per exec)"
        )


def test_first_local_keeps_only_the_first_exec_here() -> None:
    """A guest was placed already: its first exec (through execvp's PATH tries) stays."""
    run = TracerRun(
        ["sh", "-c", "echo hi; /bin/true"],
        options=["--mode", "remote", "--first-local", "--deputy", "/bin/echo"],
        before=[("slots", "nX", "5")],
    )
    result = run.finish()
    first = result.first_pid
    assert result.messages[1] == ("exec", str(first), "/usr/bin/sh")
    child = next(m[2] for m in result.messages if m[0] == "fork")
    assert ("remote", child, "nX", "/bin/true") in result.messages
    assert result.stdout.startswith("hi\n")


def test_the_deputy_is_copied_where_every_user_can_exec_it(tmp_path: Path) -> None:
    from dunix.agent.tracer import public_copy

    source = tmp_path / "private" / "dunix-deputy"
    source.parent.mkdir(mode=0o700)
    source.write_bytes(b"\x7fELF deputy")
    dest = tmp_path / "public" / "bin" / "dunix-deputy"
    assert public_copy(source, dest) == dest
    assert dest.read_bytes() == source.read_bytes()
    assert dest.stat().st_mode & 0o777 == 0o755 and dest.parent.stat().st_mode & 0o777 == 0o755
    source.write_bytes(b"\x7fELF deputy, rebuilt")
    os.utime(source, (1, 1))
    assert public_copy(source, dest).read_bytes() == b"\x7fELF deputy, rebuilt"


def test_auto_spill_order_is_taken_in_order_home_entries_stay_here(fake_deputy: Path) -> None:
    script = "; ".join(f"/bin/echo {c}" for c in "abcde")
    order = ("spill", "0", "n1", "2", ".", "1", "n2", "1")  # AT 0: spill from the first exec
    r = gated(script, fake_deputy, ("slots",), order, ("mode", "auto"))
    check_protocol_frame(r)
    assert [m[2] for m in r.of("remote")] == ["n1", "n1", "n2"]
    lines = r.stdout.splitlines()[1:]
    assert [line.startswith("DEPUTY") for line in lines] == [True, True, False, True, False]
    assert lines[2] == "c" and lines[4] == "e"  # the home's entry, then the order used up


def test_events_queued_behind_a_connection_reset_are_still_read() -> None:
    """A tracer that exits with a pushed table unread makes the kernel report ECONNRESET
    once, before the events still queued for the agent: they must not be lost."""
    import socket

    import trio

    from dunix.agent.tracer import Exited, Started, Tracer

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for packet in (b"started\x0042", b"exit\x0042\x000", b"done"):
        theirs.send(packet)
    ours.send(b"slots\x00n2\x001")  # never read by the "tracer"
    theirs.close()

    async def events() -> list[object]:
        tracer = Tracer(os.getpid(), ours)
        got = []
        while (event := await tracer.next_event()) is not None:
            got.append(event)
        return got

    got = trio.run(events)
    assert isinstance(got[0], Started) and isinstance(got[1], Exited)
    assert len(got) == 3  # and `done`
