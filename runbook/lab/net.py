"""The lab's network: one bridge per /24 holding the gateway (.1), one netns + veth pair per host.

Names are derived from the inventory only, so a later run (or lab.down after a crash) finds
everything again without any state file. Nothing here routes anywhere: the root namespace does not
forward (we never touch ip_forward) and the hosts get no default route.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import subprocess
from pathlib import Path

from runbook.errors import RunbookError

NETNS_DIR = Path("/run/netns")


class LabError(RunbookError):
    """The lab cannot do what was asked; the message says why and what to do."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run `ip ARGS`; on failure raise LabError carrying ip's own message."""
    p = subprocess.run(["ip", *args], check=False, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {p.stderr.strip() or p.stdout.strip()}")
    return p


def lab_subnet(addresses: list[str]) -> ipaddress.IPv4Network:
    """The one /24 every lab host lives in; an error if they are spread over several."""
    nets = {ipaddress.IPv4Interface(f"{a}/24").network for a in addresses}
    if len(nets) != 1:
        raise LabError("the lab needs every host in one /24 (it bridges them behind that subnet's .1 "
                       f"gateway); the inventory spans {', '.join(sorted(map(str, nets)))}")
    net = nets.pop()
    gw = str(net.network_address + 1)
    for a in addresses:
        if a == gw or a in (str(net.network_address), str(net.broadcast_address)):
            raise LabError(f"lab host address {a} is the gateway/network/broadcast address of {net}; "
                           f"use .2-.254 ({gw} is the lab bridge)")
    return net


def bridge_name(net: ipaddress.IPv4Network) -> str:
    a, b, c, _ = str(net.network_address).split(".")
    return f"lab{a}-{b}-{c}"  # at most 14 chars (IFNAMSIZ is 16 with the NUL)


def veth_name(host: str) -> str:
    """Root-namespace end of the host's veth pair (<= 15 chars)."""
    name = f"vl-{host}"
    if len(name) <= 15:
        return name
    return f"vl-{host[:6]}{hashlib.sha256(host.encode()).hexdigest()[:6]}"


def mac(*parts: str) -> str:
    """A stable locally administered unicast MAC: a host keeps its NIC's MAC across kill/start (as real
    hardware does), so neighbours' ARP caches stay right instead of black-holing it for ~30-45 s."""
    h = hashlib.sha256("/".join(parts).encode()).hexdigest()
    return "02:" + ":".join(h[i:i + 2] for i in range(0, 10, 2))


def link_exists(name: str, netns: str | None = None) -> bool:
    args = (["-n", netns] if netns else []) + ["link", "show", "dev", name]
    return ip(*args, check=False).returncode == 0


def link_info(name: str) -> dict | None:
    p = ip("-j", "-d", "link", "show", "dev", name, check=False)
    if p.returncode != 0:
        return None
    data = json.loads(p.stdout or "[]")
    return data[0] if data else None


def link_is_up(name: str) -> bool:
    info = link_info(name)
    return info is not None and "UP" in info.get("flags", [])


def check_subnet_free(net: ipaddress.IPv4Network, bridge: str) -> None:
    """Refuse a subnet that this machine already reaches through something other than the lab bridge."""
    p = ip("-j", "-4", "route", "show", "table", "all", check=False)
    for r in json.loads(p.stdout or "[]"):
        dst = r.get("dst", "")
        if dst in ("default", "") or r.get("dev") == bridge or r.get("type") in ("local", "broadcast"):
            continue
        try:
            other = ipaddress.IPv4Network(dst, strict=False)
        except ValueError:
            continue
        if other.overlaps(net) and other.prefixlen > 0:
            raise LabError(f"the lab subnet {net} overlaps route {dst} dev {r.get('dev')} on this machine; "
                           "pick other addresses for the lab inventory")


def ensure_bridge(net: ipaddress.IPv4Network) -> str:
    """Create (or repair) the subnet's bridge with the gateway address; return its name."""
    br = bridge_name(net)
    check_subnet_free(net, br)
    gw = f"{net.network_address + 1}/{net.prefixlen}"
    if not link_exists(br):
        ip("link", "add", br, "type", "bridge", "stp_state", "0", "forward_delay", "0")
    if (link_info(br) or {}).get("address") != mac("bridge", br):  # else it takes a port's MAC, which changes
        ip("link", "set", br, "address", mac("bridge", br))
    addrs = json.loads(ip("-j", "-4", "addr", "show", "dev", br).stdout or "[]")
    have = {f"{a['local']}/{a['prefixlen']}" for d in addrs for a in d.get("addr_info", [])}
    if gw not in have:
        ip("addr", "add", gw, "dev", br)
    ip("link", "set", br, "up")
    return br


def bridge_ports(br: str) -> list[str]:
    p = ip("-j", "link", "show", "master", br, check=False)
    return [d["ifname"] for d in json.loads(p.stdout or "[]")] if p.returncode == 0 else []


def delete_bridge_if_unused(br: str) -> bool:
    if link_exists(br) and not bridge_ports(br):
        ip("link", "del", br)
        return True
    return False


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def netns_pids(name: str) -> list[int]:
    """Processes living in the host's netns (the container's), by namespace inode, never by name."""
    try:
        st = os.stat(NETNS_DIR / name)
    except OSError:
        return []
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            s = os.stat(f"/proc/{d}/ns/net")
        except OSError:
            continue
        if (s.st_dev, s.st_ino) == (st.st_dev, st.st_ino):
            pids.append(int(d))
    return pids


def ensure_host_net(name: str, address: str, net: ipaddress.IPv4Network, br: str) -> None:
    """netns NAME with lo up and eth0 = ADDRESS/24 (veth whose peer is on the bridge); no routes out."""
    veth = veth_name(name)
    if not netns_exists(name):
        ip("netns", "add", name)
    ip("-n", name, "link", "set", "lo", "up")
    if not link_exists("eth0", name):
        if link_exists(veth):  # orphaned root end (its peer died with an older netns)
            ip("link", "del", veth)
        ip("link", "add", veth, "address", mac("veth", name), "type", "veth",
           "peer", "name", "eth0", "address", mac("eth0", name), "netns", name)
    eth0 = json.loads(ip("-n", name, "-j", "link", "show", "dev", "eth0").stdout or "[{}]")[0]
    if eth0.get("address") != mac("eth0", name):
        ip("-n", name, "link", "set", "eth0", "address", mac("eth0", name))
    want = f"{address}/{net.prefixlen}"
    addrs = json.loads(ip("-n", name, "-j", "-4", "addr", "show", "dev", "eth0").stdout or "[]")
    have = [f"{a['local']}/{a['prefixlen']}" for d in addrs for a in d.get("addr_info", [])]
    for extra in (h for h in have if h != want):
        ip("-n", name, "addr", "del", extra, "dev", "eth0")
    if want not in have:
        ip("-n", name, "addr", "add", want, "dev", "eth0")
    ip("-n", name, "link", "set", "eth0", "up")
    ip("link", "set", veth, "master", br)
    ip("link", "set", veth, "up")


def delete_host_net(name: str) -> None:
    """Remove the host's netns (its eth0 and so the veth pair go with it) and any orphaned veth end."""
    if netns_exists(name):
        ip("netns", "del", name)
    veth = veth_name(name)
    if link_exists(veth):
        ip("link", "del", veth, check=False)


def set_partitioned(name: str, partitioned: bool) -> None:
    veth = veth_name(name)
    if not link_exists(veth):
        raise LabError(f"{name}: no lab link {veth}; is the host up? (inv lab.start {name})")
    ip("link", "set", veth, "down" if partitioned else "up")
