"""How a peer's file is read and written on a real 3-host cluster, beyond plain reads and
writes (tests/e2e/test_storagefs_bulk.py): a peer's file is opened ``direct_io`` (its reads
and writes skip this host's page cache), and a shared mmap of it must still work; its
contents cross in the lane's native frames (dunix/storagefs/lane_frames.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.test_storagefs_cluster import FS, hosts, sh  # noqa: F401 (hosts: a fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("hosts")]

MMAP_WRITE = """\
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
with mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
    assert m[:5] == b"owner", m[:5]
    m[8192:8197] = b"peer!"
    m.flush()
os.close(fd)
"""


def test_a_peer_maps_an_owners_file_shared_and_writes_through_it() -> None:
    """A MAP_SHARED mmap of a direct_io file fails with ENODEV unless the INIT reply asked
    for FUSE_DIRECT_IO_ALLOW_MMAP; its writes reach the owner at msync."""
    sh("n1", "mkdir -p pio && rm -f pio/mapped && printf owner > pio/mapped"
             " && truncate -s 16384 pio/mapped")  # fmt: skip
    sh("n2", f"python3 -c '{MMAP_WRITE}' pio/mapped")
    for host in ("n1", "n3", "n2"):
        assert sh(host, "dd if=pio/mapped bs=1 skip=8192 count=5 status=none") == "peer!", host
    sh("n1", "rm -rf pio")


def test_a_peers_file_crosses_in_native_frames_both_ways() -> None:
    """n3 writes 9 MiB of n1's file (gathered batches) and reads them back (4 MiB fetches):
    byte-identical on the owner, and n1's lane served n3 in native frames."""
    sh("n1", "mkdir -p pio && : > pio/framed")
    want = sh("n3", "head -c 9437184 /dev/urandom | tee pio/framed | sha256sum")
    assert sh("n1", "sha256sum < pio/framed") == want
    assert sh("n3", "sha256sum < pio/framed") == want
    log = Path("/run/dunix/hosts/n1/agent.log").read_text(errors="replace")
    node3 = next(line for line in log.splitlines() if "bulk lane from n3 (node" in line)
    assert f"bulk lane from node {node3.rsplit('node ', 1)[1].rstrip(')')}: native frames" in log
    sh("n1", "rm -rf pio")
