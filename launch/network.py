"""The address and network interface a multi-node job's ranks reach each other by, chosen before torch starts.

What breaks first on real multi-node jobs is naming, not training. A node's own hostname often resolves to loopback
on that node (Debian and Ubuntu write ``127.0.1.1 <hostname>`` into /etc/hosts), and gloo, by default, advertises
the address its hostname resolves to: the other nodes then connect to their own loopback and every rank dies in
``connectFullMesh ... remote=[127.0.1.1]``. Nodes with several interfaces (Ethernet + InfiniBand, docker bridges)
leave gloo and NCCL to guess which one the other nodes can reach. So, on every node, before the process group starts:

- MASTER_ADDR becomes the IP address of the job's first node that every node uses: the one the other nodes resolve
  its name to. On the first node itself, where the name may be loopback, that is this node's address on the route
  to another node of the job.
- GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME, unless the user set them (their value always wins), name the interface
  that carries this node's traffic to the master. A job on one node leaves them to torch: nothing crosses a network.

Only the standard library and psutil: it runs in the launcher and in each SLURM task before torch is imported.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass

import psutil

IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


class NetworkError(RuntimeError):
    """The nodes cannot reach each other by the names they were given; the message says what to fix."""


@dataclass(frozen=True)
class NetworkPlan:
    master_name: str  # as the job or the user named the master (a hostname or an address)
    master_addr: str  # the IP address every node gives torch as MASTER_ADDR
    ifname: str  # the interface that routes to the master; "" on a single node
    why: str  # how master_addr was found, for the log

    def apply(self, environ: MutableMapping[str, str]) -> str:
        """Set MASTER_ADDR and the interface variables the user left unset in ``environ``; one line for the log."""
        environ["MASTER_ADDR"] = self.master_addr
        parts = [f"MASTER_ADDR={self.master_addr} ({self.why})"]
        for var in IFNAME_VARS:
            if environ.get(var):
                parts.append(f"{var}={environ[var]} (yours)")
            elif self.ifname:
                environ[var] = self.ifname
                parts.append(f"{var}={self.ifname} (routes to the master; set {var} to choose another)")
        if not self.ifname:
            parts.append("one node: the interfaces are left to torch")
        return "network: " + "; ".join(parts)


def resolve(name: str) -> str:
    """The address ``name`` resolves to here (an IPv4 address when it has one, as gloo and NCCL prefer)."""
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise NetworkError(
            f"cannot resolve {name!r} on {socket.gethostname()} ({e}): check the name, or give an address"
        ) from e
    addrs = [info[4][0] for info in infos]
    v4 = [a for a in addrs if ":" not in a]
    return (v4 or addrs)[0]


def is_loopback(addr: str) -> bool:
    return ipaddress.ip_address(addr.split("%")[0]).is_loopback


def source_address(dest: str) -> str:
    """This machine's address on the route to ``dest`` (the kernel's choice; a UDP connect sends nothing)."""
    family = socket.AF_INET6 if ":" in dest else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((dest, 9))  # any port: connect() on UDP only picks the route
        except OSError as e:
            raise NetworkError(f"no route from {socket.gethostname()} to {dest}: {e}") from e
        return s.getsockname()[0]


def interface_of(addr: str) -> str:
    """The interface that holds ``addr`` (a local address)."""
    want = ipaddress.ip_address(addr.split("%")[0])
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6) and ipaddress.ip_address(a.address.split("%")[0]) == want:
                return name
    raise NetworkError(f"no interface of {socket.gethostname()} holds {addr}")


def plan(master: str, *, is_master: bool, peers: Sequence[str] = (), nodes: int = 1) -> NetworkPlan:
    """How this node reaches the master.

    ``master``: the master's hostname or address, as the job gives it; ``is_master``: this node runs rank 0;
    ``peers``: names of the job's other nodes (the master finds the address they reach it by through them);
    ``nodes``: how many nodes the job spans.
    """
    addr = resolve(master)
    why = f"{master}" if addr == master else f"{master} resolves to it"
    if nodes == 1:
        return NetworkPlan(master, addr, "", why)
    if is_loopback(addr):
        here = socket.gethostname()
        if not is_master:
            raise NetworkError(
                f"the master node {master} resolves to the loopback address {addr} on {here}, which is not the "
                f"master: ranks here cannot reach it. Fix the name ({master}) in /etc/hosts or DNS on {here}"
            )
        others = [p for p in peers if p != master]
        if others:
            peer_addr = resolve(others[0])
            if is_loopback(peer_addr):
                raise NetworkError(
                    f"both {master} and {others[0]} resolve to loopback addresses on {here}: fix /etc/hosts or DNS"
                )
            addr = source_address(peer_addr)
            why = f"{master}: this node's address on the route to {others[0]}; here its name resolves to loopback"
        else:
            addr = only_address(master, addr)
            why = f"{master}: this machine's only network address; here its name resolves to loopback"
    return NetworkPlan(master, addr, interface_of(source_address(addr)), why)


def only_address(master: str, loopback: str) -> str:
    """The one IPv4 address of this machine's interfaces that are up, loopback aside; several (a docker bridge, a
    second network) are an error that lists them, since nothing here tells which one the other machines reach."""
    stats = psutil.net_if_stats()
    found = [
        (name, a.address)
        for name, addrs in psutil.net_if_addrs().items()
        for a in addrs
        if a.family == socket.AF_INET and not is_loopback(a.address) and name in stats and stats[name].isup
    ]
    if len(found) == 1:
        return found[0][1]
    listed = ", ".join(f"{name} {addr}" for name, addr in found) or "none"
    raise NetworkError(
        f"{master} resolves to the loopback address {loopback} on this machine, the main one, and it has "
        f"{len(found)} other addresses ({listed}): give the address the other machines reach it by instead of "
        "its name (or fix the name in /etc/hosts)"
    )
