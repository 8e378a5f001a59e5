"""Messages between a client (CLI, library) and its agent.

Requests go one at a time over a channel; each gets one reply, or (for ``WatchRequest``)
a stream of events until the client hangs up. Errors come back as ``ErrorReply``.
"""

from __future__ import annotations

from dataclasses import dataclass

from dunix.wire._codec import message


@message
@dataclass(frozen=True)
class NodesRequest:
    pass


@message
@dataclass(frozen=True)
class NodeInfo:
    """One member as the answering agent sees it."""

    name: str
    address: str
    node_id: int
    state: str  # alive, suspect, dead, left
    incarnation: int
    load: float  # 1-minute run-queue load / CPU quota
    load_now: float  # instantaneous run-queue load / CPU quota
    cpus: float
    mem_free: int
    cpu_level: int
    cpu_flags: int
    procs: int
    since: float  # wall-clock time of the last state change, as the answering agent saw it


@message
@dataclass(frozen=True)
class NodesReply:
    nodes: tuple[NodeInfo, ...]


@message
@dataclass(frozen=True)
class WatchRequest:
    pass


@message
@dataclass(frozen=True)
class NodeEvent:
    """A membership change: join, suspect, alive, dead, left, id_changed."""

    kind: str
    node: NodeInfo
    time: float  # wall clock at the agent that saw it


@message
@dataclass(frozen=True)
class AgentInfoRequest:
    pass


@message
@dataclass(frozen=True)
class AgentInfo:
    name: str
    node_id: int
    address: str
    pid: int
    version: str
