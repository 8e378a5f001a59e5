"""The state file of the local cluster: what exists, so ``down`` removes exactly that.

``up`` writes the whole plan (every name it is about to create) before it creates
anything, then fills in process ids as they become known. ``down`` therefore never has
to guess: it tries to remove every planned piece and treats "already gone" as success.
The file is replaced atomically (write + rename) so a crash never leaves half a file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dunix.errors import ClusterError

STATE_VERSION = 1
DEFAULT_STATE_DIR = Path("/run/dunix/cluster")
STATE_FILE = "state.json"

#: names shared by every simulated cluster on a machine (one cluster per machine)
BRIDGE = "dunix0"
NETNS_PREFIX = "dunix-"
SUBNET = "10.213.0"
BRIDGE_ADDRESS = f"{SUBNET}.254"
PREFIXLEN = 24
AGENT_PORT = 7946
RUN_ROOT = Path("/run/dunix/hosts")
DISK_ROOT = Path("/var/lib/dunix/hosts")
#: where a host sees its own disk folder
LOCAL_DISK = Path("/var/lib/dunix/local")
MAX_HOSTS = 253


@dataclass
class HostRecord:
    """One simulated host as planned and (partly) built."""

    name: str
    index: int
    address: str
    netns: str
    veth: str
    cgroups: list[str]
    runtime_dir: str
    disk: str
    cpu_quota: float | None
    #: what ``start_agent`` runs (fixed at ``up`` time)
    agent_argv: list[str] = field(default_factory=list)
    #: the ``unshare`` parent of the init, outside the host's PID namespace
    unshare_pid: int | None = None
    init_pid: int | None = None
    init_start: int | None = None
    #: the ``nsenter`` parent of the agent, outside the host's PID namespace
    nsenter_pid: int | None = None
    agent_pid: int | None = None
    agent_start: int | None = None


@dataclass
class ClusterState:
    """Everything ``up`` made or is about to make."""

    cgroup_mode: str
    hosts: list[HostRecord]
    #: sysctl path -> value it had before ``up`` changed it
    sysctls: dict[str, str] = field(default_factory=dict)
    #: /run/netns was not a mount point before ``up`` (creating a netns makes it one)
    own_netns_dir: bool = False
    bridge: str = BRIDGE
    complete: bool = False
    version: int = STATE_VERSION

    def host(self, name: str) -> HostRecord:
        for rec in self.hosts:
            if rec.name == name:
                return rec
        raise ClusterError(f"no simulated host named {name!r}")


@contextlib.contextmanager
def locked(state_dir: Path, *, create: bool = False) -> Iterator[None]:
    """Hold an exclusive flock on the state folder (``up``, ``down`` and ``start_agent``
    must not interleave). Without the folder (and ``create`` false) there is nothing to
    guard. The lock is on the folder itself, so it leaves no file behind.
    """
    try:
        if create:
            state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        yield
        return
    except OSError as e:
        raise ClusterError(f"cannot open the cluster state folder {state_dir}: {e}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def state_path(state_dir: Path) -> Path:
    return state_dir / STATE_FILE


def save(state_dir: Path, state: ClusterState) -> None:
    """Replace the state file atomically."""
    path = state_path(state_dir)
    tmp = path.with_suffix(".tmp")
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(asdict(state), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise ClusterError(f"cannot write cluster state {path}: {e}") from e


def claim(state_dir: Path, state: ClusterState) -> None:
    """Write the first state file, failing if one exists: only one ``up`` can win."""
    path = state_path(state_dir)
    tmp = path.with_suffix(f".{os.getpid()}.new")
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(asdict(state), indent=1), encoding="utf-8")
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise ClusterError(
                f"a cluster is already up (state in {path}); run `dunix cluster down` first"
            ) from None
        finally:
            tmp.unlink()
    except OSError as e:
        raise ClusterError(f"cannot write cluster state {path}: {e}") from e


def load(state_dir: Path) -> ClusterState | None:
    """The saved state, or None when no cluster is recorded there."""
    path = state_path(state_dir)
    try:
        raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ClusterError(f"cannot read cluster state {path}: {e}") from e
    try:
        if raw.get("version") != STATE_VERSION:
            raise ClusterError(f"{path}: unknown state version {raw.get('version')!r}")
        hosts = [HostRecord(**h) for h in raw.pop("hosts")]
        return ClusterState(hosts=hosts, **raw)
    except (TypeError, KeyError) as e:
        raise ClusterError(f"{path}: malformed cluster state: {e}") from e


def remove(state_dir: Path) -> None:
    """Delete the state file (and the folder if it is then empty)."""
    for p in (state_path(state_dir), state_path(state_dir).with_suffix(".tmp")):
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise ClusterError(f"cannot remove {p}: {e}") from e
