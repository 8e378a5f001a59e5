"""Agent configuration: command-line flags over an optional TOML file over defaults.

Example ``/etc/dunix/dunix.toml``::

    [agent]
    name = "node7"                 # default: the host name
    listen = "192.0.2.7:7946"
    join = ["192.0.2.1:7946"]
    control = "/run/dunix/control.sock"
    tls_dir = "/etc/dunix/tls"
    sample_interval = 1.0          # seconds between load samples
    storagefs = true               # mount the shared file tree at /dunix/fs
    discover = false               # UDP multicast discovery on the local segment
    cpu_flags = []                 # advertise only these CPU flags (empty: all)
    pid_ranges = true              # job pids from this node's range (needs pid_max 2**22)
    balancer = true                # move CPU-bound processes off a hot node (agent/balance.py)

    [balancer]                     # any field of BalancerConfig (dunix/loadbalance/balancer.py)
    min_residency = 5.0

    [membership]                   # any field of MembershipConfig
    probe_interval = 0.5
"""

from __future__ import annotations

import socket
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from dunix.errors import ConfigError

DEFAULT_PORT = 7946
DEFAULT_CONTROL = Path("/run/dunix/control.sock")
DEFAULT_TLS_DIR = Path("/etc/dunix/tls")
DEFAULT_STATE_DIR = Path("/var/lib/dunix")


@dataclass(frozen=True)
class AgentConfig:
    name: str = field(default_factory=socket.gethostname)
    listen: str = f"0.0.0.0:{DEFAULT_PORT}"
    advertise: str = ""  # the address peers use; default: the listen address
    join: tuple[str, ...] = ()
    control: Path = DEFAULT_CONTROL
    tls_dir: Path = DEFAULT_TLS_DIR
    state_dir: Path = DEFAULT_STATE_DIR
    sample_interval: float = 1.0
    discover: bool = False
    discover_group: str = "239.213.0.1"
    discover_port: int = 7947
    discover_interval: float = 1.0
    cpu_flags: tuple[str, ...] | None = None
    max_frame: int = 16 * 1024 * 1024
    connect_timeout: float = 1.0
    peer_queue: int = 256
    query_timeout: float = 1.0  # seconds to wait for peers' answers (ps, kill)
    placement: str = "auto"  # default placement mode of jobs: auto, local, remote
    # storagefs (dunix/agent/storage.py): the one file tree, mounted in the agent's mount
    # namespace. Off unless asked for (`storagefs = true`, `dunix agent --storagefs`; the
    # simulated cluster's agents ask), so an agent started on a machine by a test never
    # mounts over the machine's /dunix/fs.
    storagefs: bool = False
    storagefs_mount: Path = Path("/dunix/fs")
    storagefs_store: Path = DEFAULT_STATE_DIR / "local" / "storagefs"  # the local disk folder
    storagefs_timeout: float = 10.0  # seconds an owner may take to answer a file request
    storagefs_deadline: float = 1.0  # seconds a lookup waits for silent peers
    storagefs_negative_ttl: float = 5.0  # "no such file" is cached; any creation drops it
    storagefs_list_deadline: float = 2.0  # seconds a listing waits for the peers' names
    pid_ranges: bool = True  # keep job pids in this node's range (dunix/pid/steer.py)
    membership: dict[str, Any] = field(default_factory=dict)
    # the live balancer (dunix/agent/balance.py): on unless `balancer = false`; it moves
    # only long-running CPU-bound processes, so short tests and idle jobs never see it
    balancer: bool = True
    balancer_settings: dict[str, Any] = field(default_factory=dict)  # the [balancer] table

    @property
    def address(self) -> str:
        return self.advertise or self.listen


def split_address(address: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``host:port`` (or bare host) into its parts; a clear error for anything else."""
    host, sep, port = address.rpartition(":")
    if not sep:
        return address, default_port
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise ConfigError(f"bad address {address!r}: the port must be a number") from None


_PATHS = {"control", "tls_dir", "state_dir", "storagefs_mount", "storagefs_store"}


def load_config(path: Path | None, overrides: dict[str, Any]) -> AgentConfig:
    """Defaults, then the TOML file's ``[agent]`` and ``[membership]``, then flags."""
    values: dict[str, Any] = {}
    membership: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        values.update(data.get("agent", {}))
        membership.update(data.get("membership", {}))
        if "balancer" in data:
            values["balancer_settings"] = dict(data["balancer"])
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(AgentConfig)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown agent setting(s): {', '.join(sorted(unknown))}")
    for key in _PATHS & set(values):
        values[key] = Path(values[key])
    for key in ("join", "cpu_flags"):
        if values.get(key) is not None:
            values[key] = tuple(values[key])
    config = replace(AgentConfig(), **values)
    if membership:
        config = replace(config, membership={**config.membership, **membership})
    split_address(config.listen)
    for seed in config.join:
        split_address(seed)
    return config
