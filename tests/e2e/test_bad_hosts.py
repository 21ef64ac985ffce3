"""Issue 7, bad hosts: unreachable, wrong SSH key, unknown or changed host key, a login user without sudo.

Each is one clear TransportError naming the host, its address and what to do, and a non-zero exit of a
cheap read-only command (`inv etcd.health`). Runs against the session lab's inventory (the repo hosts.yml
in CI; RUNBOOK_E2E_INVENTORY elsewhere) through modified copies of it in tmp_path; no host is taken
down and nothing is written to a host except one throw-away login user without sudo (removed at the end).
"""
from __future__ import annotations

import ipaddress
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import INV, REPO, SCALE

from runbook.core.transport import SshTransport, TransportError
from runbook.inventory import Inventory, load_inventory

pytestmark = pytest.mark.e2e
NOSUDO = "rbnosudo"  # a login user without sudo, made on one lab host for the no-sudo case


def variant(lab: Inventory, tmp_path: Path, name: str, *, ssh: dict | None = None,
            hosts: dict[str, dict] | None = None) -> Path:
    """A copy of the lab inventory with absolute ssh paths, some ssh settings and host fields changed."""
    doc = yaml.safe_load(lab.path.read_text())
    h0 = lab.hosts[0]
    doc["ssh"]["key"], doc["ssh"]["known_hosts"] = str(h0.key), str(h0.known_hosts)
    doc["ssh"].update(ssh or {})
    for host, fields in (hosts or {}).items():
        doc["hosts"][host].update(fields)
    p = tmp_path / f"{name}.yml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def health(inventory: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("INVOKE_")},
           "INVOKE_RUNBOOK_INVENTORY": str(inventory), "INVOKE_RUNBOOK_STATE_DIR": str(tmp_path / "state"),
           "NO_COLOR": "1", "COLUMNS": "250"}
    return subprocess.run([INV, "etcd.health"], cwd=REPO, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120 * SCALE)


def transport_error(inventory: Path, host: str, cmd: str = "true") -> str:
    """The TransportError of one cheap command on host (fails the test when there is none)."""
    inv = load_inventory(inventory)
    h = next(x for x in inv.hosts if x.name == host)
    t = SshTransport()
    try:
        with pytest.raises(TransportError) as exc:
            t.run(h, cmd, timeout=30)
    finally:
        t.close()
    return str(exc.value)


def assert_reported(r: subprocess.CompletedProcess, *pieces: str) -> None:
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "Traceback" not in out, out
    for p in pieces:
        assert p in out, f"{p!r} not in:\n{out}"


@pytest.fixture(scope="module")
def target(lab) -> object:
    return lab.etcd[0]


def test_unreachable_address(lab, target, tmp_path):
    """An address in the lab's /24 that no host has (.250): a connect timeout, not a hang."""
    net = ipaddress.ip_network(f"{target.address}/24", strict=False)
    free = next(str(a) for a in reversed(list(net.hosts())) if str(a) not in {h.address for h in lab.hosts})
    inv = variant(lab, tmp_path, "unreachable", hosts={target.name: {"address": free}})
    msg = transport_error(inv, target.name)
    assert f"{target.name} ({free}:{target.port}): unreachable" in msg and "is the host up" in msg, msg
    assert_reported(health(inv, tmp_path), f"{target.name} ({free}:{target.port}): unreachable",
                    f"unhealthy etcd member(s): {target.name}")


def test_wrong_ssh_key(lab, target, tmp_path):
    key = tmp_path / "not-the-lab-key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    inv = variant(lab, tmp_path, "wrong-key", ssh={"key": str(key)})
    msg = transport_error(inv, target.name)
    for piece in (f"{target.name} ({target.address}): authentication as {target.user!r} failed",
                  str(key), "ssh.user and ssh.key", "authorized_keys"):
        assert piece in msg, msg
    assert_reported(health(inv, tmp_path), f"{target.name} ({target.address}): authentication as")


def _known_hosts_without(lab, target, tmp_path: Path, replacement: str | None) -> Path:
    lines = [ln for ln in lab.hosts[0].known_hosts.read_text().splitlines()
             if ln.split(" ", 1)[0] not in (target.address, target.name)
             and not ln.split(" ", 1)[0].startswith(f"[{target.address}]")]
    if replacement:
        lines.append(f"{target.address} {replacement}")
    p = tmp_path / "known_hosts"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_host_missing_from_known_hosts(lab, target, tmp_path):
    kh = _known_hosts_without(lab, target, tmp_path, None)
    inv = variant(lab, tmp_path, "unknown-host-key", ssh={"known_hosts": str(kh)})
    msg = transport_error(inv, target.name)
    assert f"{target.name} ({target.address}): unknown host key: {target.address} is not in {kh}" in msg, msg
    assert f"ssh-keyscan {target.address} >> {kh}" in msg, msg
    assert_reported(health(inv, tmp_path), f"{target.name} ({target.address}): unknown host key")


def test_host_key_changed(lab, target, tmp_path):
    fake = tmp_path / "fake-host-key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(fake)], check=True)
    pub = " ".join(Path(f"{fake}.pub").read_text().split()[:2])
    kh = _known_hosts_without(lab, target, tmp_path, pub)
    inv = variant(lab, tmp_path, "changed-host-key", ssh={"known_hosts": str(kh)})
    msg = transport_error(inv, target.name)
    for piece in (f"{target.name} ({target.address}): host key mismatch", str(kh),
                  f"ssh-keygen -R {target.address} -f {kh}"):
        assert piece in msg, msg
    assert_reported(health(inv, tmp_path), f"{target.name} ({target.address}): host key mismatch")


def test_known_hosts_file_missing(lab, target, tmp_path):
    kh = tmp_path / "no" / "known_hosts"
    inv = variant(lab, tmp_path, "no-known-hosts", ssh={"known_hosts": str(kh)})
    assert_reported(health(inv, tmp_path), f"{target.name}: known_hosts {kh} does not exist",
                    "ssh.known_hosts")


@pytest.fixture(scope="module")
def nosudo_user(lab, lab_transport, target):
    """NOSUDO on target: the lab key in its authorized_keys, no sudo rights. Removed afterwards."""
    pub = Path(f"{target.key}.pub").read_text().strip()
    home = f"/home/{NOSUDO}"
    r = lab_transport.run(target, f"id -u {NOSUDO} >/dev/null 2>&1 || useradd -m -s /bin/sh {NOSUDO}; "
                                  f"install -d -m 0700 -o {NOSUDO} -g {NOSUDO} {home}/.ssh && "
                                  f"cat > {home}/.ssh/authorized_keys && "
                                  f"chown {NOSUDO}: {home}/.ssh/authorized_keys && "
                                  f"chmod 0600 {home}/.ssh/authorized_keys",
                          stdin=(pub + "\n").encode(), timeout=60)
    assert r.ok, r.stderr
    r = lab_transport.run(target, f"sudo -l -U {NOSUDO} 2>&1 | grep -q 'not allowed' ", timeout=30)
    assert r.ok, f"{NOSUDO} on {target.name} unexpectedly has sudo rights"
    yield NOSUDO
    lab_transport.run(target, f"userdel -f -r {shlex.quote(NOSUDO)} 2>/dev/null || true",
                      timeout=60)


def test_login_user_without_sudo(lab, target, tmp_path, nosudo_user):
    inv = variant(lab, tmp_path, "no-sudo", hosts={target.name: {"user": nosudo_user}})
    inventory = load_inventory(inv)
    h = next(x for x in inventory.hosts if x.name == target.name)
    t = SshTransport()
    try:
        assert t.run(h, "id -un", user=nosudo_user).stdout.strip() == nosudo_user  # login works; sudo does not
    finally:
        t.close()
    msg = transport_error(inv, target.name, "test -d /etc")
    for piece in (f"{target.name} ({target.address}): {nosudo_user!r} cannot run commands as root with `sudo -n`",
                  "a password is required", "NOPASSWD", "ssh.user"):
        assert piece in msg, msg
    assert_reported(health(inv, tmp_path), f"{target.name} ({target.address}): {nosudo_user!r} cannot run "
                                           "commands as root")
