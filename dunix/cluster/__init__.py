"""The local simulated cluster: N hosts on this machine, each with its own network, PID,
mount and UTS namespaces, a CPU-quota cgroup, a private /tmp and /dev/shm and its own disk
folder, joined by veth pairs on the bridge ``dunix0`` (10.213.0.0/24, no route out).

    $ sudo dunix cluster up -n 3 --cpu-quota 0.5
    $ dunix cluster status
    $ sudo dunix cluster down

Where things are (host NAME = n1..nN, index i):

- address 10.213.0.i/24 on ``eth0`` in netns ``dunix-NAME`` (/run/netns/dunix-NAME); the
  machine's end of the veth is also called ``dunix-NAME``; the bridge has 10.213.0.254;
- cgroup ``/sys/fs/cgroup/{cpu,cpuacct}/dunix/NAME`` (v1) or ``/sys/fs/cgroup/dunix/NAME``
  (v2), holding the host's init, its agent and everything they start; with a quota of
  C CPUs they also run on ceil(C) of the machine's CPUs (``_cgroup.host_cpus``), as a
  small VM has few cores, 25 ms CFS period;
- ``/run/dunix/hosts/NAME/``: ``agent.log``, ``init.log``, ``control.sock`` (the agent's);
  /run is shared with the machine, so the socket is reachable from outside;
- ``/var/lib/dunix/hosts/NAME/disk`` on the machine = ``/var/lib/dunix/local`` in the host;
- ``/run/dunix/cluster/state.json`` (the state) and ``/run/dunix/cluster/tls/`` (CA, node
  and ``admin`` client certificates).
"""

from dunix.cluster._cluster import (
    AgentArgv,
    HostInfo,
    default_agent_argv,
    down,
    exec_in,
    run_in,
    start_agent,
    status,
    up,
)
from dunix.cluster._state import (
    AGENT_PORT,
    BRIDGE,
    BRIDGE_ADDRESS,
    DEFAULT_STATE_DIR,
    LOCAL_DISK,
)

__all__ = [
    "AGENT_PORT",
    "BRIDGE",
    "BRIDGE_ADDRESS",
    "DEFAULT_STATE_DIR",
    "LOCAL_DISK",
    "AgentArgv",
    "HostInfo",
    "default_agent_argv",
    "down",
    "exec_in",
    "run_in",
    "start_agent",
    "status",
    "up",
]
