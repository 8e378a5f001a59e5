"""A real build on the cluster: `dunix run -- make -j8` in a C tree under /dunix/fs.

The test writes a C project of a few dozen files on n1, builds it with make -j8 through
`dunix run` (auto placement: compilers spread over the hosts by load), and checks that
objects were compiled on at least two hosts (an object lives on the host that wrote it:
its inode number names the owner) and that objects, program and output equal a plain
local build of the same sources on n1's own disk.
"""

from __future__ import annotations

import textwrap

import pytest

from tests.e2e.conftest import wait_for
from tests.e2e.test_storagefs_cluster import FS, _dunix_cmd, node_ids, owner, sh
from tests.e2e.test_storagefs_cluster import hosts as hosts  # the module's cluster fixture

pytestmark = pytest.mark.e2e

MODULES = 36

MAKEFILE = """\
SRCS := $(sort $(wildcard m[0-9]*.c)) main.c
OBJS := $(SRCS:.c=.o)
CFLAGS := -O2 -fno-ident
prog: $(OBJS)
\t$(CC) -o $@ $(OBJS)
%.o: %.c common.h
\t$(CC) $(CFLAGS) -c -o $@ $<
"""


def _project() -> str:
    """A shell script that writes the project into the current folder."""
    parts = ["cat > Makefile <<'EOF'\n" + MAKEFILE + "EOF"]
    header = "".join(f"unsigned long m{i:02d}(unsigned long);\n" for i in range(MODULES))
    parts.append("cat > common.h <<'EOF'\n" + header + "EOF")
    for i in range(MODULES):
        # enough work for the compiler that a parallel build has something to spread
        body = textwrap.dedent(f"""\
            #include "common.h"
            static unsigned long mix(unsigned long x, int k) {{
                for (int j = 0; j < 64 + k; j++) x = x * 6364136223846793005UL + {i} + j;
                return x ^ (x >> 29);
            }}
            unsigned long m{i:02d}(unsigned long x) {{
                unsigned long acc = x;
                for (int k = 0; k < 16; k++) acc += mix(acc + k, k) * (k + {i + 1});
                return acc;
            }}
        """)
        parts.append(f"cat > m{i:02d}.c <<'EOF'\n{body}EOF")
    calls = "".join(f"    x = m{i:02d}(x);\n" for i in range(MODULES))
    main = (
        '#include <stdio.h>\n#include "common.h"\nint main(void) {\n'
        f"    unsigned long x = 1;\n{calls}"
        '    printf("%lu\\n", x);\n    return 0;\n}\n'
    )
    parts.append(f"cat > main.c <<'EOF'\n{main}EOF")
    return "\n".join(parts) + "\n"


def test_make_j8_across_hosts_equals_a_local_build(hosts: list[str]) -> None:
    from dunix import cluster

    project = _project()
    sh("n1", "rm -rf buildtree && mkdir buildtree")
    sh("n1", project, cwd=f"{FS}/buildtree")
    done = cluster.run_in(
        "n1",
        ["sh", "-c", f"{_dunix_cmd()} run --control /run/dunix/hosts/n1/control.sock"
                     " -- make -j8 2>&1"],
        capture_output=True, text=True, timeout=300, cwd=f"{FS}/buildtree",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    objects = [f"m{i:02d}.o" for i in range(MODULES)] + ["main.o"]
    owners = {o: owner("n1", f"buildtree/{o}") for o in objects}
    ids = node_ids()
    built_on = {name for name, node in ids.items() if node in owners.values()}
    print(f"objects per host: { {n: list(owners.values()).count(ids[n]) for n in hosts} }")
    assert len(built_on) >= 2, owners

    # the same sources built plainly on n1's own disk (not storagefs, not dunix)
    local = "/var/lib/dunix/local/buildtree-local"
    sh("n1", f"rm -rf {local} && mkdir -p {local}", cwd="/")
    sh("n1", project, cwd=local)
    sh("n1", "make -j8 >/dev/null", cwd=local, timeout=300)
    sums = "sha256sum " + " ".join([*objects, "prog"])
    for name in hosts:  # every host sees the same result
        assert sh(name, sums, cwd=f"{FS}/buildtree") == sh("n1", sums, cwd=local)
    expected = sh("n1", "./prog", cwd=local)
    for name in hosts:
        assert sh(name, "./prog", cwd=f"{FS}/buildtree") == expected
    sh("n1", f"rm -rf {local}", cwd="/")


def test_a_job_asking_for_it_sees_one_tmp_on_every_host(hosts: list[str]) -> None:
    """DUNIX_JOB_TMP: a storagefs folder bound over /tmp for each of the job's tracers."""
    from dunix import cluster

    # builtins only where the host matters (any exec of a forced-remote job may move)
    sh(
        "n1",
        textwrap.dedent("""
        cat > jobtmp.sh <<'EOF'
        read h < /proc/sys/kernel/hostname; echo $h > /tmp/note; echo wrote $h
        for i in 1 2 3 4; do
            sh -c 'read h < /proc/sys/kernel/hostname; read n < /tmp/note
                   echo "$h read $n" >> /tmp/log'
        done
        cat /tmp/log; echo $DUNIX_JOB_TMP
        EOF
    """),
    )
    for name in hosts:
        sh(name, "rm -f /tmp/note", cwd="/")
    done = cluster.run_in(
        "n1",
        ["sh", "-c", f"DUNIX_JOB_TMP=1 {_dunix_cmd()} run --control"
                     " /run/dunix/hosts/n1/control.sock --placement remote -- sh jobtmp.sh"],
        capture_output=True, text=True, timeout=120, cwd=FS,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    wrote, *lines, folder = done.stdout.split("\n")[:-1]
    assert folder.startswith(f"{FS}/.dunix-jobs/") and folder.endswith("/tmp"), done.stdout
    writer = wrote.split()[1]
    readers = [line.split() for line in lines]
    assert len(readers) == 4 and all(r[1:] == ["read", writer] for r in readers), lines
    # the execs forced remote ran on other hosts and still read the writer's /tmp/note
    assert {r[0] for r in readers} - {writer}, lines
    # no host's own /tmp was touched, and the job's folder goes with the job (removed
    # after the client heard the exit status)
    for name in hosts:
        assert sh(name, "test -e /tmp/note && echo there || echo absent", cwd="/") == "absent\n"
        wait_for(lambda name=name: sh(name, f"test -e {folder} || echo gone") == "gone\n", 15,
                 f"the job's /tmp folder to go ({name})")  # fmt: skip


def test_a_job_outside_storagefs_runs_at_home_where_peers_cannot_follow(
    hosts: list[str],
) -> None:
    """A cwd only the home sees (its private /tmp): execs stay home and the log says why."""
    from dunix import cluster

    sh("n1", "rm -rf /tmp/only-here && mkdir /tmp/only-here", cwd="/")
    script = 'for i in 1 2 3; do sh -c "read h < /proc/sys/kernel/hostname; echo \\$h"; done'
    done = cluster.run_in(
        "n1",
        ["sh", "-c", f"{_dunix_cmd()} run --control /run/dunix/hosts/n1/control.sock"
                     f" --placement remote -- sh -c '{script}'"],
        capture_output=True, text=True, timeout=120, cwd="/tmp/only-here",
    )  # fmt: skip
    assert (done.stdout, done.returncode) == ("n1\nn1\nn1\n", 0), done.stderr
    log = sh("n1", "cat /run/dunix/hosts/n1/agent.log", cwd="/")
    assert "its working directory /tmp/only-here is not on" in log


def test_files_only_the_home_sees(hosts: list[str]) -> None:
    """The home's private /tmp (cwd on /dunix/fs): output redirected into a file there
    comes home from the peers, whole; input read from a file there cannot be reopened on
    a peer, so that exec stays home, and the log says why."""
    from dunix import cluster

    sh("n1", "rm -f /tmp/only-here.out && echo input > /tmp/only-here.in", cwd="/")
    script = 'for i in 1 2 3; do sh -c "read h < /proc/sys/kernel/hostname; echo \\$h"; done'
    run = f"{_dunix_cmd()} run --control /run/dunix/hosts/n1/control.sock --placement remote"
    done = cluster.run_in(
        "n1",
        ["sh", "-c", f"{run} -- sh -c '{script}' > /tmp/only-here.out;"
                     f" {run} -- cat < /tmp/only-here.in"],
        capture_output=True, text=True, timeout=120, cwd=FS,
    )  # fmt: skip
    assert (done.stdout, done.returncode) == ("input\n", 0), done.stderr
    ran_on = sh("n1", "cat /tmp/only-here.out", cwd="/").split()
    assert len(ran_on) == 3 and set(ran_on) - {"n1"}, ran_on  # ran on peers
    log = sh("n1", "cat /run/dunix/hosts/n1/agent.log", cwd="/")
    assert "fd 0: /tmp/only-here.in is not on" in log
