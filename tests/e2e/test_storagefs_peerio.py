"""How a peer's file is read and written on a real 3-host cluster, beyond plain reads and
writes (tests/e2e/test_storagefs_bulk.py): a peer's file is opened ``direct_io`` (its reads
and writes skip this host's page cache), and a shared mmap of it must still work."""

from __future__ import annotations

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
