"""The CPU-feature set a node advertises, and the check that a process may move.

A process restored on another host keeps running the code paths its libraries picked at
start-up (glibc's ifunc resolution, ``ld.so``'s hwcaps subdirectories), so the target must
offer every instruction-set feature the source offered. CRIU's ``cpuinfo check`` with
``cpu_cap`` compares the same thing plus the xsave layout (criu/arch/x86/cpu.c); the agent
gossips this bitfield so placement can rule out incompatible peers without asking CRIU.

Levels follow the x86-64 psABI micro-architecture levels (x86-64-v1..v4).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# Bit order is part of the wire format: append only, never reorder.
FEATURE_FLAGS: tuple[str, ...] = (
    # x86-64-v1
    "cmov", "cx8", "fpu", "fxsr", "mmx", "syscall", "sse", "sse2", "lm",
    # x86-64-v2
    "cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3",
    # x86-64-v3
    "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave",
    # x86-64-v4
    "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl",
    # others that glibc, compilers and CRIU's xsave handling care about
    "aes", "pclmulqdq", "sha_ni", "rdrand", "rdseed", "adx", "xsaveopt", "xsavec",
    "xsaves", "fsgsbase", "vaes", "vpclmulqdq", "gfni", "avx512ifma", "avx512vbmi",
    "avx512_vbmi2", "avx512_vnni", "avx512_bitalg", "avx512_vpopcntdq", "avx512_bf16",
    "avx_vnni", "amx_tile", "erms", "fsrm", "clflushopt", "clwb", "rdpid", "sse4a",
)  # fmt: skip

_BIT = {name: i for i, name in enumerate(FEATURE_FLAGS)}

LEVELS: tuple[frozenset[str], ...] = (
    frozenset(FEATURE_FLAGS[0:9]),
    frozenset(FEATURE_FLAGS[9:16]),
    frozenset(FEATURE_FLAGS[16:25]),
    frozenset(FEATURE_FLAGS[25:30]),
)


@dataclass(frozen=True)
class CpuFeatures:
    """A node's advertised features: x86-64 level (0 = not x86-64) and the flag bitfield."""

    level: int
    flags: int

    @classmethod
    def from_flags(cls, names: Iterable[str]) -> CpuFeatures:
        present = set(names)
        bits = 0
        for name in present:
            if name in _BIT:
                bits |= 1 << _BIT[name]
        level = 0
        for required in LEVELS:
            if not required <= present:
                break
            level += 1
        return cls(level, bits)

    def names(self) -> list[str]:
        return [name for name, bit in _BIT.items() if self.flags >> bit & 1]

    def can_host(self, origin: CpuFeatures) -> bool:
        """True when a process started under ``origin`` may run on a node with ``self``."""
        return origin.flags & ~self.flags == 0 and origin.level <= self.level

    def restricted_to(self, mask_names: Iterable[str] | None) -> CpuFeatures:
        """Advertise only ``mask_names`` (a test or admin knob: pretend to be an older CPU)."""
        if mask_names is None:
            return self
        return CpuFeatures.from_flags(set(self.names()) & set(mask_names))


def read_cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuFeatures:
    """The features of the first CPU in ``/proc/cpuinfo`` (all CPUs of a host are alike)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return CpuFeatures(0, 0)
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return CpuFeatures.from_flags(value.split())
    return CpuFeatures(0, 0)
