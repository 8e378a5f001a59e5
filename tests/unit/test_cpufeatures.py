from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from dunix.migrate.cpufeatures import FEATURE_FLAGS, LEVELS, CpuFeatures, read_cpu_features

V1 = set().union(*LEVELS[:1])
V2 = V1 | LEVELS[1]
V3 = V2 | LEVELS[2]
V4 = V3 | LEVELS[3]


def test_levels() -> None:
    assert CpuFeatures.from_flags([]).level == 0
    assert CpuFeatures.from_flags(V1).level == 1
    assert CpuFeatures.from_flags(V2 | {"aes"}).level == 2
    assert CpuFeatures.from_flags(V3).level == 3
    assert CpuFeatures.from_flags(V4).level == 4
    assert CpuFeatures.from_flags(V4 - {"avx2"}).level == 2  # a gap caps the level


@given(st.sets(st.sampled_from(FEATURE_FLAGS)), st.sets(st.sampled_from(FEATURE_FLAGS)))
def test_can_host_is_subset(a: set[str], b: set[str]) -> None:
    fa, fb = CpuFeatures.from_flags(a), CpuFeatures.from_flags(b)
    assert fb.can_host(fa) == (a <= b)
    assert set(fa.names()) == a


def test_restricted_set_never_hosts_the_full_one() -> None:
    full = CpuFeatures.from_flags(V4 | {"aes", "sha_ni"})
    small = full.restricted_to(V2)
    assert small.level == 2
    assert full.can_host(small) and not small.can_host(full)
    assert full.restricted_to(None) == full


def test_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: " + " ".join(sorted(V3)) + " hypervisor\n")
    assert read_cpu_features(info) == CpuFeatures.from_flags(V3)
    assert read_cpu_features(tmp_path / "missing") == CpuFeatures(0, 0)
