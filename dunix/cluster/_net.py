"""The cluster network: bridge ``dunix0``, one named netns and veth pair per host.

Host i gets 10.213.0.i/24 on ``eth0`` inside its netns (loopback up, no default route, so
no route out); the bridge holds 10.213.0.254/24 so tools on the machine reach agents.
The veth's machine end is named after the netns (``dunix-n1``), so a leftover is easy
to recognise when the state file is lost.

br_netfilter, when loaded, sends bridged frames through iptables, where a FORWARD DROP
policy (docker sets one) would cut the hosts off from each other. The
``bridge-nf-call-*`` sysctls switch that off; they are global (an OR with the per-bridge
option, net/bridge/br_netfilter_hooks.c), so the old values are saved for ``down``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from dunix.cluster._state import BRIDGE, BRIDGE_ADDRESS, NETNS_PREFIX, PREFIXLEN
from dunix.errors import ClusterError

NETNS_DIR = Path("/run/netns")
#: locally administered unicast ("dun" + fe)
BRIDGE_MAC = "02:64:75:6e:00:fe"
BRIDGE_NF_SYSCTLS = [
    Path("/proc/sys/net/bridge/bridge-nf-call-iptables"),
    Path("/proc/sys/net/bridge/bridge-nf-call-ip6tables"),
    Path("/proc/sys/net/bridge/bridge-nf-call-arptables"),
]


@contextlib.contextmanager
def _rtnl(ns: str | None = None) -> Iterator[Any]:
    """An IPRoute socket (in netns ``ns``), with netlink/OS errors as ClusterError."""
    where = f"netns {ns}" if ns else "the machine"
    try:
        ipr = IPRoute(netns=ns) if ns else IPRoute()
    except (OSError, NetlinkError) as e:
        raise ClusterError(f"cannot open a netlink socket in {where}: {e}") from e
    try:
        yield ipr
    except (OSError, NetlinkError) as e:
        raise ClusterError(f"network setup in {where} failed: {e}") from e
    finally:
        ipr.close()


def _index(ipr: Any, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def bridge_netfilter_values() -> dict[str, str]:
    """The ``bridge-nf-call-*`` sysctls that exist and are not 0, with their values."""
    values: dict[str, str] = {}
    for path in BRIDGE_NF_SYSCTLS:
        try:
            value = path.read_text().strip()
        except FileNotFoundError:
            continue  # br_netfilter not loaded: nothing filters bridged frames
        except OSError as e:
            raise ClusterError(f"cannot read {path}: {e}") from e
        if value != "0":
            values[str(path)] = value
    return values


def disable_bridge_netfilter() -> None:
    """Set every existing ``bridge-nf-call-*`` sysctl to 0."""
    for path in bridge_netfilter_values():
        try:
            Path(path).write_text("0")
        except OSError as e:
            raise ClusterError(f"cannot set {path} to 0: {e}") from e


def restore_sysctls(old: dict[str, str]) -> None:
    for path, value in old.items():
        try:
            Path(path).write_text(value)
        except FileNotFoundError:
            continue  # br_netfilter was unloaded meanwhile
        except OSError as e:
            raise ClusterError(f"cannot restore {path} to {value}: {e}") from e


def create_bridge(owner: str, name: str = BRIDGE) -> None:
    """Create the bridge; its alias records ``owner`` (the state folder) for ``down``."""
    with _rtnl() as ipr:
        if _index(ipr, name) is not None:
            raise ClusterError(f"link {name} already exists: is a cluster up? (dunix cluster down)")
        # A fixed MAC: otherwise the bridge takes the lowest MAC of its ports and changes
        # it as veths join, leaving stale ARP entries for 10.213.0.254 in the hosts.
        ipr.link("add", ifname=name, kind="bridge", address=BRIDGE_MAC)
        idx = _index(ipr, name)
        ipr.link("set", index=idx, ifalias=owner)
        ipr.addr("add", index=idx, address=BRIDGE_ADDRESS, prefixlen=PREFIXLEN)
        ipr.link("set", index=idx, state="up")


def bridge_owner(name: str = BRIDGE) -> str | None:
    """The state folder recorded on the bridge, if the bridge exists."""
    with _rtnl() as ipr:
        idx = _index(ipr, name)
        if idx is None:
            return None
        alias = ipr.get_links(idx)[0].get_attr("IFLA_IFALIAS")
    return str(alias) if alias else None


def delete_link(name: str) -> None:
    """Delete a link on the machine if it exists (a veth goes with its peer)."""
    with _rtnl() as ipr:
        idx = _index(ipr, name)
        if idx is None:
            return
        try:
            ipr.link("del", index=idx)
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise


def create_netns(name: str) -> None:
    try:
        netns.create(name)
    except OSError as e:
        raise ClusterError(f"cannot create netns {name}: {e}") from e


def delete_netns(name: str) -> None:
    """Unmount and remove /run/netns/NAME if it exists."""
    if not os.path.lexists(netns_path(name)):
        return
    try:
        netns.remove(name)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise ClusterError(f"cannot remove netns {name}: {e}") from e


def attach_host(ns: str, veth: str, address: str, bridge: str = BRIDGE) -> None:
    """Create the veth pair ``veth`` (machine side, on the bridge) / ``eth0`` (in ``ns``)."""
    with _rtnl() as ipr:
        br = _index(ipr, bridge)
        if br is None:
            raise ClusterError(f"bridge {bridge} is missing")
        # The peer is created directly inside the netns, so "eth0" cannot clash with
        # the machine's own eth0.
        ipr.link("add", ifname=veth, kind="veth", peer={"ifname": "eth0", "net_ns_fd": ns})
        idx = _index(ipr, veth)
        ipr.link("set", index=idx, master=br, state="up")
    with _rtnl(ns) as ipr:
        lo = _index(ipr, "lo")
        ipr.link("set", index=lo, state="up")
        eth = _index(ipr, "eth0")
        ipr.addr("add", index=eth, address=address, prefixlen=PREFIXLEN)
        ipr.link("set", index=eth, state="up")


def netns_dir_mounted() -> bool:
    """Whether /run/netns is a mount point (``ip netns`` and pyroute2 make it a shared
    self-bind mount the first time they create a netns, and leave it)."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            return any(line.split()[4] == str(NETNS_DIR) for line in f)
    except OSError as e:
        raise ClusterError(f"cannot read /proc/self/mountinfo: {e}") from e


def release_netns_dir() -> None:
    """Undo the /run/netns mount that ``up`` caused, if no netns is named there now."""
    try:
        if os.listdir(NETNS_DIR):
            return  # someone else's netns lives there: leave the mount alone
    except FileNotFoundError:
        return
    if netns_dir_mounted():
        done = subprocess.run(["umount", str(NETNS_DIR)], capture_output=True, text=True)
        if done.returncode != 0:
            raise ClusterError(f"cannot unmount {NETNS_DIR}: {done.stderr.strip()}")


def leftover_netns() -> list[str]:
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(NETNS_PREFIX))
    except FileNotFoundError:
        return []


def leftover_links() -> list[str]:
    """Machine links that dunix made: the bridge and ``dunix-*`` veth ends."""
    with _rtnl() as ipr:
        names = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
    return sorted(str(n) for n in names if n and (n == BRIDGE or str(n).startswith(NETNS_PREFIX)))
