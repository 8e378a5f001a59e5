"""dunix/cluster/_cgroup.py: the CPUs a simulated host with a quota runs on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dunix.cluster import _cgroup


def host(tmp_path: Path, name: str, cpu_max: str | None = None, v1: tuple[str, str] | None = None
         ) -> str:  # fmt: skip
    path = tmp_path / name
    path.mkdir()
    if cpu_max is not None:
        (path / "cpu.max").write_text(cpu_max + "\n")
    if v1 is not None:
        (path / "cpu.cfs_quota_us").write_text(v1[0] + "\n")
        (path / "cpu.cfs_period_us").write_text(v1[1] + "\n")
    return str(path)


def test_a_small_host_gets_as_many_cpus_as_its_quota_needs_spread_by_number(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert _cgroup.host_cpus(host(tmp_path, "n1", "12500 25000")) == {0}
    assert _cgroup.host_cpus(host(tmp_path, "n2", "12500 25000")) == {1}
    assert _cgroup.host_cpus(host(tmp_path, "n5", "12500 25000")) == {0}
    assert _cgroup.host_cpus(host(tmp_path, "n6", "37500 25000")) == {2, 3}  # 1.5 CPU: two
    assert _cgroup.host_cpus(host(tmp_path, "n3", v1=("12500", "25000"))) == {2}
    # no quota, or one that needs every CPU: no pinning at all
    assert _cgroup.host_cpus(host(tmp_path, "n7", "max 25000")) is None
    assert _cgroup.host_cpus(host(tmp_path, "n8", v1=("-1", "25000"))) is None
    assert _cgroup.host_cpus(host(tmp_path, "n9", "100000 25000")) is None
    assert _cgroup.host_cpus(str(tmp_path / "missing")) is None
