"""The local simulated cluster: N hosts on this machine, each with its own network, PID,
mount and UTS namespaces, a CPU-quota cgroup, a private /tmp and its own disk folder,
joined by veth pairs on the bridge ``dunix0`` (10.213.0.0/24).

    $ dunix cluster up -n 3 --cpu-quota 0.5
    $ dunix cluster status
    $ dunix cluster down
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
