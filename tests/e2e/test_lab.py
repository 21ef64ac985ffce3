"""The lab: real air-gapped systemd hosts from the inventory, and its fault drills.

The session lab (hosts.yml) is only looked at and re-upped here; the destructive drills (kill,
partition, stale repair, down) run on a separate 5-host lab on 192.168.61.0/24 under tmp_path, so
other modules sharing the session lab are never disturbed.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from runbook.core.transport import SshTransport
from runbook.inventory import load_inventory
from runbook.lab import lab as labmod
from runbook.lab import net
from runbook.lab.machine import CGROUP_GROUP, Machine, cgroup_roots

pytestmark = pytest.mark.e2e

DRILL_HOSTS = {"d-etcd01": ("192.168.61.141", "etcd"), "d-etcd02": ("192.168.61.142", "etcd"),
               "d-etcd03": ("192.168.61.143", "etcd"), "d-node01": ("192.168.61.131", "postgres"),
               "d-node02": ("192.168.61.132", "postgres")}

# systemd-update-utmp may fail in a container (LAB-NOTES); anything else failing means a broken boot
HARMLESS_FAILURES = {"systemd-update-utmp.service", "systemd-update-utmp-runlevel.service"}


def _connect_from(t: SshTransport, src, dst, timeout: float = 2) -> bool:
    """Can lab host src open a TCP connection to lab host dst's sshd? (python3 on src)"""
    code = (f"import socket,sys\ntry:\n socket.create_connection(({dst.address!r},{dst.port}),timeout={timeout})"
            f".close()\nexcept OSError as e:\n print(e); sys.exit(1)")
    return t.run(src, f"python3 -c {shlex.quote(code)}", timeout=timeout + 10).rc == 0


def _nspawn_cmdlines() -> list[str]:
    out = []
    for d in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if stat.rsplit(")", 1)[-1].split()[0] != "Z" and "systemd-nspawn" in cmd.split(" ")[0]:
            out.append(cmd)
    return out


# -- the session lab ---------------------------------------------------------------------------

def test_hosts_up_reachable_and_airgapped(lab, lab_transport):
    assert [h.name for h in lab.hosts] and len(lab.hosts) >= 5
    for h in lab.hosts:
        r = lab_transport.run(h, "timeout 60 systemctl is-system-running --wait")
        assert r.stdout.strip() in ("running", "degraded"), (h.name, r)
        failed = lab_transport.run(h, "systemctl --failed --plain --no-legend").stdout.split()
        assert not [u for u in failed if u.endswith(".service") and u not in HARMLESS_FAILURES], (h.name, failed)
        init = Machine.of(labmod.lab_root(), h.name).init_pid()
        assert f"/{CGROUP_GROUP}/{h.name}/payload/" in Path(f"/proc/{init}/cgroup").read_text()
        assert lab_transport.run(h, "hostname").stdout.strip() == h.name
        assert lab_transport.run(h, "id -u").stdout.strip() == "0"  # sudo -n as the inventory user
        routes = lab_transport.run(h, "ip -4 route").stdout
        assert "default" not in routes and f"src {h.address}" in routes, (h.name, routes)
        r = lab_transport.run(h, "ip route get 1.1.1.1")  # asks the kernel; sends no packet
        assert r.rc != 0 and "Network is unreachable" in r.stderr, (h.name, r)
        assert lab_transport.run(h, "cat /etc/resolv.conf").stdout.strip() == ""
        assert lab_transport.run(h, "cat /etc/hosts").stdout.split()[:2] == ["127.0.0.1", "localhost"]


def test_host_keys_distinct_and_recorded(lab):
    kh = lab.hosts[0].known_hosts.read_text().splitlines()
    keys = {}
    for h in lab.hosts:
        ed = [ln.split()[2] for ln in kh if ln.split()[:2] == [h.address, "ssh-ed25519"]]
        assert len(ed) == 1, (h.name, ed)
        assert f"{h.name} ssh-ed25519 {ed[0]}" in kh
        keys[h.name] = ed[0]
    assert len(set(keys.values())) == len(keys), "lab hosts share sshd host keys"


def test_second_up_is_a_noop(lab):
    kh = lab.hosts[0].known_hosts
    before = {h.name: Machine.of(labmod.lab_root(), h.name).init_pid() for h in lab.hosts}
    kh_before = (kh.read_bytes(), kh.stat().st_mtime_ns)
    t0 = time.monotonic()
    result = labmod.up(lab)
    assert time.monotonic() - t0 < 10
    assert set(result.values()) == {"up"}, result
    assert {h.name: Machine.of(labmod.lab_root(), h.name).init_pid() for h in lab.hosts} == before
    assert (kh.read_bytes(), kh.stat().st_mtime_ns) == kh_before


# -- a separate drill lab ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def drill(tmp_path_factory, lab_prerequisites_met):
    d = tmp_path_factory.mktemp("drill-lab")
    hosts = "\n".join(f"  {n}: {{address: {a}, roles: [{r}]}}" for n, (a, r) in DRILL_HOSTS.items())
    (d / "hosts.yml").write_text("cluster: {name: drill}\nssh: {user: runbook, key: state/lab/id_ed25519, "
                                 f"known_hosts: state/lab/known_hosts}}\nhosts:\n{hosts}\n")
    inv = load_inventory(d / "hosts.yml")
    labmod.up(inv)
    t = SshTransport()
    yield inv, t
    t.close()
    labmod.down(inv)


def test_kill_then_start_keeps_the_disk(drill):
    inv, t = drill
    h = inv.get("d-node02")
    token = uuid.uuid4().hex
    # no sync: a whole-fs sync waits for every writer on this machine, and the page cache survives a
    # container kill anyway (unlike a real power cut)
    assert t.run(h, f"echo {token} > /var/lib/lab-e2e-marker").ok
    t.close()
    assert labmod.kill(inv, h.name) == "killed"
    m = Machine.of(labmod.lab_root(), h.name)
    assert m.init_pid() is None and m.nspawn_pid() is None and not net.netns_exists(h.name)
    assert labmod.host_state(inv, h)[0] == "off (disk kept)"
    assert not labmod.port_open(h.address, h.port, timeout=1)
    assert labmod.kill(inv, h.name) == "already off"
    t0 = time.monotonic()
    assert labmod.start(inv, h.name) == "started"
    assert time.monotonic() - t0 < 15  # the NIC keeps its MAC: no stale ARP entry to wait out
    assert t.run(h, "cat /var/lib/lab-e2e-marker").stdout.strip() == token
    assert _connect_from(t, inv.get("d-etcd01"), h)  # the other hosts reach it again at once
    assert labmod.host_state(inv, h)[0] == "up"


def test_partition_then_heal(drill):
    inv, t = drill
    victim, peer = inv.get("d-etcd01"), inv.get("d-node01")
    assert _connect_from(t, peer, victim)
    labmod.partition(inv, victim.name, cut=True)
    try:
        assert labmod.host_state(inv, victim)[0] == "partitioned"
        assert not _connect_from(t, peer, victim)
        assert not labmod.port_open(victim.address, victim.port, timeout=1)
    finally:
        labmod.partition(inv, victim.name, cut=False)
    for _ in range(20):  # bounded: ARP may need a moment after the port comes back
        if _connect_from(t, peer, victim):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"{victim.name} still unreachable from {peer.name} after heal")
    assert labmod.host_state(inv, victim)[0] == "up"


def test_up_repairs_a_killed_run(drill):
    inv, t = drill
    t.close()
    orphan, dead = Machine.of(labmod.lab_root(), "d-etcd02"), Machine.of(labmod.lab_root(), "d-etcd03")
    os.kill(orphan.nspawn_pid(), signal.SIGKILL)  # its init lives on without nspawn
    os.kill(dead.init_pid(), signal.SIGKILL)  # leaves netns, mount and a dead pid behind
    for _ in range(50):
        if orphan.nspawn_pid() is None and dead.nspawn_pid() is None:
            break
        time.sleep(0.1)
    assert orphan.stale() and dead.stale()
    result = labmod.up(inv)
    assert result["d-etcd02"] == "repaired" and result["d-etcd03"] == "repaired", result
    assert {v for k, v in result.items() if k not in ("d-etcd02", "d-etcd03")} == {"up"}
    for h in inv.hosts:
        assert t.run(h, "hostname").stdout.strip() == h.name


def test_down_leaves_nothing(drill, lab):
    inv, t = drill
    t.close()
    state = labmod.lab_root()  # shared with the session lab: look at the drill hosts' own dirs
    labmod.down(inv)
    mounts = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], check=False, capture_output=True, text=True).stdout
    assert not [n for n in DRILL_HOSTS if str(state / "hosts" / n) in mounts]
    netns = subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True).stdout
    assert not [n for n in DRILL_HOSTS if n in netns.split()]
    for n in DRILL_HOSTS:
        assert not net.link_exists(net.veth_name(n))
    assert not net.link_exists("lab192-168-61")
    assert not [c for c in _nspawn_cmdlines() if any(f" -M {n} " in c for n in DRILL_HOSTS)]
    assert not [n for n in DRILL_HOSTS if (state / "hosts" / n).exists()]
    assert not [r for r in cgroup_roots() for n in DRILL_HOSTS if (r / CGROUP_GROUP / n).exists()]
    # the session lab on the other subnet is untouched
    assert all(labmod.host_state(lab, h)[0] == "up" for h in lab.hosts)
    assert set(labmod.down(inv).values()) == {"down"}  # a second down has nothing to do
