"""What one host sees of files and folders another host just changed (3-host cluster).

The owner writes its own files through FUSE passthrough (the kernel writes the backing file;
the agent never sees those writes), peers go through the owner's agent. Each case is a
sequence a job does without waiting: a folder the owner renamed (or an inode number its disk
gave again, as it did with the jobs' /tmp folders) found by a peer under its new name; a
file the owner rewrote read whole by a peer right after the writer closed it; lines
appended by the owner and two peers, all there, in order, on every host.
"""

from __future__ import annotations

import pytest

from tests.e2e.test_storagefs_cluster import hosts as hosts  # the module's cluster fixture
from tests.e2e.test_storagefs_cluster import owner, sh

pytestmark = pytest.mark.e2e


def test_a_folder_renamed_on_its_owner_is_found_by_a_peer_under_its_new_name(
    hosts: list[str],
) -> None:
    """n2's kernel still knows the folder (same inode number) under its old name: lookups
    and creates in it must go to the new one (with the old name kept first, n2 answered
    "no such file" and made g under the old name)."""
    sh("n1", "rm -rf co-src co-dst && mkdir -p co-src/sub && echo one > co-src/sub/f")
    assert sh("n2", "cat co-src/sub/f") == "one\n"
    sh("n1", "mv co-src/sub co-dst")
    assert sh("n2", "cat co-dst/f") == "one\n"
    sh("n2", "echo two > co-dst/g")
    assert sh("n1", "cat co-dst/g; ls co-dst; test -e co-src/sub || echo no-sub") == (
        "two\nf\ng\nno-sub\n"
    )
    assert sh("n3", "cat co-dst/f co-dst/g") == "one\ntwo\n"
    sh("n1", "rm -rf co-src co-dst")


@pytest.mark.parametrize("sizes", [(4, 3000), (3000, 5)], ids=["grows", "shrinks"])
def test_a_file_the_owner_rewrote_reads_whole_on_a_peer_right_after_close(
    hosts: list[str], sizes: tuple[int, int]
) -> None:
    """n2 read the old contents a moment ago (its kernel has the size cached); n1 rewrites
    the file through passthrough; n2's next open reads the new contents whole."""
    name = f"co-rewrite-{sizes[0]}"
    for round_ in range(3):
        for size in sizes:
            text = f"{round_}{size}:" + "x" * size
            sh("n1", f"printf %s '{text}' > {name}")
            assert owner("n1", name) == owner("n2", name)
            assert sh("n2", f"cat {name}") == text, (round_, size)
    sh("n1", f"rm -f {name}")


def test_lines_appended_by_the_owner_and_two_peers_are_all_there(hosts: list[str]) -> None:
    """O_APPEND from three hosts to a file n1 owns (n1's appends pass through to the backing
    file, n2's and n3's go through n1's agent): every line, in the order written, seen
    from every host right after the last one."""
    sh("n1", "rm -f co-log && : > co-log")
    expected = []
    for round_ in range(3):
        for host in ("n1", "n2", "n3"):
            line = f"{host} {round_}"
            sh(host, f"echo '{line}' >> co-log")
            expected.append(line)
        # a host reads right after its own append and the others' (sizes it cached)
        for host in ("n3", "n1", "n2"):
            assert sh(host, "cat co-log").splitlines() == expected, (host, round_)
    sh("n1", "rm -f co-log")


def test_a_file_removed_by_a_peer_is_gone_at_once_from_a_folder_another_host_made(
    hosts: list[str],
) -> None:
    """n1 made the folder, n2 a file in it (n2's kernel holds that file's entry below n1's
    folder node), n1 removes the file: at once n2 no longer sees it, and a new file of the
    name is made, not the removed one written (it was, for the entry timeout: the same
    job's next /tmp/note went into the removed file and nobody could read it)."""
    sh("n1", "rm -rf co-m && mkdir co-m")
    sh("n2", "echo a > co-m/f")
    assert owner("n1", "co-m/f") == owner("n2", "co-m/f") != owner("n1", "co-m")
    sh("n1", "rm co-m/f")
    assert sh("n2", "test -e co-m/f && echo there || echo gone; echo b > co-m/f") == "gone\n"
    assert sh("n1", "cat co-m/f") == "b\n"
    sh("n1", "rm -rf co-m")
