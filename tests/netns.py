"""Several "hosts" on this one machine for the SLURM tests: a bridge with the controller's address
and, per node, a network namespace of its own joined to the bridge by a veth pair, with its own
address in one private /24 made for the test (docs/multinode.md, "Recipe", as measured).
Those addresses and loopback are the only ones the tests contact; `down()` removes the namespaces,
the veths and the bridge.

A process runs "on" node nK through `wrap(node, argv)`: nsenter into the node's network namespace,
then unshare a UTS namespace (its own host name) and a mount namespace in which the network's hosts
file is bind-mounted over /etc/hosts, so that nK, its peers and the controller resolve as they do on
a real cluster. slurmd started this way hands all of it to the job steps it starts.
Not `ip netns exec`: it remounts /sys, and slurmd then finds no cgroup hierarchy.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import signal
import subprocess
from pathlib import Path

NETNS_DIR = Path("/var/run/netns")
PREFIX = "phi4t"  # every namespace, bridge and veth made here starts with this


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and r.returncode != 0:
        raise NetworkError(f"ip {' '.join(args)}: {r.stderr.strip() or r.returncode}")
    return r


class NetworkError(RuntimeError):
    pass


def missing_reason() -> str | None:
    """Why network namespaces cannot be made here, as one line, or None when they can."""
    for tool in ("ip", "nsenter", "unshare", "mount"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode != 0:
            return f"no `{tool}` on PATH: the two-node cluster needs iproute2 and util-linux"
    if os.geteuid() != 0:
        return "network namespaces need root: run the tests as root"
    probe = f"{PREFIX}probe{os.getpid()}"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"cannot make a network namespace here (ip netns add: {r.stderr.strip()})"
    _ip("netns", "del", probe, check=False)
    return None


def remove_stale() -> None:
    """Namespaces and bridges a killed test session left behind (their tag names a dead pid)."""
    for name in _names("netns", "list"):
        pid = re.match(rf"{PREFIX}(\d+)-", name)
        if pid and not Path(f"/proc/{pid.group(1)}").exists():
            _kill_all(name)
            _ip("netns", "del", name, check=False)
    for name in _names("-o", "link", "show", "type", "bridge"):
        pid = re.match(rf"{PREFIX}(\d+)br$", name)
        if pid and not Path(f"/proc/{pid.group(1)}").exists():
            _ip("link", "del", name, check=False)


def _names(*args: str) -> list[str]:
    out = _ip(*args, check=False).stdout
    if args[0] == "netns":
        return [line.split()[0] for line in out.splitlines() if line.strip()]
    return [m.group(1) for m in re.finditer(r"^\d+:\s+([^:@\s]+)", out, re.M)]


def _kill_all(namespace: str) -> None:
    for pid in _ip("netns", "pids", namespace, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.231.0.0/16 that no address or route of this machine touches."""
    used = [ipaddress.ip_network(m.group(1), strict=False)
            for m in re.finditer(r"inet (\S+)", _ip("-o", "-4", "addr").stdout)]
    for line in _ip("-4", "route").stdout.splitlines():
        word = line.split()[0] if line.split() else ""
        if re.fullmatch(r"[\d.]+(/\d+)?", word):
            used.append(ipaddress.ip_network(word, strict=False))
    start = os.getpid() % 256
    for i in range(256):
        net = ipaddress.ip_network(f"10.231.{(start + i) % 256}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise NetworkError("no free /24 in 10.231.0.0/16 for the test network")


class Network:
    """The controller's bridge and one namespace per node; `hosts` is the hosts file every node sees."""

    def __init__(self, nodes: list[str], root: Path, controller: str):
        self.tag = f"{PREFIX}{os.getpid()}"
        self.nodes = list(nodes)
        self.bridge = f"{self.tag}br"
        if len(self.bridge) > 15:
            raise NetworkError(f"interface name {self.bridge} is over 15 characters")
        subnet = _free_subnet()
        hosts = list(subnet.hosts())
        self.prefix = subnet.prefixlen
        self.controller_address = str(hosts[0])
        self.addresses = {node: str(hosts[10 + i]) for i, node in enumerate(self.nodes)}
        self.hosts = Path(root) / "hosts"
        self.hosts.write_text("127.0.0.1 localhost\n" + f"{self.controller_address} {controller}\n"
                              + "".join(f"{a} {n}\n" for n, a in self.addresses.items()))
        self._made: list[tuple[str, str]] = []

    def namespace(self, node: str) -> str:
        return f"{self.tag}-{node}"

    def up(self) -> Network:
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            self._made.append(("link", self.bridge))
            _ip("addr", "add", f"{self.controller_address}/{self.prefix}", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i, node in enumerate(self.nodes):
                ns, host_end = self.namespace(node), f"{self.tag}v{i}"
                _ip("netns", "add", ns)
                self._made.append(("netns", ns))
                _ip("link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
                self._made.append(("link", host_end))
                _ip("link", "set", host_end, "master", self.bridge)
                _ip("link", "set", host_end, "up")
                _ip("-n", ns, "addr", "add", f"{self.addresses[node]}/{self.prefix}", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.down()
            raise
        return self

    def wrap(self, node: str, argv: list[str]) -> list[str]:
        """argv run on `node`: its network, its host name, the network's hosts file."""
        inner = (f"mount --bind {shlex.quote(str(self.hosts))} /etc/hosts && hostname {shlex.quote(node)} && "
                 f"exec {shlex.join(argv)}")
        return ["nsenter", f"--net={NETNS_DIR / self.namespace(node)}",
                "unshare", "--uts", "--mount", "--propagation", "private", "sh", "-c", inner]

    def pids(self, node: str) -> list[int]:
        """Every process in the node's network namespace (slurmd, its steps, their tasks)."""
        out = _ip("netns", "pids", self.namespace(node), check=False).stdout
        return [int(p) for p in out.split()]

    def down(self) -> None:
        """End every process left in the namespaces, then remove what up() made (veths go with them)."""
        for kind, name in reversed(self._made):
            if kind == "netns":
                _kill_all(name)
                _ip("netns", "del", name, check=False)
            else:
                _ip("link", "del", name, check=False)
        self._made.clear()
