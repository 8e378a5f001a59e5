import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dunix.loadbalance.sampler import CgroupView, LoadSampler, count_runnable, find_cgroup


def test_v1_cgroup_with_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = tmp_path / "cpu" / "dunix" / "n1"
    cpu.mkdir(parents=True)
    (cpu / "cpu.cfs_quota_us").write_text("50000\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("5:cpuacct:/dunix/n1\n4:cpu:/dunix/n1\n0::/\n")
    monkeypatch.setattr("dunix.loadbalance.sampler.CGROUP_ROOT", tmp_path)
    view = find_cgroup(proc)
    assert view == CgroupView(cpu / "tasks", 0.5)


def test_v2_cgroup_with_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cg = tmp_path / "dunix" / "n2"
    cg.mkdir(parents=True)
    (cg / "cpu.max").write_text("25000 100000\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/dunix/n2\n")
    monkeypatch.setattr("dunix.loadbalance.sampler.CGROUP_ROOT", tmp_path)
    assert find_cgroup(proc) == CgroupView(cg / "cgroup.threads", 0.25)


def test_root_cgroup_uses_the_system(tmp_path: Path) -> None:
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/\n")
    assert find_cgroup(proc).threads_file is None


def test_counts_a_busy_thread_and_averages(tmp_path: Path) -> None:
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    idle = subprocess.Popen(["sleep", "30"])
    try:
        tasks = tmp_path / "tasks"
        tasks.write_text(f"{busy.pid}\n{idle.pid}\n{os.getpid()}\n")
        # `sleep` is runnable while it starts up; wait until it sleeps
        deadline = time.monotonic() + 10
        while Path(f"/proc/{idle.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "S":
            assert time.monotonic() < deadline, "sleep never went to sleep"
            time.sleep(0.01)
        # a busy loop is R nearly always; sample a few times to avoid a preemption blip
        assert max(count_runnable(tasks, exclude={os.getpid()}) for _ in range(20)) == 1
        sampler = LoadSampler(CgroupView(tasks, 0.5), window=60.0)
        first = sampler.sample(0.0)
        assert first.cpus == 0.5
        assert first.mem_free > 0
        later = sampler.sample(60.0)
        assert 0.0 <= later.load1 <= 2.0
    finally:
        busy.kill()
        idle.kill()
        busy.wait()
        idle.wait()


def test_fresh_runnable_counts_again_only_when_older_than_asked(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks"
    tasks.write_text("")
    sampler = LoadSampler(CgroupView(tasks, 0.5))
    assert sampler.fresh_runnable(10.0) == 0
    # a grandchild: the sampler leaves its own children out (the agent's helpers)
    shell = f"{sys.executable} -c 'while True: pass' & echo $!; wait"
    busy = subprocess.Popen(["sh", "-c", shell], stdout=subprocess.PIPE, text=True)
    assert busy.stdout is not None
    loop = int(busy.stdout.readline())
    try:
        tasks.write_text(f"{loop}\n")
        assert sampler.fresh_runnable(10.01, fresh_age=0.05) == 0  # the count of 10.0
        # a new count sees the busy loop (R nearly always; a few tries for a preemption)
        assert max(sampler.fresh_runnable(10.1 + k, fresh_age=0.05) for k in range(20)) == 1
        sampler.sample(40.0)  # a sample's count serves too
        tasks.write_text("")
        assert sampler.fresh_runnable(40.02, fresh_age=0.05) in (0, 1)
        assert sampler.fresh_runnable(40.2, fresh_age=0.05) == 0
    finally:
        os.kill(loop, 9)
        busy.wait()


def test_the_callers_helpers_are_not_its_nodes_work(tmp_path: Path) -> None:
    """The agent's helpers (a job's tracer starting) are its children: not counted; a
    child running anything else (a process CRIU restored here) is work."""
    named = "import ctypes, sys; ctypes.CDLL(None).prctl(15, sys.argv[1].encode())\nwhile 1: pass"
    tracer = subprocess.Popen([sys.executable, "-c", named, "dunix-tracer"])
    restored = subprocess.Popen([sys.executable, "-c", named, "python3"])
    try:
        for proc, name in ((tracer, "dunix-tracer"), (restored, "python3")):
            comm = Path(f"/proc/{proc.pid}/comm")
            while comm.read_text().strip() != name:  # its prctl(PR_SET_NAME) ran
                time.sleep(0.01)
        tasks = tmp_path / "tasks"
        tasks.write_text(f"{tracer.pid}\n{restored.pid}\n")
        assert max(count_runnable(tasks, set()) for _ in range(20)) == 2
        assert max(count_runnable(tasks, set(), parent=os.getpid()) for _ in range(20)) == 1
        assert max(LoadSampler(CgroupView(tasks, 0.5)).runnable() for _ in range(20)) == 1
        tasks.write_text(f"{tracer.pid}\n")
        assert count_runnable(tasks, set(), parent=os.getpid()) == 0
    finally:
        for proc in (tracer, restored):
            proc.kill()
            proc.wait()
